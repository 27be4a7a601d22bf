// CUDA kernel of swag_sample (math in common/swag.h).
//
// One thread per column j, a tile of kSTile draws per blockIdx.y. The low-rank
// accumulators acc[s] = sum_k z2[s, k] D[k, j] live in registers: D[k, j] is read once per tile
// (once in all for S <= 32) and z2 (tiny, [S, K]) is staged through shared memory. z1 comes from
// Philox in-kernel: the 4 threads of a column quad each compute one Philox block (4 normals of
// ONE draw for the quad's 4 columns) and a 4x4 transpose by warp shuffles hands every thread its
// column's normal of 4 draws: one Philox call per 4 outputs, the same stream as the CPU kernel.
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

namespace pyfastbayes::cuda {
namespace {

constexpr int kSTile = 32;  // draws per blockIdx.y (register accumulators per thread)
constexpr int kKTile = 32;  // rows of z2 staged in shared memory at a time

// z2 [S, K]: element i = s * K + k of the stream (seed, kSwagLowRankStream, step)
__global__ void swag_lowrank_noise_kernel(float* __restrict__ z2, int64_t n, uint64_t seed, uint32_t step) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (4 * b >= n) return;
  float z[4];
  philox_normal4(seed, static_cast<uint64_t>(b), kSwagLowRankStream, step, z);
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (4 * b + q < n) z2[4 * b + q] = z[q];
}

__device__ __forceinline__ float pick4(const float v[4], int i) {
  return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
}

template <typename state_t, typename d_t, bool kLowRank>
__global__ void __launch_bounds__(kThreads)
    swag_sample_kernel(const state_t* __restrict__ mean, const state_t* __restrict__ sq, const d_t* __restrict__ D,
                       int64_t ldD, int K, const float* __restrict__ z2, int64_t P, int S, state_t* __restrict__ out,
                       state_t c_diag, state_t c_low, state_t eps, uint64_t seed, uint32_t step, int64_t offset) {
  __shared__ float zs[kKTile][kSTile];
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // column; j % 4 == threadIdx.x % 4
  const bool valid = j < P;
  const int s_begin = blockIdx.y * kSTile;
  const int s_count = min(kSTile, S - s_begin);
  state_t m = 0, sg = 0;
  if (valid) {
    m = mean[j];
    sg = swag_sigma(m, sq[j], eps);
  }
  state_t acc[kSTile];
#pragma unroll
  for (int s = 0; s < kSTile; ++s) acc[s] = 0;
  if constexpr (kLowRank) {
    for (int k0 = 0; k0 < K; k0 += kKTile) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kKTile * kSTile; idx += kThreads) {
        const int kk = idx / kSTile, ss = idx % kSTile;
        zs[kk][ss] = (k0 + kk < K && ss < s_count) ? z2[int64_t(s_begin + ss) * K + k0 + kk] : 0.0f;
      }
      __syncthreads();
      const int kn = min(kKTile, K - k0);
      for (int kk = 0; kk < kn; ++kk) {
        const state_t dv = valid ? static_cast<state_t>(D[int64_t(k0 + kk) * ldD + j]) : state_t(0);
#pragma unroll
        for (int s = 0; s < kSTile; ++s) acc[s] += static_cast<state_t>(zs[kk][s]) * dv;
      }
    }
  }
  // z1: no thread has returned, so every lane of the warp takes part in the shuffles
  const int r = threadIdx.x & 3;
  const uint64_t block4 = static_cast<uint64_t>(offset + j) >> 2;  // offset % 4 == 0
#pragma unroll
  for (int s0 = 0; s0 < kSTile; s0 += 4) {
    if (s0 < s_count) {  // uniform over the CUDA block
      float v[4], w[4];
      philox_normal4(seed, block4, kSwagDiagStream + static_cast<uint32_t>(s_begin + s0 + r), step, v);
      // 4x4 transpose inside the quad: lane r ends with w[q] = normal of draw s0 + q at column j
#pragma unroll
      for (int dlt = 0; dlt < 4; ++dlt) {
        const float got = __shfl_xor_sync(0xffffffffu, pick4(v, r ^ dlt), dlt);
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (q == (r ^ dlt)) w[q] = got;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (valid && s0 + q < s_count)
          out[int64_t(s_begin + s0 + q) * P + j] = swag_draw(m, sg, w[q], acc[s0 + q], c_diag, c_low);
      }
    }
  }
}

at::Tensor swag_sample_cuda(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D,
                            int64_t n_draws, double scale, double eps, int64_t seed, int64_t step, int64_t offset) {
  const int64_t K = check_swag_sample(mean, sq_mean, D, n_draws, scale, eps, offset, c10::DeviceType::CUDA);
  const int64_t P = mean.numel();
  TORCH_CHECK(K < (int64_t(1) << 31), "swag_sample: too many rows in D");
  const c10::cuda::CUDAGuard guard(mean.device());
  auto out = at::empty({n_draws, P}, mean.options());
  if (n_draws == 0 || P == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto useed = static_cast<uint64_t>(seed);
  const auto ustep = static_cast<uint32_t>(step);
  at::Tensor z2;
  if (K > 0) {
    const int64_t nz = n_draws * K;
    z2 = at::empty({nz}, mean.options().dtype(at::kFloat));
    const int64_t nblk4 = (nz + 3) / 4;
    swag_lowrank_noise_kernel<<<static_cast<unsigned>(blocks_for(nblk4)), kThreads, 0, stream>>>(
        z2.data_ptr<float>(), nz, useed, ustep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t gx = blocks_for(P);
  TORCH_CHECK(gx < (int64_t(1) << 31), "swag_sample: too many columns (", P, ")");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>((n_draws + kSTile - 1) / kSTile));
  const auto d_type = D.has_value() ? D->scalar_type() : mean.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "swag_sample_cuda_state", [&] {
    using state_t = scalar_t;
    const auto coef = swag_coefficients(scale, K);
    const state_t c_diag = static_cast<state_t>(coef.diag), c_low = static_cast<state_t>(coef.lowrank);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d_type, "swag_sample_cuda_D", [&] {
      using d_t = scalar_t;
      if (K > 0) {
        swag_sample_kernel<state_t, d_t, true><<<grid, kThreads, 0, stream>>>(
            mean.data_ptr<state_t>(), sq_mean.data_ptr<state_t>(), D->data_ptr<d_t>(), D->stride(0),
            static_cast<int>(K), z2.data_ptr<float>(), P, static_cast<int>(n_draws), out.data_ptr<state_t>(), c_diag,
            c_low, static_cast<state_t>(eps), useed, ustep, offset);
      } else {
        swag_sample_kernel<state_t, d_t, false><<<grid, kThreads, 0, stream>>>(
            mean.data_ptr<state_t>(), sq_mean.data_ptr<state_t>(), nullptr, 0, 0, nullptr, P,
            static_cast<int>(n_draws), out.data_ptr<state_t>(), c_diag, c_low, static_cast<state_t>(eps), useed,
            ustep, offset);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("swag_sample", &swag_sample_cuda); }

}  // namespace pyfastbayes::cuda
