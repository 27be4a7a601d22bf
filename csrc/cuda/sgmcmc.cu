// CUDA kernels of the fused SG-MCMC steps and of any_nonfinite: one launch per parameter group
// (multi_tensor.cuh; the table's capacity fits the group). Each CUDA block owns a chunk of one
// tensor and splits it (ChunkSplit): a scalar head of fewer than kVec elements chosen so that the
// pointers line up with 16-byte accesses, vector steps of kVec elements (4 for fp32 and fp64 --
// fp64 as two 16-byte accesses --, 8 for fp16/bf16), a scalar tail. Pointers whose misalignment
// differs from the chosen head's are accessed element by element inside the same steps.
//
// The noise does not depend on this split: element i of tensor s always takes normal
// j = off + i of stream s, lane j % 4 of the Philox block j / 4 (common/philox.h), as on the CPU
// and in the reference; off = the op's offsets[s] (0 by default; the table's `offset`). A vector
// step that starts at i with r = (off + i) % 4 != 0 (a head or an offset that is not a multiple
// of 4) draws the kVec / 4 + 1 blocks it straddles and takes lanes r .. r + kVec - 1 of them (one
// extra block per step; such a step is still bound by memory traffic for fp32 / fp64).
//
// Elements are addressed as flat arrays from data_ptr() in logical (row-major) order, the order
// that indexes the noise: non-contiguous params / state are computed on contiguous copies and
// written back (ContiguousList, checks/sgmcmc.h), including dense permuted ones such as
// channels_last weights (see there for why).
//
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

#include <type_traits>

#include "checks/sgmcmc.h"
#include "common/layouts.h"
#include "common/philox.h"
#include "common/sgmcmc_rules.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace pyfastbayes::cuda {
namespace {

// z[l] for a lane index l in 0..3 known only at run time (selects, no local-memory array)
__device__ __forceinline__ float lane_of(const float (&z)[4], int l) {
  return l == 0 ? z[0] : l == 1 ? z[1] : l == 2 ? z[2] : z[3];
}

// the noise of element e of stream `stream`: lane e % 4 of Philox block e / 4
__device__ __forceinline__ float normal_at(uint64_t seed, int64_t e, uint32_t stream, uint32_t step) {
  float z[4];
  philox_normal4(seed, static_cast<uint64_t>(e) / 4, stream, step, z);
  return lane_of(z, static_cast<int>(e & 3));
}

template <typename T, class Table, class Rule>
__global__ void __launch_bounds__(kThreads)
    noisy_step_kernel(const __grid_constant__ Table tab, const double* __restrict__ hyper,
                      const int64_t* __restrict__ rng, const bool* __restrict__ skip) {
  if (skip != nullptr && *skip) return;
  constexpr bool kHasBuf = Table::kLists > 2;
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
  const int64_t off = tab.offset[t];  // element e takes normal off + e of the stream
  T* p = static_cast<T*>(tab.ptr[0][t]);
  const T* g = static_cast<const T*>(tab.ptr[1][t]);
  T* b = kHasBuf ? static_cast<T*>(tab.ptr[Table::kLists - 1][t]) : nullptr;

  constexpr int kVec = sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));  // elements per step
  static_assert(kVec % 4 == 0 && kChunk % kVec == 0, "a step covers whole Philox blocks");
  using VA = VecAccess<T, kVec>;
  // the head: the offset in [0, kVec) at which most pointers (weighted by traffic: the written
  // ones count twice) are aligned; ties keep the smallest (0 when all are aligned: no extra block
  // unless off % 4 != 0)
  int head = 0, best = -1;
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
    const int score = 2 * VA::aligned(p, c) + VA::aligned(g, c) + (kHasBuf ? 2 * VA::aligned(b, c) : 0);
    if (score > best) {
      best = score;
      head = c;
    }
  }
  const bool vp = VA::aligned(p, head), vg = VA::aligned(g, head), vb = kHasBuf && VA::aligned(b, head);
  const ChunkSplit<kVec> split(begin, end, head);
  // the first lane of every vector step: (off + i) % 4 is the same for all steps i (i - vbegin is
  // a multiple of kVec, itself a multiple of 4); begin is a multiple of 4, so it is (off + head) % 4
  const int r = static_cast<int>((off + head) & 3);

  for (int64_t i = split.vbegin + int64_t(threadIdx.x) * kVec; i < split.vend; i += int64_t(kThreads) * kVec) {
    // loads first: they are in flight while the noise is computed
    T pv[kVec], gv[kVec], bv[kVec];
    VA::load(p + i, vp, pv);
    VA::load(g + i, vg, gv);
    if constexpr (kHasBuf) VA::load(b + i, vb, bv);
    // zz[4 j + l] = lane l of block (off + i) / 4 + j; element i + k takes zz[r + k]
    float zz[kVec + 4];
    const uint64_t first = static_cast<uint64_t>(off + i) / 4;
#pragma unroll
    for (int j = 0; j < kVec / 4; ++j) philox_normal4(seed, first + j, stream, step, zz + 4 * j);
    if (r != 0) {
      philox_normal4(seed, first + kVec / 4, stream, step, zz + kVec);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) zz[kVec + l] = 0.0f;
    }
    float z[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) z[k] = r == 0 ? zz[k] : r == 1 ? zz[k + 1] : r == 2 ? zz[k + 2] : zz[k + 3];
#pragma unroll
    for (int k = 0; k < kVec; ++k) sgmcmc_update<kHasBuf>(rule, pv, gv, bv, k, z[k]);
    VA::store(p + i, vp, pv);
    if constexpr (kHasBuf) VA::store(b + i, vb, bv);
  }
  // scalar head and tail (< 2 kVec elements), on the block's last threads (least vector work)
  const int s = kThreads - 1 - static_cast<int>(threadIdx.x);
  if (s < split.n_scalar()) {
    const int64_t e = split.scalar(s);
    sgmcmc_update<kHasBuf>(rule, p, g, b, e, normal_at(seed, off + e, stream, step));
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
               const std::optional<at::Tensor>& skip, c10::OptionalIntArrayRef offsets) {
  check_step_args(op, params, grads, bufs, bufs_name, hyper, kHyperSize, rng, skip, offsets,
                  c10::DeviceType::CUDA);
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
      multi_tensor_apply<NL>(lists, [&](const auto& tab, int nblocks) {
        using Table = std::decay_t<decltype(tab)>;
        noisy_step_kernel<scalar_t, Table, Rule<op_t>><<<nblocks, kThreads, 0, stream>>>(
            tab, hyper.data_ptr<double>(), rng.data_ptr<int64_t>(), skip_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }, offsets.value_or(c10::IntArrayRef()));
    });
    ps.write_back();
    bs.write_back();
  }
  advance_step_kernel<<<1, 1, 0, stream>>>(rng.data_ptr<int64_t>(), skip_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sgld_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& hyper, const at::Tensor& rng,
                    const std::optional<at::Tensor>& skip, c10::OptionalIntArrayRef offsets) {
  step_cuda<SGLDRule, false>("sgld_step_", params, grads, {}, nullptr, hyper, rng, skip, offsets);
}
void sghmc_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                     const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip,
                     c10::OptionalIntArrayRef offsets) {
  step_cuda<SGHMCRule, true>("sghmc_step_", params, grads, momenta, "momenta", hyper, rng, skip, offsets);
}
void psgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avg,
                     const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip,
                     c10::OptionalIntArrayRef offsets) {
  step_cuda<PSGLDRule, true>("psgld_step_", params, grads, square_avg, "square_avg", hyper, rng, skip, offsets);
}

// any_nonfinite over one dtype: 16-byte loads (4 fp32, 2 fp64, 8 fp16/bf16) after a scalar head
// that aligns them, a scalar tail; the tensors are flat arrays (dense, any memory order: the
// order does not matter here, see nonfinite_inputs). An element is flagged when its bits with the
// sign cleared reach `thr` (nonfinite_threshold: +inf's bits, or a limit's), as on the CPU.
template <typename T>
struct NonfiniteBits {  // the unsigned integer of T's width
  using type = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
};

template <typename T, class Table>
__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(const __grid_constant__ Table tab, bool* found, uint64_t thr64) {
  using B = typename NonfiniteBits<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  constexpr B kAbs = static_cast<B>(~B(0) >> 1);  // every bit but the sign
  using VA = VecAccess<T, kVec>;
  const B thr = static_cast<B>(thr64);
  const int t = find_tensor(tab, blockIdx.x);
  const int64_t begin = int64_t(blockIdx.x - tab.block_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, tab.numel[t]);
  const T* x = static_cast<const T*>(tab.ptr[0][t]);
  bool bad = false;
  auto check = [&](T v) {
    B b;
    memcpy(&b, &v, sizeof(B));
    bad |= (b & kAbs) >= thr;
  };
  int head = 0;  // the first offset at which x is 16-byte aligned (none: x is not element-aligned)
  while (head < kVec - 1 && !VA::aligned(x, head)) ++head;
  const bool vec = VA::aligned(x, head);
  const ChunkSplit<kVec> split(begin, end, head);
  for (int64_t i = split.vbegin + int64_t(threadIdx.x) * kVec; i < split.vend; i += int64_t(kThreads) * kVec) {
    T v[kVec];
    VA::load(x + i, vec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) check(v[k]);
  }
  const int s = kThreads - 1 - static_cast<int>(threadIdx.x);  // scalar head and tail
  if (s < split.n_scalar()) check(x[split.scalar(s)]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
}

at::Tensor any_nonfinite_cuda(at::TensorList tensors, std::optional<double> limit) {
  check_nonfinite_limit(limit);
  TORCH_CHECK(!tensors.empty(), "any_nonfinite: empty list");
  const auto device = tensors[0].device();
  for (const auto& t : tensors)  // before the guard: tensors[0] may be a CPU tensor beside CUDA ones
    TORCH_CHECK(t.device() == device, "any_nonfinite: tensors on ", t.device(), " and ", device);
  const c10::cuda::CUDAGuard guard(device);
  const auto inputs = nonfinite_inputs(tensors, c10::DeviceType::CUDA);
  auto found = at::zeros({}, at::TensorOptions().dtype(at::kBool).device(device));
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<at::Tensor> same;
    for (const auto& t : inputs)
      if (t.scalar_type() == dtype) same.push_back(t);
    if (same.empty()) continue;
    const uint64_t thr = nonfinite_threshold(dtype, limit);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "any_nonfinite_cuda", [&] {
      multi_tensor_apply<1>({&same}, [&](const auto& tab, int nblocks) {
        nonfinite_kernel<scalar_t, std::decay_t<decltype(tab)>><<<nblocks, kThreads, 0, stream>>>(
            tab, found.data_ptr<bool>(), thr);
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
