// CUDA kernels of loss_hessian (math in common/curvature.h, the CPU loop's functions).
//
// bce / mse (elementwise): one thread per output element, grid-stride over the flat [N, C, k]
// index i; the scale of class c = i / k is recomputed per element (an exp for bce).
//
// gaussian_natural: one thread per (row n, block d, column j), grid-stride over N * D * k; it reads
// eta1, eta2 and the column's two entries of V and writes both outputs of the block.
//
// cross_entropy: one block per row, grid-stride over the rows (the loop bound is uniform over the
// block, so every thread reaches every __syncthreads). Per row:
//  1. max and sum of exp(x - m) over the C logits (threads over classes; block reductions in a
//     fixed order: warp xor shuffles, then the warps' partials summed in warp order), the sum in
//     double; the exponentials are kept in w[c], then each thread turns its own classes into the
//     dot weights w[c] and output scales a[c] of the mode (a aliases w unless mode is factor_t).
//     w and a live in dynamic shared memory, or, when C is too long for it, in a global scratch
//     row of the block.
//  2. the k columns in tiles of J (the power of two >= min(k, 32)): thread tid takes column
//     j0 + tid % J and the classes c = tid / J + r * (threads / J), so a warp reads 32 / J
//     consecutive rows of V_n's [C, k] block, J consecutive columns each (coalesced: for k <= 32
//     a warp reads one contiguous stretch). The tile's dots t_j = sum_c w_c v_cj accumulate in
//     double, are reduced over the lanes of one column (xor shuffles with offsets >= J) and over
//     the warps (shared memory, warp order), rounded once to T; then the same threads write
//     out = a (v - b t) for the tile (V_n reread, usually from L1/L2).
// Results equal the CPU op up to the summation order of z and of the dots (not bit for bit).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks/curvature.h"
#include "common/curvature.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

constexpr int kMaxWarps = kThreads / 32;
constexpr size_t kDefaultSmem = 48 * 1024;                // dynamic shared memory without opt-in
constexpr size_t kStaticSmemReserve = 4 * 1024;           // room left for the kernel's static shared arrays
constexpr int64_t kMaxScratchBytes = int64_t(64) << 20;   // global scratch (long rows) at most ~64 MiB

// A block-wide sum (op = 0) or max (op = 1) of one double per thread; every thread gets the result.
// red: kMaxWarps doubles of shared memory. The leading barrier keeps a previous call's readers safe.
__device__ __forceinline__ double block_reduce(double v, bool is_max, double* red) {
  v = is_max ? group_max(v, 32) : group_sum(v, 32);
  const int warps = blockDim.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  double r = red[0];
  for (int w = 1; w < warps; ++w) r = is_max ? fmax(r, red[w]) : r + red[w];
  return r;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const scalar_t* __restrict__ x,
                                                               const scalar_t* __restrict__ V,
                                                               scalar_t* __restrict__ out, int64_t total, int64_t k,
                                                               LossProblem pr) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const T a = elementwise_scale(pr.kind, pr.mode, static_cast<T>(x[i / k]));
    out[i] = static_cast<scalar_t>(a * static_cast<T>(V[i]));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gaussian_natural_kernel(const scalar_t* __restrict__ x,
                                                                    const scalar_t* __restrict__ V,
                                                                    scalar_t* __restrict__ out, int64_t total,
                                                                    int64_t D, int64_t k, HessMode mode) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t j = i % k, nd = i / k, d = nd % D, n = nd / D;  // i = (n * D + d) * k + j
    const int64_t e1 = n * 2 * D + d;                            // flat index of eta1 in x [N, 2D]
    const int64_t i1 = e1 * k + j, i2 = (e1 + D) * k + j;         // the block's two entries of V / out
    T a, b;
    gaussian_natural_out(static_cast<T>(x[e1]), static_cast<T>(x[e1 + D]), static_cast<T>(V[i1]),
                         static_cast<T>(V[i2]), mode, a, b);
    out[i1] = static_cast<scalar_t>(a);
    out[i2] = static_cast<scalar_t>(b);
  }
}

// cross_entropy, one block of blockDim.x (a multiple of 32, <= kThreads) threads per row.
// scratch: nullptr (w, a in dynamic shared memory) or [gridDim.x, nvec * C] of T.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(const scalar_t* __restrict__ x,
                                                                 const scalar_t* __restrict__ V,
                                                                 scalar_t* __restrict__ out, int64_t N, int64_t C,
                                                                 int64_t k, HessMode mode, int J,
                                                                 at::opmath_type<scalar_t>* scratch) {
  using T = at::opmath_type<scalar_t>;
  extern __shared__ double smem_dyn[];  // double: aligned for T = float and double
  __shared__ double red[kMaxWarps * 32];  // [warp][column of the tile] partial dots; block reductions
  __shared__ T tile_t[32];                // the tile's dots, rounded to T
  const int nvec = mode == HessMode::kFactorT ? 2 : 1;
  T* w = scratch != nullptr ? scratch + static_cast<int64_t>(blockIdx.x) * nvec * C : reinterpret_cast<T*>(smem_dyn);
  T* a = nvec == 2 ? w + C : w;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int lane = tid % 32, warp = tid / 32, warps = threads / 32;
  const int jj = tid % J;            // this thread's column in a tile
  const int slice = tid / J;         // its first class
  const int slices = threads / J;    // classes advance by this
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* xr = x + n * C;
    const scalar_t* vr = V + n * C * k;
    scalar_t* orow = out + n * C * k;

    // 1. softmax: w[c] = exp(x_c - m), z = sum (double), then the mode's weights and scales
    double m = -INFINITY;
    for (int64_t c = tid; c < C; c += threads) m = fmax(m, static_cast<double>(static_cast<T>(xr[c])));
    const T mt = static_cast<T>(block_reduce(m, true, red));  // exact: the max of T values
    double z = 0.0;
    for (int64_t c = tid; c < C; c += threads) {
      const T e = typed_exp(static_cast<T>(xr[c]) - mt);
      w[c] = e;
      z += static_cast<double>(e);
    }
    z = block_reduce(z, false, red);
    for (int64_t c = tid; c < C; c += threads) {  // only this thread's own entries: no barrier needed before
      const T p = softmax_prob(w[c], z);
      w[c] = ce_dot_weight(p, mode);
      if (nvec == 2) a[c] = ce_out_scale(p, mode);  // else a == w and the two agree (p, or q)
    }
    __syncthreads();  // w, a complete for every thread

    // 2. the columns in tiles of J: dots, then outputs
    for (int64_t j0 = 0; j0 < k; j0 += J) {
      const int64_t j = j0 + jj;
      const bool on = j < k;
      double t = 0.0;
      if (on)
        for (int64_t c = slice; c < C; c += slices)
          t += static_cast<double>(w[c]) * static_cast<double>(static_cast<T>(vr[c * k + j]));
      for (int off = 16; off >= J; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);  // lanes of one column
      if (lane < J) red[warp * 32 + lane] = t;  // lane < J: its column is jj = lane
      __syncthreads();
      if (tid < J) {
        double s = red[tid];
        for (int v = 1; v < warps; ++v) s += red[v * 32 + tid];
        tile_t[tid] = static_cast<T>(s);
      }
      __syncthreads();
      const T tj = tile_t[jj];
      if (on)
        for (int64_t c = slice; c < C; c += slices) {
          const int64_t i = c * k + j;
          orow[i] = static_cast<scalar_t>(ce_out(a[c], static_cast<T>(vr[i]), tj, mode));
        }
      // the next tile's writes of red / tile_t come after its first barrier, which every reader of
      // this tile's values has passed only after reading them
    }
    __syncthreads();  // before the next row overwrites w and a
  }
}

int grid_for(const void* kernel, int threads, size_t smem, int64_t work) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, sms * std::max(per_sm, 1))));
}

template <typename scalar_t>
void launch_cross_entropy(const at::Tensor& x, const at::Tensor& v, at::Tensor& out, HessMode mode) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), k = v.size(2);
  int J = 1;
  while (J < k && J < 32) J <<= 1;
  // threads: enough for one tile's C * J elements, a multiple of 32, at most kThreads
  int threads = 32;
  while (threads < kThreads && int64_t(threads) < C * J) threads <<= 1;
  const int nvec = mode == HessMode::kFactorT ? 2 : 1;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t optin = std::max(static_cast<size_t>(prop->sharedMemPerBlockOptin), kDefaultSmem) - kStaticSmemReserve;
  const size_t bytes = static_cast<size_t>(nvec) * static_cast<size_t>(C) * sizeof(T);
  auto kernel = cross_entropy_kernel<scalar_t>;
  at::Tensor scratch;
  T* scratch_ptr = nullptr;
  size_t smem = 0;
  int grid;
  if (bytes <= optin) {
    smem = bytes;
    if (smem > kDefaultSmem)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    grid = grid_for(reinterpret_cast<const void*>(kernel), threads, smem, N);
  } else {  // long rows: one global scratch row per block, the grid capped to keep it near kMaxScratchBytes
    grid = grid_for(reinterpret_cast<const void*>(kernel), threads, 0, N);
    grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(grid, kMaxScratchBytes / static_cast<int64_t>(bytes))));
    scratch = at::empty({grid, nvec * C}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    scratch_ptr = scratch.data_ptr<T>();
  }
  kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, C, k, mode, J,
      scratch_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_elementwise(const at::Tensor& x, const at::Tensor& v, at::Tensor& out, LossProblem pr) {
  const int64_t total = out.numel(), k = v.size(2);
  auto kernel = elementwise_kernel<scalar_t>;
  const int grid = grid_for(reinterpret_cast<const void*>(kernel), kThreads, 0, blocks_for(total));
  kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, k, pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gaussian_natural(const at::Tensor& x, const at::Tensor& v, at::Tensor& out, HessMode mode) {
  const int64_t D = x.size(1) / 2, k = v.size(2);
  const int64_t total = x.size(0) * D * k;
  if (total == 0) return;
  auto kernel = gaussian_natural_kernel<scalar_t>;
  const int grid = grid_for(reinterpret_cast<const void*>(kernel), kThreads, 0, blocks_for(total));
  kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, D, k, mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor loss_hessian_cuda(c10::string_view kind, const at::Tensor& outputs, const at::Tensor& V,
                             c10::string_view mode) {
  const LossProblem pr = check_loss_hessian(kind, outputs, V, mode, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(outputs.device());
  const int64_t N = outputs.size(0), C = outputs.size(1), k = V.size(2);
  at::Tensor out = at::empty({N, C, k}, V.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const at::Tensor x = outputs.contiguous();
  const at::Tensor v = V.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "loss_hessian_cuda", [&] {
    if (pr.kind == LossKind::kCrossEntropy) launch_cross_entropy<scalar_t>(x, v, out, pr.mode);
    else if (pr.kind == LossKind::kGaussianNatural) launch_gaussian_natural<scalar_t>(x, v, out, pr.mode);
    else launch_elementwise<scalar_t>(x, v, out, pr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("loss_hessian", &loss_hessian_cuda); }

}  // namespace pyfastbayes::cuda
