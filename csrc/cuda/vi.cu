// CUDA kernels of the vi family. Math: common/vi.h (the CPU loops' functions); checks: checks/vi.h.
//
// Section 1 (reparameterised noise): one thread per Philox block of 4 elements, grid-stride over
// the blocks (grid: resident_blocks_for), on the current stream. A thread draws the block's four
// normals (philox_normal4, the code philox_normal_ runs) or four raw words (vi_rademacher_) and
// handles elements 4 blk .. 4 blk + 3: a whole block moves with vector accesses (VecAccess: 16-byte
// pieces for fp32 / fp64, 8 bytes for fp16 / bf16) for each pointer aligned to its piece size and
// element by element otherwise; the last, partial block (n % 4 elements) element by element with
// bounds checks. Nothing outside [0, n) is read or written.
//
// The RNG position is read from the device tensor rng inside the kernel (no host sync), so a call
// can be captured in a CUDA graph and replayed while the step advances in place. Inputs go
// through contiguous stand-ins (the noise is indexed by the logical element); the results are new
// contiguous tensors, except vi_rademacher_, which writes its out in place through a contiguous
// float32 temporary when out is not a contiguous tensor of a kernel dtype.
//
// CPU and CUDA agree to ~1e-6 relative (fp32): the same Philox bits and the same fp32 Box-Muller
// code, but nvcc contracts a * b + c into FMAs and the CUDA expf / log1pf / sqrt round differently
// from glibc's by an ulp; the Rademacher signs are integer code and agree exactly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "checks/vi.h"
#include "common/layouts.h"
#include "common/philox.h"
#include "common/vi.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace pyfastbayes::cuda {
namespace {

// ======================= Section 1: reparameterised noise ======================================

// out[i] = Rule(a[i], b[i], eps_i), i < n; a, b, out contiguous; math in op_t
template <typename T, class Rule>
__global__ void __launch_bounds__(kThreads)
    vi_noisy_pair_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n,
                         const int64_t* __restrict__ rng, uint32_t stream) {
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
      VA::load(a + i0, va, av);  // loads in flight while the noise is computed
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
          out[i0 + k] = static_cast<T>(
              rule(static_cast<op_t>(a[i0 + k]), static_cast<op_t>(b[i0 + k]), static_cast<op_t>(z[k])));
      }
    }
  }
}

// out[i] = +1 / -1 from the top bit of word i % 4 of Philox block i / 4, i < n; out contiguous
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vi_rademacher_kernel(T* __restrict__ out, int64_t n, const int64_t* __restrict__ rng, uint32_t stream) {
  using VA = VecAccess<T, 4>;
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  const bool vo = VA::aligned(out);
  const int64_t full = n / 4;
  const int64_t nblocks = (n + 3) / 4;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; blk < nblocks; blk += grid_stride) {
    const int64_t i0 = 4 * blk;
    uint32_t r[4];
    vi_philox_bits4(seed, static_cast<uint64_t>(blk), stream, step, r);
    if (blk < full) {
      T ov[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) ov[k] = static_cast<T>(vi_rademacher_sign(r[k]));
      VA::store(out + i0, vo, ov);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) out[i0 + k] = static_cast<T>(vi_rademacher_sign(r[k]));
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
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t grid = resident_blocks_for((n + 3) / 4, kThreads);
  const cudaStream_t cs = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "vi_noisy_pair", [&] {
    vi_noisy_pair_kernel<scalar_t, Rule><<<static_cast<unsigned>(grid), kThreads, 0, cs>>>(
        ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
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
        buf.mutable_data_ptr<scalar_t>(), n, rng.const_data_ptr<int64_t>(), static_cast<uint32_t>(stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) out.copy_(buf.view(out.sizes()));  // +-1 is exact in every floating dtype
}

// ======================= end of section 1 ======================================================

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) {
  // section 1
  m.impl("vi_sample", &vi_sample_cuda);
  m.impl("vi_sample_backward", &vi_sample_backward_cuda);
  m.impl("vi_local_noise", &vi_local_noise_cuda);
  m.impl("vi_local_noise_backward", &vi_local_noise_backward_cuda);
  m.impl("vi_rademacher_", &vi_rademacher_cuda);
}

}  // namespace pyfastbayes::cuda
