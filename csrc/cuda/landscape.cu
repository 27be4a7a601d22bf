// CUDA kernel of landscape_points_ (math in common/landscape.h, the CPU loop's function).
//
// Threads over the P parameters, grid-stride in x (the loop bound is the block's first parameter,
// uniform over the block, so every thread reaches every __syncthreads): each thread loads
// theta0[p] and its m direction values directions[j, p] once (coalesced rows), then loops over
// its points writing out[i, p] (a warp writes 32 consecutive elements of row i: coalesced).
// The points are split over gridDim.y (point i goes to block row i % gridDim.y), which is 1 when P
// alone fills the GPU (every input read once) and larger when P is small, so that a short
// parameter vector with many points still uses every SM. The block's coords are staged in shared
// memory, kTilePts points at a time, rounded once to the math type T.
// Every product and sum is rounded on its own (mul_rn / add_rn, never an FMA) in the order
// j = 0..m-1 from theta0: the results equal the CPU op bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks/landscape.h"
#include "common/landscape.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

constexpr int kTilePts = kThreads / kLandscapeMaxDirs;  // points per shared coords tile: one load per thread
static_assert(kTilePts * kLandscapeMaxDirs <= kThreads, "a coords tile is loaded in one pass");
constexpr int kMaxGridY = 65535;                         // CUDA's limit on gridDim.y

template <typename scalar_t, typename coord_t>
__global__ void __launch_bounds__(kThreads) landscape_kernel(const scalar_t* __restrict__ theta0,
                                                             const scalar_t* __restrict__ dirs,
                                                             const coord_t* __restrict__ coords,
                                                             scalar_t* __restrict__ out, int64_t n, int m,
                                                             int64_t P) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T tile[kTilePts * kLandscapeMaxDirs];  // [point of the tile][direction]
  const int tid = threadIdx.x;
  const int64_t gy = gridDim.y;
  const int64_t my_points = n > blockIdx.y ? (n - blockIdx.y + gy - 1) / gy : 0;  // i = blockIdx.y + r * gy
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < P; base += stride) {
    const int64_t p = base + tid;
    const bool on = p < P;
    T t0 = T(0);
    T d[kLandscapeMaxDirs];
#pragma unroll
    for (int j = 0; j < kLandscapeMaxDirs; ++j) d[j] = T(0);
    if (on) {
      t0 = static_cast<T>(theta0[p]);
#pragma unroll
      for (int j = 0; j < kLandscapeMaxDirs; ++j)
        if (j < m) d[j] = static_cast<T>(dirs[static_cast<int64_t>(j) * P + p]);
    }
    for (int64_t r0 = 0; r0 < my_points; r0 += kTilePts) {  // uniform over the block
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kTilePts), my_points - r0));
      __syncthreads();  // the previous tile's readers are done
      if (tid < cnt * m) {
        const int r = tid / m, j = tid % m;
        const int64_t i = blockIdx.y + (r0 + r) * gy;
        tile[r * kLandscapeMaxDirs + j] = static_cast<T>(coords[i * m + j]);
      }
      __syncthreads();
      if (on)
        for (int r = 0; r < cnt; ++r) {
          const T* c = tile + r * kLandscapeMaxDirs;
          T acc = t0;
#pragma unroll
          for (int j = 0; j < kLandscapeMaxDirs; ++j)
            if (j < m) acc = landscape_step(acc, c[j], d[j]);  // fixed order j = 0..m-1
          const int64_t i = blockIdx.y + (r0 + r) * gy;
          out[i * P + p] = static_cast<scalar_t>(acc);
        }
    }
  }
}

template <typename scalar_t, typename coord_t>
void launch(const at::Tensor& th, const at::Tensor& d, const at::Tensor& c, const at::Tensor& out) {
  const int64_t P = th.size(0), n = c.size(0);
  const int m = static_cast<int>(d.size(0));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target = int64_t(sms) * 8;  // resident blocks to aim for
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(blocks_for(P), target));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({target / gx, n, int64_t(kMaxGridY)}));
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  landscape_kernel<scalar_t, coord_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      th.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), c.const_data_ptr<coord_t>(),
      out.data_ptr<scalar_t>(), n, m, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void landscape_points_cuda(const at::Tensor& theta0, const at::Tensor& directions, const at::Tensor& coords,
                           const at::Tensor& out) {
  check_landscape_points(theta0, directions, coords, out, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(theta0.device());
  if (coords.size(0) == 0 || theta0.size(0) == 0) return;
  const at::Tensor th = theta0.contiguous();
  const at::Tensor d = directions.contiguous();
  const at::Tensor c = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "landscape_points_cuda", [&] {
    if (c.scalar_type() == at::kDouble) launch<scalar_t, double>(th, d, c, out);
    else launch<scalar_t, scalar_t>(th, d, c, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("landscape_points_", &landscape_points_cuda); }

}  // namespace pyfastbayes::cuda
