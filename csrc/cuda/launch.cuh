// Launch geometry and warp-level reductions shared by every CUDA kernel of pyfastbayes.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace pyfastbayes::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel

// blocks of `per_block` work items covering n items
inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) { return (n + per_block - 1) / per_block; }

// a grid-stride kernel's grid: enough blocks for n items, at most `per_sm` blocks per SM
inline int64_t resident_blocks_for(int64_t n, int64_t per_block, int per_sm = 8) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::min<int64_t>(blocks_for(n, per_block), int64_t(sms) * per_sm);
}

// Reductions over an aligned group of G lanes of a warp (G a power of two <= 32) with xor
// shuffles: every lane of the group ends with the result. All 32 lanes must call them.
__device__ __forceinline__ void group_max_arg(double& v, int64_t& arg, int G) {
  for (int off = G / 2; off > 0; off >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, off);
    if (ov > v || (ov == v && oa < arg)) {  // larger value wins; ties keep the lowest index
      v = ov;
      arg = oa;
    }
  }
}
__device__ __forceinline__ double group_sum(double v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ double group_max(double v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
// Sum of v over the block (blockDim.x = kThreads) in a fixed order: each warp by xor shuffles,
// then warp 0 over the warp sums. The result is valid in thread 0 only; every thread must call it
// (it holds a __syncthreads).
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sum[kThreads / 32];
  v = group_sum(v, 32);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) warp_sum[warp] = v;
  __syncthreads();
  if (warp == 0) v = group_sum(lane < kThreads / 32 ? warp_sum[lane] : 0.0, 32);
  return v;
}
__device__ __forceinline__ int group_or(int v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace pyfastbayes::cuda
