// CUDA kernel of swag_collect_ (math in common/swag.h): one launch per parameter dtype present
// (usually one) over every tensor of the list, through the multi-tensor launcher
// (multi_tensor.cuh; the table's capacity fits the number of tensors). List 1 of the table holds
// views of `mean` at each tensor's flat offset, so the kernel recovers the offset from the pointer
// and addresses sq_mean and the deviation row with it.
//
// 4 elements per thread step. Each CUDA block splits its chunk (ChunkSplit): a scalar head of up
// to 3 elements chosen so that most of the pointers (mean and sq_mean first: read and written)
// are aligned for vector accesses (16 bytes for fp32 / fp64 state -- fp64 as two 16-byte
// accesses --, 8 bytes for 4 fp16 / bf16), vector steps, a scalar tail. A pointer whose
// misalignment differs (a ring row of D when P % 4 != 0, a parameter after an odd-sized one, a
// [1:] view) is accessed element by element inside the same steps, never the whole tensor.
// Non-contiguous params are read from contiguous copies (contiguous_list): mean is indexed in
// the params' logical order, so a dense permuted (channels_last) parameter needs the copy too.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <vector>

#include "checks/common.h"
#include "checks/swag.h"
#include "common/philox.h"
#include "common/swag.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace pyfastbayes::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// collect
// ------------------------------------------------------------------------------------------------
template <typename T, typename state_t, typename d_t, class Table>
__global__ void __launch_bounds__(kThreads)
    swag_collect_kernel(const __grid_constant__ Table tab, state_t* __restrict__ mean,
                        state_t* __restrict__ sq, d_t* __restrict__ dev, state_t w) {
  const int t = find_tensor(tab, blockIdx.x);
  const int64_t begin = int64_t(blockIdx.x - tab.block_start[t]) * kChunk;
  const int64_t end = min(begin + kChunk, tab.numel[t]);
  const T* __restrict__ p = static_cast<const T*>(tab.ptr[0][t]);
  const int64_t off = static_cast<const state_t*>(tab.ptr[1][t]) - mean;  // flat offset of tensor t
  state_t* m = mean + off;
  state_t* s = sq != nullptr ? sq + off : nullptr;
  d_t* d = dev != nullptr ? dev + off : nullptr;
  const bool has_sq = s != nullptr;
  constexpr int kVec = 4;
  using VP = VecAccess<T, kVec>;
  using VS = VecAccess<state_t, kVec>;
  using VD = VecAccess<d_t, kVec>;
  // the head: the offset in [0, 4) at which most pointers are aligned (mean and sq_mean, read and
  // written, count twice); ties keep the smallest
  int head = 0, best = -1;
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
    const int score = 2 * VS::aligned(m, c) + (has_sq ? 2 * VS::aligned(s, c) : 0) +
                      (d != nullptr ? VD::aligned(d, c) : 0) + VP::aligned(p, c);
    if (score > best) {
      best = score;
      head = c;
    }
  }
  const bool vp = VP::aligned(p, head), vm = VS::aligned(m, head);
  const bool vs = has_sq && VS::aligned(s, head), vd = d != nullptr && VD::aligned(d, head);
  const ChunkSplit<kVec> split(begin, end, head);
  for (int64_t i = split.vbegin + int64_t(threadIdx.x) * kVec; i < split.vend; i += int64_t(kThreads) * kVec) {
    T pv[kVec];
    state_t mv[kVec], sv[kVec];
    d_t dv[kVec];
    VP::load(p + i, vp, pv);
    VS::load(m + i, vm, mv);
    if (has_sq) VS::load(s + i, vs, sv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) swag_collect_update(pv, mv, sv, has_sq, dv, k, w);
    VS::store(m + i, vm, mv);
    if (has_sq) VS::store(s + i, vs, sv);
    if (d != nullptr) VD::store(d + i, vd, dv);
  }
  const int sc = kThreads - 1 - static_cast<int>(threadIdx.x);  // scalar head and tail (< 8 elements)
  if (sc < split.n_scalar()) swag_collect_update(p, m, s, has_sq, d, split.scalar(sc), w);
}

void swag_collect_cuda(at::TensorList params, const at::Tensor& mean, const std::optional<at::Tensor>& sq_mean,
                       const std::optional<at::Tensor>& deviation, int64_t n) {
  const int64_t total = check_swag_collect(params, mean, sq_mean, deviation, n, c10::DeviceType::CUDA);
  if (params.empty() || total == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto ps = contiguous_list(params);  // read-only stand-ins for non-contiguous params
  // group by parameter dtype: one launch per dtype present, each covering all its tensors
  std::vector<int64_t> offsets(ps.size());
  int64_t off = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    offsets[i] = off;
    off += ps[i].numel();
  }
  const auto dev_type = deviation.has_value() ? deviation->scalar_type() : mean.scalar_type();
  for (const auto pt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<at::Tensor> plist, mlist;
    for (size_t i = 0; i < ps.size(); ++i) {
      if (ps[i].scalar_type() != pt || ps[i].numel() == 0) continue;
      plist.push_back(ps[i]);
      mlist.push_back(mean.narrow(0, offsets[i], ps[i].numel()));
    }
    if (plist.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "swag_collect_cuda_state", [&] {
      using state_t = scalar_t;
      const state_t w = state_t(1) / static_cast<state_t>(n + 1);
      state_t* mp = mean.data_ptr<state_t>();
      state_t* sp = sq_mean.has_value() ? sq_mean->data_ptr<state_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dev_type, "swag_collect_cuda_dev", [&] {
        using d_t = scalar_t;
        d_t* dp = deviation.has_value() ? deviation->data_ptr<d_t>() : nullptr;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "swag_collect_cuda_param", [&] {
          using p_t = scalar_t;
          const std::array<const std::vector<at::Tensor>*, 2> lists{&plist, &mlist};
          multi_tensor_apply<2>(lists, [&](const auto& tab, int nblocks) {
            using Table = std::decay_t<decltype(tab)>;
            swag_collect_kernel<p_t, state_t, d_t, Table><<<nblocks, kThreads, 0, stream>>>(tab, mp, sp, dp, w);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("swag_collect_", &swag_collect_cuda); }

}  // namespace pyfastbayes::cuda
