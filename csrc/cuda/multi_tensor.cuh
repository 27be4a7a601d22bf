// The CUDA side of the multi-tensor launcher: ONE kernel launch covers every tensor of a list.
//
// The table of tensor addresses travels as a __grid_constant__ kernel parameter (CUDA >= 12.1
// allows 32 KB of parameters), so a launch needs no host-to-device copy and can be captured in a
// CUDA graph. Each CUDA block owns one chunk of kChunk elements of one tensor; it finds its tensor
// by binary search over the prefix sums of chunk counts. More than kMaxTensors tensors (rare:
// 512 per launch) are split into several launches.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdint>
#include <vector>

#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {

constexpr int64_t kChunk = 1 << 14;  // elements per CUDA block; a multiple of 4 (Philox blocks)
constexpr int kMaxTensors = 512;

template <int NL>
struct TensorTable {
  void* ptr[NL][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t stream[kMaxTensors];  // Philox stream id: the tensor's index in the caller's list
  int32_t block_start[kMaxTensors + 1];  // prefix sums of chunk counts; block_start[n] = #blocks
  int32_t n;
};
static_assert(sizeof(TensorTable<3>) < 32000, "table must fit the 32 KB kernel-parameter limit");

// index of the tensor owning CUDA block `b`: the largest t with block_start[t] <= b
template <int NL>
__device__ __forceinline__ int find_tensor(const TensorTable<NL>& tab, int b) {
  int lo = 0, hi = tab.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.block_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Call launch(table, n_blocks) for consecutive groups of non-empty tensors of `lists`
// (NL lists of equal length, all contiguous, on one device).
template <int NL, class Launch>
void multi_tensor_apply(const std::array<const std::vector<at::Tensor>*, NL>& lists, Launch&& launch) {
  const size_t count = lists[0]->size();
  TensorTable<NL> tab;
  tab.n = 0;
  tab.block_start[0] = 0;
  auto flush = [&] {
    if (tab.n > 0) launch(tab, tab.block_start[tab.n]);
    tab.n = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    const int64_t numel = (*lists[0])[i].numel();
    if (numel == 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks < (int64_t(1) << 30), "multi_tensor_apply: tensor ", i, " is too large");
    if (tab.n == kMaxTensors || int64_t(tab.block_start[tab.n]) + chunks > (int64_t(1) << 30)) flush();
    for (int l = 0; l < NL; ++l) tab.ptr[l][tab.n] = (*lists[l])[i].data_ptr();
    tab.numel[tab.n] = numel;
    tab.stream[tab.n] = static_cast<int32_t>(i);
    tab.block_start[tab.n + 1] = tab.block_start[tab.n] + static_cast<int32_t>(chunks);
    ++tab.n;
  }
  flush();
}

// N elements of T as one aligned vector access (16 B for fp32, 8 B for fp16/bf16, 2 x 16 B for fp64)
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

}  // namespace pyfastbayes::cuda
