// CUDA kernels of the vi family. Math: common/vi.h (the CPU loops' functions); checks: checks/vi.h.
//
// Section 1 (reparameterised noise): one thread per group of 4 elements (for the normals: one
// Philox block), grid-stride over the groups (grid: resident_blocks_for), on the current stream. A
// thread draws its block's four normals (philox_normal4, the code philox_normal_ runs) or, for
// vi_rademacher_ and vi_rademacher_mul, the four raw words of the block holding its 4 signs (128
// signs per block), and handles elements 4 g .. 4 g + 3: a whole block moves with vector accesses
// (VecAccess: 16-byte pieces for fp32 / fp64, 8 bytes for fp16 / bf16) for each pointer aligned to
// its piece size and element by element otherwise; the last, partial block (n % 4 elements)
// element by element with bounds checks. Nothing outside [0, n) is read or written.
//
// The RNG position is read from the device tensor rng inside the kernel (no host sync), so a call
// can be captured in a CUDA graph and replayed while the step advances in place. Inputs go
// through contiguous stand-ins (the noise is indexed by the logical element); the results are new
// contiguous tensors, except vi_rademacher_, which writes its out in place through a contiguous
// float32 temporary when out is not a contiguous tensor of a kernel dtype.
//
// CPU and CUDA agree to ~1e-6 relative (fp32): the same Philox bits and the same fp32 Box-Muller
// code, but nvcc contracts a * b + c into FMAs and the CUDA expf / log1pf / sqrt round differently
// from glibc's by an ulp; the Rademacher signs are integer code and agree exactly (and so does
// vi_rademacher_mul: x or -x).
//
// Section 2 (closed-form KL): ONE launch over every tensor of the lists (multi_tensor.cuh; more
// than 512 tensors, or over 2^30 chunks, take several), each CUDA block owning a chunk of kChunk
// elements of one tensor, split as the SG-MCMC kernels split theirs (ChunkSplit: a scalar head
// chosen to align the most pointers, vector steps, a scalar tail). The table's `stream` slot is
// the tensor's index in the caller's list: it selects prior_var[t], read on the device once per
// block (no host sync, CUDA-graph safe). vi_kl: each thread sums its terms in float32 (float64 for
// float64; at most kChunk / kThreads + 1 = 65 terms), the block adds the thread sums in float64 (a
// fixed shuffle tree) into its own slot of a float64 partials buffer, and one final single-block
// kernel adds the partials in a fixed order: deterministic, no atomics. vi_kl_backward reads grad
// on the device and writes new contiguous tensors. CPU and CUDA differ by the order of the float32
// sums and the FMA contraction (~1e-6 relative).
//
// Section 3 (the local reparameterisation's weight variance): one kernel for the three ops, one
// thread per group of 4 elements, grid-stride, vector accesses for each aligned pointer (as section
// 1); s2 written when given (non-null), gr (the gradient) read and overwritten when given. rho through
// a contiguous stand-in, sigma^2 a new contiguous tensor, grad through a contiguous copy written back
// when it is not contiguous. CPU and CUDA agree to ~1e-6 relative (expf / log1pf vs the CPU
// polynomials, FMA contraction).
//
// Section 4 (a layer's weight function with its KL term): one thread per group of 4 elements
// (one Philox block of normals; no noise for kind 2), grid-stride, element accesses; the kind a
// template parameter. vi_weight_kl adds each thread's KL terms in float64, the block's by block_sum
// into its slot of a float64 partials buffer, and vi_kl_final_kernel adds the slots in a fixed
// order (deterministic, no atomics). vi_weight_kl_backward_ reads kl_grad on the device and updates
// grad_rho / grad_mu in place (through contiguous copies written back when needed).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks/vi.h"
#include "common/layouts.h"
#include "common/philox.h"
#include "common/vi.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace pyfastbayes::cuda {
namespace {

// ======================= Section 1: reparameterised noise ======================================

// out[i] = Rule(a[i], b[i], eps_i), i < n; a, b, out contiguous (a_scalar: a holds one value for
// every element, flipout's zero mean: read as a[0]); math in op_t
template <typename T, class Rule>
__global__ void __launch_bounds__(kThreads)
    vi_noisy_pair_kernel(const T* __restrict__ a, bool a_scalar, const T* __restrict__ b, T* __restrict__ out,
                         int64_t n, const int64_t* __restrict__ rng, uint32_t stream) {
  using op_t = at::opmath_type<T>;
  using VA = VecAccess<T, 4>;
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  // a + 4 blk is aligned iff a is (4 elements are a whole number of pieces)
  const bool va = VA::aligned(a), vb = VA::aligned(b), vo = VA::aligned(out);
  const int64_t full = n / 4;           // blocks lying wholly inside [0, n)
  const int64_t nblocks = (n + 3) / 4;  // and the partial last one, if any
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const Rule rule{};
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; blk < nblocks; blk += grid_stride) {
    const int64_t i0 = 4 * blk;
    float z[4];
    if (blk < full) {
      T av[4], bv[4], ov[4];
      if (a_scalar) {
#pragma unroll
        for (int k = 0; k < 4; ++k) av[k] = a[0];
      } else {
        VA::load(a + i0, va, av);  // loads in flight while the noise is computed
      }
      VA::load(b + i0, vb, bv);
      philox_normal4(seed, static_cast<uint64_t>(blk), stream, step, z);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        ov[k] = static_cast<T>(rule(static_cast<op_t>(av[k]), static_cast<op_t>(bv[k]), static_cast<op_t>(z[k])));
      VA::store(out + i0, vo, ov);
    } else {
      philox_normal4(seed, static_cast<uint64_t>(blk), stream, step, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (i0 + k < n)
          out[i0 + k] = static_cast<T>(rule(static_cast<op_t>(a[a_scalar ? 0 : i0 + k]), static_cast<op_t>(b[i0 + k]),
                                            static_cast<op_t>(z[k])));
      }
    }
  }
}

// vi_sample_and_backward: w[i] = ViSampleRule(mu[i], rho[i], eps_i), gr[i] = ViSampleBackwardRule(gw[i],
// rho[i], eps_i), i < n, one draw of eps; all five contiguous (mu_scalar: mu holds one value for every
// element, read as mu[0]); math in op_t
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vi_sample_and_backward_kernel(const T* __restrict__ mu, bool mu_scalar, const T* __restrict__ rho,
                                  const T* __restrict__ gw, T* __restrict__ w, T* __restrict__ gr, int64_t n,
                                  const int64_t* __restrict__ rng, uint32_t stream) {
  using op_t = at::opmath_type<T>;
  using VA = VecAccess<T, 4>;
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  const bool vm = VA::aligned(mu), vr = VA::aligned(rho), vg = VA::aligned(gw), vw = VA::aligned(w),
             vgr = VA::aligned(gr);
  const int64_t full = n / 4;
  const int64_t nblocks = (n + 3) / 4;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const ViSampleRule sample{};
  const ViSampleBackwardRule back{};
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; blk < nblocks; blk += grid_stride) {
    const int64_t i0 = 4 * blk;
    float z[4];
    if (blk < full) {
      T mv[4], rv[4], gv[4], wv[4], grv[4];
      if (mu_scalar) {
#pragma unroll
        for (int k = 0; k < 4; ++k) mv[k] = mu[0];
      } else {
        VA::load(mu + i0, vm, mv);
      }
      VA::load(rho + i0, vr, rv);
      VA::load(gw + i0, vg, gv);
      philox_normal4(seed, static_cast<uint64_t>(blk), stream, step, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const op_t r = static_cast<op_t>(rv[k]), e = static_cast<op_t>(z[k]);
        wv[k] = static_cast<T>(sample(static_cast<op_t>(mv[k]), r, e));
        grv[k] = static_cast<T>(back(static_cast<op_t>(gv[k]), r, e));
      }
      VA::store(w + i0, vw, wv);
      VA::store(gr + i0, vgr, grv);
    } else {
      philox_normal4(seed, static_cast<uint64_t>(blk), stream, step, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (i0 + k < n) {
          const op_t r = static_cast<op_t>(rho[i0 + k]), e = static_cast<op_t>(z[k]);
          w[i0 + k] = static_cast<T>(sample(static_cast<op_t>(mu[mu_scalar ? 0 : i0 + k]), r, e));
          gr[i0 + k] = static_cast<T>(back(static_cast<op_t>(gw[i0 + k]), r, e));
        }
      }
    }
  }
}

// out[i] = s_i, the +1 / -1 from bit i % 32 of word (i / 32) % 4 of Philox block i / 128, or
// x[i] * s_i when x is given (vi_rademacher_mul; exact), i < n; out and x contiguous. A thread
// writes 4 consecutive elements (group g = i / 4: one vector load and store) from its own
// evaluation of their block (the 32 threads of a block's groups evaluate it alike: one Philox per 4
// signs, as for the normals; on the CPU every evaluation serves 128).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vi_rademacher_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t n, const int64_t* __restrict__ rng,
                         uint32_t stream) {
  using VA = VecAccess<T, 4>;
  using op_t = at::opmath_type<T>;
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  const bool vo = VA::aligned(out);
  const bool vx = x != nullptr && VA::aligned(x);
  const int64_t full = n / 4;
  const int64_t ngroups = (n + 3) / 4;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += grid_stride) {
    const int64_t i0 = 4 * g;
    uint32_t r[4];
    vi_philox_bits4(seed, static_cast<uint64_t>(i0 / kViSignsPerBlock), stream, step, r);
    const uint32_t word = r[(i0 / 32) % 4];
    const int bit0 = static_cast<int>(i0 % 32);
    if (g < full) {
      T ov[4];
      if (x != nullptr) {
        T xv[4];
        VA::load(x + i0, vx, xv);
#pragma unroll
        for (int k = 0; k < 4; ++k)
          ov[k] = static_cast<T>(static_cast<op_t>(xv[k]) * vi_rademacher_sign(word, bit0 + k));
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) ov[k] = static_cast<T>(vi_rademacher_sign(word, bit0 + k));
      }
      VA::store(out + i0, vo, ov);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) {
          const float sign = vi_rademacher_sign(word, bit0 + k);
          out[i0 + k] = x != nullptr ? static_cast<T>(static_cast<op_t>(x[i0 + k]) * sign) : static_cast<T>(sign);
        }
    }
  }
}

// The entry point of a two-input noisy op: checks, contiguous stand-ins, one launch, a new
// contiguous result.
template <class Rule>
at::Tensor vi_noisy_pair_cuda(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const at::Tensor& rng, int64_t stream) {
  check_vi_pair(op, a, a_name, b, b_name, rng, stream, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(a.sizes(), a.options());  // contiguous
  const int64_t n = a.numel();
  if (n == 0) return out;
  const at::Tensor ac = input_stand_in(a), bc = b.contiguous();  // (a broadcast value: not materialised)
  const bool a_scalar = broadcast_scalar(ac);
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "vi_noisy_pair", [&] {
    vi_noisy_pair_kernel<scalar_t, Rule><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        ac.const_data_ptr<scalar_t>(), a_scalar, bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
        rng.const_data_ptr<int64_t>(), static_cast<uint32_t>(stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor vi_sample_cuda(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& rng, int64_t stream) {
  return vi_noisy_pair_cuda<ViSampleRule>("vi_sample", mu, "mu", rho, "rho", rng, stream);
}

at::Tensor vi_sample_backward_cuda(const at::Tensor& grad_w, const at::Tensor& rho, const at::Tensor& rng,
                                   int64_t stream) {
  return vi_noisy_pair_cuda<ViSampleBackwardRule>("vi_sample_backward", grad_w, "grad_w", rho, "rho", rng, stream);
}

std::tuple<at::Tensor, at::Tensor> vi_sample_and_backward_cuda(const at::Tensor& mu, const at::Tensor& rho,
                                                               const at::Tensor& grad_w, const at::Tensor& rng,
                                                               int64_t stream) {
  check_vi_sample_and_backward(mu, rho, grad_w, rng, stream, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor w = at::empty(mu.sizes(), mu.options()), gr = at::empty(mu.sizes(), mu.options());  // contiguous
  const int64_t n = mu.numel();
  if (n == 0) return {w, gr};
  const at::Tensor mc = input_stand_in(mu), rc = rho.contiguous(), gc = grad_w.contiguous();
  const bool mu_scalar = broadcast_scalar(mc);  // flipout's zero mean: one value, not a weight-sized copy
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_sample_and_backward", [&] {
    vi_sample_and_backward_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        mc.const_data_ptr<scalar_t>(), mu_scalar, rc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
        w.mutable_data_ptr<scalar_t>(), gr.mutable_data_ptr<scalar_t>(), n, rng.const_data_ptr<int64_t>(),
        static_cast<uint32_t>(stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {w, gr};
}

at::Tensor vi_local_noise_cuda(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& rng,
                               int64_t stream) {
  return vi_noisy_pair_cuda<ViLocalNoiseRule>("vi_local_noise", mean, "mean", var, "var", rng, stream);
}

at::Tensor vi_local_noise_backward_cuda(const at::Tensor& grad_out, const at::Tensor& var, const at::Tensor& rng,
                                        int64_t stream) {
  return vi_noisy_pair_cuda<ViLocalNoiseBackwardRule>("vi_local_noise_backward", grad_out, "grad_out", var, "var",
                                                      rng, stream);
}

void vi_rademacher_cuda(const at::Tensor& out, const at::Tensor& rng, int64_t stream) {
  check_vi_rademacher(out, rng, stream, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  const bool direct = kernel_float_dtype(out.scalar_type()) && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({n}, out.options().dtype(at::kFloat));
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "vi_rademacher_", [&] {
    vi_rademacher_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        buf.mutable_data_ptr<scalar_t>(), nullptr, n, rng.const_data_ptr<int64_t>(), static_cast<uint32_t>(stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) out.copy_(buf.view(out.sizes()));  // +-1 is exact in every floating dtype
}

at::Tensor vi_rademacher_mul_cuda(const at::Tensor& x, const at::Tensor& rng, int64_t stream) {
  check_vi_rademacher_mul(x, rng, stream, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous
  const int64_t n = x.numel();
  if (n == 0) return out;
  const at::Tensor xc = x.contiguous();
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vi_rademacher_mul", [&] {
    vi_rademacher_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        out.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), n, rng.const_data_ptr<int64_t>(),
        static_cast<uint32_t>(stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ======================= end of section 1 ======================================================

// ======================= Section 2: closed-form KL of mean-field Gaussians =====================

static_assert(sizeof(TensorTable<4, kMaxTensors>) < 32000, "the backward's table (4 lists) must fit 32 KB");

// elements per vector step: 4 for fp32 / fp64 (fp64 as two 16-byte pieces), 8 for fp16 / bf16
template <typename T>
constexpr int kl_vec() {
  return sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));
}

// The chunk [begin, end) of CUDA block blockIdx.x in the table, and its tensor's index in the table
template <class Table>
struct KlChunk {
  int t;
  int64_t begin, end;
  __device__ __forceinline__ explicit KlChunk(const Table& tab) {
    t = find_tensor(tab, blockIdx.x);
    begin = int64_t(blockIdx.x - tab.block_start[t]) * kChunk;
    end = min(begin + kChunk, tab.numel[t]);
  }
};

// The head in [0, kVec) at which the most pointers are aligned (weights: 1 per read pointer, 2 per
// written one); ties keep the smallest
template <typename T, int kVec, int N>
__device__ __forceinline__ int kl_head(const T* const (&ptrs)[N], const int (&weight)[N]) {
  using VA = VecAccess<T, kVec>;
  int head = 0, best = -1;
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
    int score = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) score += weight[k] * VA::aligned(ptrs[k], c);
    if (score > best) {
      best = score;
      head = c;
    }
  }
  return head;
}

// grad (0-dim, a kernel float dtype named by `kind`: 0 fp64, 1 fp32, 2 fp16, 3 bf16) as float64
__device__ __forceinline__ double kl_read_grad(const void* grad, int kind) {
  switch (kind) {
    case 0: return *static_cast<const double*>(grad);
    case 1: return static_cast<double>(*static_cast<const float*>(grad));
    case 2: return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(grad)));
    default: return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(grad)));
  }
}

// kl_read_grad's `kind` of a grad tensor (check_vi_kl_grad admits these four dtypes)
int kl_grad_kind(const at::Tensor& grad) {
  switch (grad.scalar_type()) {
    case at::kDouble: return 0;
    case at::kFloat: return 1;
    case at::kHalf: return 2;
    default: return 3;  // kBFloat16
  }
}

// partials[blockIdx.x] = the sum of the terms of this block's chunk (float64). Every thread of the
// block reaches the reduction (no early exit), so the full-mask shuffles are safe.
template <typename T, class Table>
__global__ void __launch_bounds__(kThreads)
    vi_kl_kernel(const __grid_constant__ Table tab, const double* __restrict__ prior_var,
                 double* __restrict__ partials) {
  using op_t = at::opmath_type<T>;
  constexpr int kVec = kl_vec<T>();
  using VA = VecAccess<T, kVec>;
  const KlChunk<Table> c(tab);
  const T* mu = static_cast<const T*>(tab.ptr[0][c.t]);
  const T* rho = static_cast<const T*>(tab.ptr[1][c.t]);
  const ViKlPrior<op_t> prior = ViKlPrior<op_t>::make(prior_var[tab.stream[c.t]]);
  const int head = kl_head<T, kVec, 2>({mu, rho}, {1, 1});
  const bool vm = VA::aligned(mu, head), vr = VA::aligned(rho, head);
  const ChunkSplit<kVec> split(c.begin, c.end, head);

  op_t acc = op_t(0);  // this thread's terms: float32 (float64 for float64)
  for (int64_t i = split.vbegin + int64_t(threadIdx.x) * kVec; i < split.vend; i += int64_t(kThreads) * kVec) {
    T mv[kVec], rv[kVec];
    VA::load(mu + i, vm, mv);
    VA::load(rho + i, vr, rv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc += vi_kl_term(static_cast<op_t>(mv[k]), static_cast<op_t>(rv[k]), prior);
  }
  const int s = kThreads - 1 - static_cast<int>(threadIdx.x);  // scalar head and tail (< 2 kVec elements)
  if (s < split.n_scalar()) {
    const int64_t e = split.scalar(s);
    acc += vi_kl_term(static_cast<op_t>(mu[e]), static_cast<op_t>(rho[e]), prior);
  }
  const double v = block_sum(static_cast<double>(acc));  // float64, fixed order
  if (threadIdx.x == 0) partials[blockIdx.x] = v;
}

// out = the sum of partials[0 .. n) in float64, in a fixed order (one block: each thread a strided
// subsequence, then the shuffle tree), rounded to R. n may be 0 (out = 0).
template <typename R>
__global__ void __launch_bounds__(kThreads) vi_kl_final_kernel(const double* __restrict__ partials, int64_t n, R* out) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) *out = static_cast<R>(v);
}

// grad_mu, grad_rho of this block's chunk (lists: mu, rho, grad_mu, grad_rho)
template <typename T, class Table>
__global__ void __launch_bounds__(kThreads)
    vi_kl_backward_kernel(const __grid_constant__ Table tab, const void* __restrict__ grad, int grad_kind,
                          const double* __restrict__ prior_var) {
  using op_t = at::opmath_type<T>;
  constexpr int kVec = kl_vec<T>();
  using VA = VecAccess<T, kVec>;
  const KlChunk<Table> c(tab);
  const T* mu = static_cast<const T*>(tab.ptr[0][c.t]);
  const T* rho = static_cast<const T*>(tab.ptr[1][c.t]);
  T* gm = static_cast<T*>(tab.ptr[2][c.t]);
  T* gr = static_cast<T*>(tab.ptr[3][c.t]);
  const ViKlPrior<op_t> prior = ViKlPrior<op_t>::make(prior_var[tab.stream[c.t]]);
  const auto g = static_cast<op_t>(kl_read_grad(grad, grad_kind));
  const int head = kl_head<T, kVec, 4>({mu, rho, gm, gr}, {1, 1, 2, 2});
  const bool vm = VA::aligned(mu, head), vr = VA::aligned(rho, head), vgm = VA::aligned(gm, head),
             vgr = VA::aligned(gr, head);
  const ChunkSplit<kVec> split(c.begin, c.end, head);

  for (int64_t i = split.vbegin + int64_t(threadIdx.x) * kVec; i < split.vend; i += int64_t(kThreads) * kVec) {
    T mv[kVec], rv[kVec], dm[kVec], dr[kVec];
    VA::load(mu + i, vm, mv);
    VA::load(rho + i, vr, rv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      op_t a, b;
      vi_kl_grad(static_cast<op_t>(mv[k]), static_cast<op_t>(rv[k]), g, prior, a, b);
      dm[k] = static_cast<T>(a);
      dr[k] = static_cast<T>(b);
    }
    VA::store(gm + i, vgm, dm);
    VA::store(gr + i, vgr, dr);
  }
  const int s = kThreads - 1 - static_cast<int>(threadIdx.x);  // scalar head and tail
  if (s < split.n_scalar()) {
    const int64_t e = split.scalar(s);
    op_t a, b;
    vi_kl_grad(static_cast<op_t>(mu[e]), static_cast<op_t>(rho[e]), g, prior, a, b);
    gm[e] = static_cast<T>(a);
    gr[e] = static_cast<T>(b);
  }
}

at::Tensor vi_kl_cuda(at::TensorList mus, at::TensorList rhos, const at::Tensor& prior_var) {
  check_vi_kl("vi_kl", mus, rhos, prior_var, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mus[0].device());
  const auto dtype = mus[0].scalar_type();
  const auto rdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, mus[0].options().dtype(rdtype));
  const auto ms = contiguous_list(mus), rs = contiguous_list(rhos);
  const at::Tensor pv = prior_var.contiguous();
  int64_t nblocks = 0;  // the CUDA blocks of every launch: one partial each
  for (const auto& m : ms) nblocks += (m.numel() + kChunk - 1) / kChunk;
  at::Tensor partials = at::empty({std::max<int64_t>(nblocks, 1)}, mus[0].options().dtype(at::kDouble));
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vi_kl", [&] {
    int64_t offset = 0;  // blocks of the launches so far
    multi_tensor_apply<2>({&ms, &rs}, [&](const auto& tab, int n) {
      vi_kl_kernel<scalar_t, std::decay_t<decltype(tab)>><<<n, kThreads, 0, cs>>>(
          tab, pv.const_data_ptr<double>(), partials.mutable_data_ptr<double>() + offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset += n;
    });
    TORCH_INTERNAL_ASSERT(offset == nblocks, "vi_kl: ", offset, " blocks launched, ", nblocks, " expected");
  });
  AT_DISPATCH_FLOATING_TYPES(rdtype, "vi_kl_final", [&] {
    vi_kl_final_kernel<scalar_t><<<1, kThreads, 0, cs>>>(partials.const_data_ptr<double>(), nblocks,
                                                         out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> vi_kl_backward_cuda(const at::Tensor& grad,
                                                                                  at::TensorList mus,
                                                                                  at::TensorList rhos,
                                                                                  const at::Tensor& prior_var) {
  const char* op = "vi_kl_backward";
  check_vi_kl(op, mus, rhos, prior_var, c10::DeviceType::CUDA);
  check_vi_kl_grad(op, grad, mus[0].device());
  const c10::cuda::CUDAGuard guard(mus[0].device());
  const auto dtype = mus[0].scalar_type();
  const auto ms = contiguous_list(mus), rs = contiguous_list(rhos);
  const at::Tensor pv = prior_var.contiguous();
  std::vector<at::Tensor> gms, grs;
  for (const auto& m : ms) {
    gms.push_back(at::empty(m.sizes(), m.options()));  // contiguous
    grs.push_back(at::empty(m.sizes(), m.options()));
  }
  const int grad_kind = kl_grad_kind(grad);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vi_kl_backward", [&] {
    multi_tensor_apply<4>({&ms, &rs, &gms, &grs}, [&](const auto& tab, int n) {
      vi_kl_backward_kernel<scalar_t, std::decay_t<decltype(tab)>><<<n, kThreads, 0, cs>>>(
          tab, grad.const_data_ptr(), grad_kind, pv.const_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {std::move(gms), std::move(grs)};
}

// ======================= end of section 2 ======================================================

// ======================= Section 3: the local reparameterisation's weight variance ============

// s2[i] = ViSigmaSqRule(rho[i]) when s2 is non-null, gr[i] = ViSigmaSqBackwardRule(gr[i], rho[i]) in
// place when gr is non-null, i < n; all contiguous; math in op_t
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vi_sigma_sq_kernel(const T* __restrict__ rho, T* __restrict__ gr, T* __restrict__ s2, int64_t n) {
  using op_t = at::opmath_type<T>;
  using VA = VecAccess<T, 4>;
  const bool vr = VA::aligned(rho), vs = s2 != nullptr && VA::aligned(s2), vg = gr != nullptr && VA::aligned(gr);
  const int64_t full = n / 4;
  const int64_t ngroups = (n + 3) / 4;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const ViSigmaSqRule square{};
  const ViSigmaSqBackwardRule back{};
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += grid_stride) {
    const int64_t i0 = 4 * g;
    if (g < full) {
      T rv[4], gv[4], sv[4];
      VA::load(rho + i0, vr, rv);
      if (gr != nullptr) VA::load(gr + i0, vg, gv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const op_t r = static_cast<op_t>(rv[k]);
        sv[k] = static_cast<T>(square(r));
        if (gr != nullptr) gv[k] = static_cast<T>(back(static_cast<op_t>(gv[k]), r));
      }
      if (s2 != nullptr) VA::store(s2 + i0, vs, sv);
      if (gr != nullptr) VA::store(gr + i0, vg, gv);
    } else {
      for (int64_t i = i0; i < n; ++i) {
        const op_t r = static_cast<op_t>(rho[i]);
        if (s2 != nullptr) s2[i] = static_cast<T>(square(r));
        if (gr != nullptr) gr[i] = static_cast<T>(back(static_cast<op_t>(gr[i]), r));
      }
    }
  }
}

// The entry point of the three ops: checks; sigma^2 (a new contiguous tensor) when want_s2, else
// undefined; grad (when given) overwritten with its product by the derivative, through a contiguous
// copy written back when grad is not contiguous; one launch on the current stream
at::Tensor sigma_sq_cuda(const char* op, const at::Tensor& rho, const at::Tensor* grad, bool want_s2) {
  check_vi_sigma_sq(op, rho, grad, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(rho.device());
  at::Tensor s2 = want_s2 ? at::empty(rho.sizes(), rho.options()) : at::Tensor();  // contiguous
  const int64_t n = rho.numel();
  if (n == 0) return s2;
  const at::Tensor rc = rho.contiguous();
  at::Tensor gc = grad == nullptr ? at::Tensor() : grad->contiguous();  // grad itself when contiguous
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rho.scalar_type(), "vi_sigma_sq", [&] {
    vi_sigma_sq_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        rc.const_data_ptr<scalar_t>(), gc.defined() ? gc.mutable_data_ptr<scalar_t>() : nullptr,
        s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (grad != nullptr && !gc.is_same(*grad)) grad->copy_(gc);
  return s2;
}

at::Tensor vi_sigma_sq_cuda(const at::Tensor& rho) { return sigma_sq_cuda("vi_sigma_sq", rho, nullptr, true); }

void vi_sigma_sq_backward_cuda(const at::Tensor& grad, const at::Tensor& rho) {
  sigma_sq_cuda("vi_sigma_sq_backward_", rho, &grad, false);
}

at::Tensor vi_sigma_sq_and_backward_cuda(const at::Tensor& grad, const at::Tensor& rho) {
  return sigma_sq_cuda("vi_sigma_sq_and_backward_", rho, &grad, true);
}

// ======================= end of section 3 ======================================================

// ======================= Section 4: a layer's weight function with its KL term =================

// The grid-stride walk of both section 4 kernels: visit(i0, z) for every group of 4 elements
// starting at i0 = 4 grp, z the group's normals (Philox block grp; zeros for kind 2: no noise)
template <int K, class Visit>
__device__ __forceinline__ void for_each_weight_group(int64_t n, const int64_t* __restrict__ rng, uint32_t stream,
                                                      const Visit& visit) {
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  const int64_t ngroups = (n + 3) / 4;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < ngroups; grp += grid_stride) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (K != kViWeightVariance) philox_normal4(seed, static_cast<uint64_t>(grp), stream, step, z);
    visit(4 * grp, z);
  }
}

// vi_weight_kl: w[i] of kind K (vi_weight_value) and partials[blockIdx.x] = the float64 sum of this
// block's KL terms; one thread per group of 4 elements (one Philox block of normals; none for kind
// 2), grid-stride; each thread adds its terms in float64, the block by block_sum (fixed order).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    vi_weight_kl_kernel(const T* __restrict__ mu, const T* __restrict__ rho, T* __restrict__ w, int64_t n,
                        const int64_t* __restrict__ rng, uint32_t stream, ViKlPrior<at::opmath_type<T>> prior,
                        double* __restrict__ partials) {
  using op_t = at::opmath_type<T>;
  double acc = 0.0;
  for_each_weight_group<K>(n, rng, stream, [&](int64_t i0, const float* z) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i0 + k < n) {
        const op_t m = static_cast<op_t>(mu[i0 + k]), r = static_cast<op_t>(rho[i0 + k]);
        const op_t sigma = vi_softplus(r);
        w[i0 + k] = static_cast<T>(vi_weight_value<K>(m, sigma, static_cast<op_t>(z[k])));
        acc += static_cast<double>(prior.half_log_v - vi_log_sigma(r, sigma) + (sigma * sigma + m * m) * prior.inv_2v -
                                   op_t(0.5));
      }
    }
  });
  const double v = block_sum(acc);  // every thread of the block reaches it
  if (threadIdx.x == 0) partials[blockIdx.x] = v;
}

// vi_weight_kl_backward_: vi_weight_grad of kind K per element, gr / gm in place, w when not null
template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    vi_weight_grad_kernel(const T* __restrict__ mu, const T* __restrict__ rho, T* __restrict__ gr,
                          T* __restrict__ gm, T* __restrict__ w, int64_t n, const int64_t* __restrict__ rng,
                          uint32_t stream, const void* __restrict__ kl_grad, int grad_kind,
                          ViKlPrior<at::opmath_type<T>> prior) {
  using op_t = at::opmath_type<T>;
  const auto g = static_cast<op_t>(kl_read_grad(kl_grad, grad_kind));
  for_each_weight_group<K>(n, rng, stream, [&](int64_t i0, const float* z) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i < n) {
        op_t a, b, c;
        vi_weight_grad<K>(static_cast<op_t>(mu[i]), static_cast<op_t>(rho[i]), static_cast<op_t>(z[k]),
                          static_cast<op_t>(gr[i]), K == kViWeightSample ? op_t(0) : static_cast<op_t>(gm[i]), g,
                          prior, a, b, c);
        gr[i] = static_cast<T>(a);
        gm[i] = static_cast<T>(b);
        if (w != nullptr) w[i] = static_cast<T>(c);
      }
    }
  });
}

// the kind argument (0, 1, 2, checked) as the template parameter K of `launch`
template <class F>
void with_weight_kind(int64_t kind, const F& launch) {
  switch (kind) {
    case kViWeightSample: launch(std::integral_constant<int, kViWeightSample>{}); break;
    case kViWeightPerturbation: launch(std::integral_constant<int, kViWeightPerturbation>{}); break;
    default: launch(std::integral_constant<int, kViWeightVariance>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> vi_weight_kl_cuda(const at::Tensor& mu, const at::Tensor& rho,
                                                     const at::Tensor& rng, int64_t stream, double prior_var,
                                                     int64_t kind) {
  check_vi_weight_kl(mu, rho, rng, stream, prior_var, kind, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor w = at::empty(mu.sizes(), mu.options());  // contiguous
  const auto rdtype = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor kl = at::empty({}, mu.options().dtype(rdtype));
  const int64_t n = mu.numel();
  const int64_t grid = n == 0 ? 0 : resident_blocks_for((n + 3) / 4, kThreads);
  at::Tensor partials = at::empty({std::max<int64_t>(grid, 1)}, mu.options().dtype(at::kDouble));
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    const at::Tensor mc = mu.contiguous(), rc = rho.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_weight_kl", [&] {
      const auto prior = ViKlPrior<at::opmath_type<scalar_t>>::make(prior_var);
      with_weight_kind(kind, [&](auto k) {
        vi_weight_kl_kernel<scalar_t, decltype(k)::value><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
            mc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), w.mutable_data_ptr<scalar_t>(), n,
            rng.const_data_ptr<int64_t>(), static_cast<uint32_t>(stream), prior, partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  AT_DISPATCH_FLOATING_TYPES(rdtype, "vi_weight_kl_final", [&] {
    vi_kl_final_kernel<scalar_t><<<1, kThreads, 0, cs>>>(partials.const_data_ptr<double>(), grid,
                                                         kl.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {w, kl};
}

at::Tensor vi_weight_kl_backward_cuda(const at::Tensor& grad_rho, const at::Tensor& grad_mu, const at::Tensor& mu,
                                      const at::Tensor& rho, const at::Tensor& rng, int64_t stream,
                                      const at::Tensor& kl_grad, double prior_var, int64_t kind, bool want_w) {
  check_vi_weight_kl_backward(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad, prior_var, kind,
                              c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor w = want_w ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  const int64_t n = mu.numel();
  if (n == 0) return w;
  const at::Tensor mc = mu.contiguous(), rc = rho.contiguous();
  at::Tensor grc = grad_rho.contiguous(), gmc = grad_mu.contiguous();  // themselves when contiguous
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_weight_kl_backward_", [&] {
    const auto prior = ViKlPrior<at::opmath_type<scalar_t>>::make(prior_var);
    with_weight_kind(kind, [&](auto k) {
      vi_weight_grad_kernel<scalar_t, decltype(k)::value><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
          mc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), grc.mutable_data_ptr<scalar_t>(),
          gmc.mutable_data_ptr<scalar_t>(), want_w ? w.mutable_data_ptr<scalar_t>() : nullptr, n,
          rng.const_data_ptr<int64_t>(), static_cast<uint32_t>(stream), kl_grad.const_data_ptr(),
          kl_grad_kind(kl_grad), prior);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!grc.is_same(grad_rho)) grad_rho.copy_(grc);
  if (!gmc.is_same(grad_mu)) grad_mu.copy_(gmc);
  return w;
}

// ======================= end of section 4 ======================================================

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) {
  // section 1
  m.impl("vi_sample", &vi_sample_cuda);
  m.impl("vi_sample_backward", &vi_sample_backward_cuda);
  m.impl("vi_sample_and_backward", &vi_sample_and_backward_cuda);
  m.impl("vi_local_noise", &vi_local_noise_cuda);
  m.impl("vi_local_noise_backward", &vi_local_noise_backward_cuda);
  m.impl("vi_rademacher_", &vi_rademacher_cuda);
  m.impl("vi_rademacher_mul", &vi_rademacher_mul_cuda);
  // section 2
  m.impl("vi_kl", &vi_kl_cuda);
  m.impl("vi_kl_backward", &vi_kl_backward_cuda);
  // section 3
  m.impl("vi_sigma_sq", &vi_sigma_sq_cuda);
  m.impl("vi_sigma_sq_backward_", &vi_sigma_sq_backward_cuda);
  m.impl("vi_sigma_sq_and_backward_", &vi_sigma_sq_and_backward_cuda);
  // section 4
  m.impl("vi_weight_kl", &vi_weight_kl_cuda);
  m.impl("vi_weight_kl_backward_", &vi_weight_kl_backward_cuda);
}

}  // namespace pyfastbayes::cuda
