// The CUDA side of the multi-tensor launcher: ONE kernel launch covers many tensors of a list,
// and the vector-access helpers its kernels share.
//
// The table of tensor addresses travels as a __grid_constant__ kernel parameter (CUDA >= 12.1
// allows 32 KB of parameters), so a launch needs no host-to-device copy and can be captured in a
// CUDA graph. The table's capacity is a template argument, chosen per launch from the number of
// tensors still to launch (kTableCaps: 1, 8, 64 or 512 slots), so a launch over one tensor passes
// a parameter block of a few dozen bytes instead of the ~24 KB of a 512-slot table. Each CUDA
// block owns one chunk of kChunk elements of one tensor; it finds its tensor by binary search over
// the prefix sums of chunk counts (no search with one slot). More than kMaxTensors tensors are
// split into several launches, as is a group whose chunk count would pass 2^30.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdint>
#include <vector>

#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {

constexpr int64_t kChunk = 1 << 14;  // elements per CUDA block; a multiple of 8 (vector steps, Philox blocks)
constexpr int kMaxTensors = 512;     // the largest table capacity

// NL lists (e.g. params, grads, state) of up to Cap tensors each
template <int NL, int Cap>
struct TensorTable {
  static constexpr int kLists = NL;
  static constexpr int kCap = Cap;
  void* ptr[NL][Cap];
  int64_t numel[Cap];
  int64_t offset[Cap];           // Philox stream index of the tensor's element 0 (0 unless the caller sets it)
  int32_t stream[Cap];           // Philox stream id: the tensor's index in the caller's list
  int32_t block_start[Cap + 1];  // prefix sums of chunk counts; block_start[n] = #blocks
  int32_t n;
};
// the largest table in use (4 lists: vi_kl_backward; ~28 KB) with room for a few pointer arguments
static_assert(sizeof(TensorTable<4, kMaxTensors>) < 32000, "table must fit the 32 KB kernel-parameter limit");

// index of the tensor owning CUDA block `b`: the largest t with block_start[t] <= b
template <int NL, int Cap>
__device__ __forceinline__ int find_tensor(const TensorTable<NL, Cap>& tab, int b) {
  if constexpr (Cap == 1) {
    return 0;
  } else {
    int lo = 0, hi = tab.n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tab.block_start[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
}

// Fills one table of capacity Cap from todo[pos...] (indices of non-empty tensors), calls
// launch(table, n_blocks) and returns the position after the last tensor it took.
// offsets: one per tensor of the lists (its table slot's `offset`), or empty (all 0).
template <int NL, int Cap, class Launch>
size_t launch_group(const std::array<const std::vector<at::Tensor>*, NL>& lists, const std::vector<size_t>& todo,
                    size_t pos, Launch& launch, c10::ArrayRef<int64_t> offsets) {
  TensorTable<NL, Cap> tab;
  tab.n = 0;
  tab.block_start[0] = 0;
  for (; pos < todo.size() && tab.n < Cap; ++pos) {
    const size_t i = todo[pos];
    const int64_t chunks = ((*lists[0])[i].numel() + kChunk - 1) / kChunk;
    if (tab.n > 0 && int64_t(tab.block_start[tab.n]) + chunks > (int64_t(1) << 30)) break;  // next launch
    for (int l = 0; l < NL; ++l) tab.ptr[l][tab.n] = (*lists[l])[i].data_ptr();
    tab.numel[tab.n] = (*lists[0])[i].numel();
    tab.offset[tab.n] = offsets.empty() ? 0 : offsets[i];
    tab.stream[tab.n] = static_cast<int32_t>(i);
    tab.block_start[tab.n + 1] = tab.block_start[tab.n] + static_cast<int32_t>(chunks);
    ++tab.n;
  }
  launch(tab, tab.block_start[tab.n]);
  return pos;
}

// Call launch(table, n_blocks) for consecutive groups of the non-empty tensors of `lists` (NL
// lists of equal length; each tensor's elements are read as one flat array from data_ptr(), so
// the caller passes contiguous tensors or dense ones sharing one memory order; all on one device).
// launch is a generic lambda: the table's type (TensorTable<NL, Cap>) differs between groups.
// offsets: empty, or one value per tensor of the lists, passed to the kernel in the table
// (TensorTable::offset: e.g. the SG-MCMC steps' Philox index of each tensor's element 0).
template <int NL, class Launch>
void multi_tensor_apply(const std::array<const std::vector<at::Tensor>*, NL>& lists, Launch&& launch,
                        c10::ArrayRef<int64_t> offsets = {}) {
  TORCH_CHECK(offsets.empty() || offsets.size() == lists[0]->size(), "multi_tensor_apply: ", offsets.size(),
              " offsets for ", lists[0]->size(), " tensors");
  std::vector<size_t> todo;
  for (size_t i = 0; i < lists[0]->size(); ++i) {
    const int64_t numel = (*lists[0])[i].numel();
    if (numel == 0) continue;
    TORCH_CHECK((numel + kChunk - 1) / kChunk < (int64_t(1) << 30), "multi_tensor_apply: tensor ", i,
                " is too large");
    todo.push_back(i);
  }
  for (size_t pos = 0; pos < todo.size();) {
    const size_t left = todo.size() - pos;  // the smallest capacity that takes them all, up to 512
    if (left <= 1) pos = launch_group<NL, 1>(lists, todo, pos, launch, offsets);
    else if (left <= 8) pos = launch_group<NL, 8>(lists, todo, pos, launch, offsets);
    else if (left <= 64) pos = launch_group<NL, 64>(lists, todo, pos, launch, offsets);
    else pos = launch_group<NL, kMaxTensors>(lists, todo, pos, launch, offsets);
  }
}

// ------------------------------------------------------------------------------------------------
// Vector accesses. N consecutive elements of T move as pieces of min(16, N * sizeof(T)) bytes:
// one 16-byte access for 4 fp32 or 8 fp16/bf16, two for 4 fp64, one 8-byte access for 4 fp16.
// A pointer qualifies when it is aligned to the piece size (16 bytes for fp64, not 32).
// ------------------------------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename T, int N>
struct VecAccess {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static constexpr int kPieceBytes = kBytes < 16 ? kBytes : 16;
  static constexpr int kPerPiece = kPieceBytes / static_cast<int>(sizeof(T));  // elements per access
  static_assert(kBytes % kPieceBytes == 0 && kPieceBytes % sizeof(T) == 0, "whole pieces of whole elements");
  using Piece = AlignedVec<T, kPerPiece>;

  // whether x + c can be accessed in pieces (aligned to the piece size); integer arithmetic, so
  // c may point past a short tensor's end (only the address is looked at)
  __device__ __forceinline__ static bool aligned(const T* x, int c = 0) {
    return (reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>(c) * sizeof(T)) % kPieceBytes == 0;
  }
  // out[0..N) = x[0..N): pieces when vec (x must then be aligned), else N scalar loads
  __device__ __forceinline__ static void load(const T* x, bool vec, T (&out)[N]) {
    if (vec) {
#pragma unroll
      for (int q = 0; q < N / kPerPiece; ++q) {
        const Piece v = reinterpret_cast<const Piece*>(x)[q];
#pragma unroll
        for (int k = 0; k < kPerPiece; ++k) out[q * kPerPiece + k] = v.v[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = x[k];
    }
  }
  __device__ __forceinline__ static void store(T* x, bool vec, const T (&in)[N]) {
    if (vec) {
#pragma unroll
      for (int q = 0; q < N / kPerPiece; ++q) {
        Piece v;
#pragma unroll
        for (int k = 0; k < kPerPiece; ++k) v.v[k] = in[q * kPerPiece + k];
        reinterpret_cast<Piece*>(x)[q] = v;
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) x[k] = in[k];
    }
  }
};

// How a CUDA block splits its chunk [begin, end) of one tensor, all of whose arrays are indexed
// alike (element e of every pointer belongs together): a scalar head [begin, vbegin), vector
// steps of kStep elements on [vbegin, vend), a scalar tail [vend, end). vbegin = begin + head,
// with `head` in [0, kStep) chosen by the kernel so that as many of its pointers as possible are
// aligned at vbegin (they are then aligned at every step: kChunk and kStep are multiples of the
// piece sizes). A pointer not aligned there is read and written with scalar accesses inside the
// same steps, so a tensor is never left to an all-scalar loop because of one odd pointer.
template <int kStep>
struct ChunkSplit {
  int64_t begin, vbegin, vend, end;
  __device__ __forceinline__ ChunkSplit(int64_t b, int64_t e, int head) : begin(b), end(e) {
    vbegin = b + head < e ? b + head : e;
    vend = vbegin + (e - vbegin) / kStep * kStep;
  }
  // the scalar elements: head then tail, fewer than 2 kStep
  __device__ __forceinline__ int n_scalar() const { return static_cast<int>(vbegin - begin + end - vend); }
  __device__ __forceinline__ int64_t scalar(int s) const {
    const int nh = static_cast<int>(vbegin - begin);
    return s < nh ? begin + s : vend + (s - nh);
  }
};

}  // namespace pyfastbayes::cuda
