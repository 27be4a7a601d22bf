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
//
// landscape_combine and landscape_bias_act_: one thread per output element, grid-stride (resident
// blocks only); consecutive threads take consecutive features f of a row (coalesced). The
// combination reads the point's k mix weights (cached, k <= 9) and the row's k parts; products and
// sums rounded one by one in the order j = 0..k-1 as on the CPU: bit for bit the CPU results.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) combine_kernel(const scalar_t* __restrict__ parts,
                                                           const scalar_t* __restrict__ mix, scalar_t* __restrict__ out,
                                                           int64_t total, int64_t R, int64_t F, int k, int act) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t f = e % F, i = e / F;  // i = p * R + r
    const int64_t p = i / R, r = i % R;
    const scalar_t* row = parts + r * k * F + f;
    const scalar_t* w = mix + p * k;
    T acc = landscape_first_term(static_cast<T>(w[0]), static_cast<T>(row[0]));
    for (int j = 1; j < k; ++j) acc = landscape_step(acc, static_cast<T>(w[j]), static_cast<T>(row[j * F]));
    out[e] = static_cast<scalar_t>(landscape_act(acc, act));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bias_act_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                                                            int64_t total, int64_t R, int64_t F, int act) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    T v = static_cast<T>(x[e]);
    if (bias != nullptr) v = add_rn(v, static_cast<T>(bias[(e / (R * F)) * F + e % F]));
    x[e] = static_cast<scalar_t>(landscape_act(v, act));
  }
}

at::Tensor landscape_combine_cuda(const at::Tensor& parts, const at::Tensor& mix, c10::string_view act) {
  const int a = check_landscape_combine(parts, mix, act, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(parts.device());
  const int64_t R = parts.size(0), k = parts.size(1), F = parts.size(2), c = mix.size(0);
  at::Tensor out = at::empty({c, R, F}, parts.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor pc = parts.contiguous();
  const at::Tensor mc = mix.contiguous();
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "landscape_combine_cuda", [&] {
    combine_kernel<scalar_t><<<resident_blocks_for(total, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        pc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, R, F,
        static_cast<int>(k), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void landscape_bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view act) {
  const int a = check_landscape_bias_act(x, bias, act, c10::DeviceType::CUDA);
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.numel() == 0 || (!has_bias && a == kActNone)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t total = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "landscape_bias_act_cuda", [&] {
    bias_act_kernel<scalar_t><<<resident_blocks_for(total, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr, total, x.size(1), x.size(2), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) {
  m.impl("landscape_points_", &landscape_points_cuda);
  m.impl("landscape_combine", &landscape_combine_cuda);
  m.impl("landscape_bias_act_", &landscape_bias_act_cuda);
}

}  // namespace pyfastbayes::cuda
