// CUDA kernel of swag_collect_ (math in common/swag.h): one launch per parameter dtype present
// (usually one) over every tensor of the list, through the multi-tensor launcher
// (multi_tensor.cuh). List 1 of the table holds views of `mean` at each tensor's flat offset, so
// the kernel recovers the offset from the pointer and addresses sq_mean and the deviation row with
// it. 4 elements per thread step, aligned vector accesses where every pointer allows, scalar tail
// otherwise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
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
template <typename T, typename state_t, typename d_t>
__global__ void __launch_bounds__(kThreads)
    swag_collect_kernel(const __grid_constant__ TensorTable<2> tab, state_t* __restrict__ mean,
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
  const bool aligned = is_aligned<T, 4>(p) && is_aligned<state_t, 4>(m) && (!has_sq || is_aligned<state_t, 4>(s)) &&
                       (d == nullptr || is_aligned<d_t, 4>(d));
  if (!aligned) {  // e.g. tensors after an odd-sized bias: coalesced scalar accesses
    for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) swag_collect_update(p, m, s, has_sq, d, e, w);
    return;
  }
  using VP = AlignedVec<T, 4>;
  using VS = AlignedVec<state_t, 4>;
  using VD = AlignedVec<d_t, 4>;
  for (int64_t i = begin + 4 * int64_t(threadIdx.x); i < end; i += 4 * kThreads) {
    if (i + 4 <= end) {
      const VP pv = *reinterpret_cast<const VP*>(p + i);
      VS mv = *reinterpret_cast<const VS*>(m + i);
      VS sv;
      if (has_sq) sv = *reinterpret_cast<const VS*>(s + i);
      VD dv;
#pragma unroll
      for (int k = 0; k < 4; ++k) swag_collect_update(pv.v, mv.v, sv.v, has_sq, dv.v, k, w);
      *reinterpret_cast<VS*>(m + i) = mv;
      if (has_sq) *reinterpret_cast<VS*>(s + i) = sv;
      if (d != nullptr) *reinterpret_cast<VD*>(d + i) = dv;
    } else {
      for (int64_t e = i; e < end; ++e) swag_collect_update(p, m, s, has_sq, d, e, w);
    }
  }
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
          multi_tensor_apply<2>(lists, [&](const TensorTable<2>& tab, int nblocks) {
            swag_collect_kernel<p_t, state_t, d_t><<<nblocks, kThreads, 0, stream>>>(tab, mp, sp, dp, w);
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
