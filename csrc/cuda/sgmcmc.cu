// CUDA kernels of the fused SG-MCMC steps: one launch per parameter group (multi_tensor.cuh),
// 16-byte aligned vector accesses covering whole Philox blocks (4 elements of fp32/fp64, 8 of
// fp16/bf16) per thread step, scalar tails.
// Hyper-parameters and the RNG position are read from device memory, so a step can be captured
// in a CUDA graph and replayed while lr / temperature change in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks/sgmcmc.h"
#include "common/layouts.h"
#include "common/philox.h"
#include "common/sgmcmc_rules.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace pyfastbayes::cuda {
namespace {

template <typename T, int NL, class Rule>
__global__ void __launch_bounds__(kThreads)
    noisy_step_kernel(const __grid_constant__ TensorTable<NL> tab, const double* __restrict__ hyper,
                      const int64_t* __restrict__ rng, const bool* __restrict__ skip) {
  if (skip != nullptr && *skip) return;
  constexpr bool kHasBuf = NL > 2;
  // coefficients (fp64 loads and square roots) once per block, not once per thread
  __shared__ Rule block_rule;
  if (threadIdx.x == 0) block_rule = Rule::make(hyper);
  __syncthreads();
  const Rule rule = block_rule;
  const auto seed = static_cast<uint64_t>(rng[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng[kRngStep]);
  const int t = find_tensor(tab, blockIdx.x);
  const int64_t begin = int64_t(blockIdx.x - tab.block_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, tab.numel[t]);
  const uint32_t stream = static_cast<uint32_t>(tab.stream[t]);
  T* p = static_cast<T*>(tab.ptr[0][t]);
  const T* g = static_cast<const T*>(tab.ptr[1][t]);
  T* b = kHasBuf ? static_cast<T*>(tab.ptr[NL - 1][t]) : nullptr;
  // kVec elements per thread step: 16-byte accesses for fp32 and fp16/bf16 (8 elements = two
  // Philox blocks), 2 x 16 bytes for fp64; element i always takes lane i % 4 of block i / 4
  constexpr int kVec = sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));
  static_assert(kVec % 4 == 0 && kChunk % kVec == 0, "a thread step covers whole Philox blocks");
  const bool aligned =
      is_aligned<T, kVec>(p) && is_aligned<T, kVec>(g) && (!kHasBuf || is_aligned<T, kVec>(b));
  using V = AlignedVec<T, kVec>;
  for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < end; i += int64_t(kThreads) * kVec) {
    float z[kVec];
#pragma unroll
    for (int j = 0; j < kVec / 4; ++j) {
      float zj[4];
      philox_normal4(seed, static_cast<uint64_t>(i / 4 + j), stream, step, zj);
#pragma unroll
      for (int l = 0; l < 4; ++l) z[4 * j + l] = zj[l];
    }
    if (aligned && i + kVec <= end) {
      V pv = *reinterpret_cast<const V*>(p + i);
      const V gv = *reinterpret_cast<const V*>(g + i);
      V bv;
      if constexpr (kHasBuf) bv = *reinterpret_cast<const V*>(b + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sgmcmc_update<kHasBuf>(rule, pv.v, gv.v, bv.v, k, z[k]);
      *reinterpret_cast<V*>(p + i) = pv;
      if constexpr (kHasBuf) *reinterpret_cast<V*>(b + i) = bv;
    } else {  // unaligned tensor or the tensor's last partial step
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i + k < end) sgmcmc_update<kHasBuf>(rule, p, g, b, i + k, z[k]);
    }
  }
}

__global__ void advance_step_kernel(int64_t* rng, const bool* skip) {
  // wraps like torch's int64 add (no signed-overflow UB)
  if (skip == nullptr || !*skip) rng[kRngStep] = static_cast<int64_t>(static_cast<uint64_t>(rng[kRngStep]) + 1);
}

// bufs_name: the schema name of the state buffers, nullptr for SGLD (none)
template <template <class> class Rule, bool kHasBuf>
void step_cuda(const char* op, at::TensorList params, at::TensorList grads, at::TensorList bufs,
               const char* bufs_name, const at::Tensor& hyper, const at::Tensor& rng,
               const std::optional<at::Tensor>& skip) {
  check_step_args(op, params, grads, bufs, bufs_name, hyper, kHyperSize, rng, skip, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(rng.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool* skip_ptr = skip.has_value() ? skip->data_ptr<bool>() : nullptr;
  if (!params.empty()) {
    ContiguousList ps(params), bs(kHasBuf ? bufs : at::TensorList());
    const auto gs = contiguous_list(grads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgmcmc_step_cuda", [&] {
      using op_t = at::opmath_type<scalar_t>;
      constexpr int NL = kHasBuf ? 3 : 2;
      std::array<const std::vector<at::Tensor>*, NL> lists;
      lists[0] = &ps.work;
      lists[1] = &gs;
      if constexpr (kHasBuf) lists[2] = &bs.work;
      multi_tensor_apply<NL>(lists, [&](const TensorTable<NL>& tab, int nblocks) {
        noisy_step_kernel<scalar_t, NL, Rule<op_t>><<<nblocks, kThreads, 0, stream>>>(
            tab, hyper.data_ptr<double>(), rng.data_ptr<int64_t>(), skip_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    ps.write_back();
    bs.write_back();
  }
  advance_step_kernel<<<1, 1, 0, stream>>>(rng.data_ptr<int64_t>(), skip_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sgld_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& hyper, const at::Tensor& rng,
                    const std::optional<at::Tensor>& skip) {
  step_cuda<SGLDRule, false>("sgld_step_", params, grads, {}, nullptr, hyper, rng, skip);
}
void sghmc_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                     const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip) {
  step_cuda<SGHMCRule, true>("sghmc_step_", params, grads, momenta, "momenta", hyper, rng, skip);
}
void psgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avg,
                     const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip) {
  step_cuda<PSGLDRule, true>("psgld_step_", params, grads, square_avg, "square_avg", hyper, rng, skip);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(const __grid_constant__ TensorTable<1> tab, bool* found) {
  using op_t = at::opmath_type<T>;
  constexpr int kVec = 16 / sizeof(T);  // one 16-byte load per step
  const int t = find_tensor(tab, blockIdx.x);
  const int64_t begin = int64_t(blockIdx.x - tab.block_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, tab.numel[t]);
  const T* x = static_cast<const T*>(tab.ptr[0][t]);
  bool bad = false;
  auto check = [&](T v) {
    const op_t w = static_cast<op_t>(v);
    bad |= (w - w != op_t(0));  // inf - inf and NaN - NaN are NaN
  };
  if (is_aligned<T, kVec>(x)) {  // kChunk is a multiple of kVec: every vector is aligned
    using V = AlignedVec<T, kVec>;
    const int64_t vend = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < vend; i += int64_t(kThreads) * kVec) {
      const V v = *reinterpret_cast<const V*>(x + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) check(v.v[k]);
    }
    for (int64_t i = vend + threadIdx.x; i < end; i += kThreads) check(x[i]);
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) check(x[i]);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
}

at::Tensor any_nonfinite_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "any_nonfinite: empty list");
  const auto device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto inputs = nonfinite_inputs(tensors, c10::DeviceType::CUDA);
  auto found = at::zeros({}, at::TensorOptions().dtype(at::kBool).device(device));
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<at::Tensor> same;
    for (const auto& t : inputs)
      if (t.scalar_type() == dtype) same.push_back(t);
    if (same.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "any_nonfinite_cuda", [&] {
      multi_tensor_apply<1>({&same}, [&](const TensorTable<1>& tab, int nblocks) {
        nonfinite_kernel<scalar_t><<<nblocks, kThreads, 0, stream>>>(tab, found.data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return found;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) {
  m.impl("sgld_step_", &sgld_step_cuda);
  m.impl("sghmc_step_", &sghmc_step_cuda);
  m.impl("psgld_step_", &psgld_step_cuda);
  m.impl("any_nonfinite", &any_nonfinite_cuda);
}

}  // namespace pyfastbayes::cuda
