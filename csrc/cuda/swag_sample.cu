// CUDA kernel of swag_sample (math in common/swag.h).
//
// Work split. A CUDA block owns kCols = 64 consecutive columns j (blockIdx.x) and walks "rounds"
// of R consecutive draws. Its 256 threads are kGroups = 4 groups of 64 (two whole warps each):
// thread (g, c) owns column col0 + c and the St draws r0 + g St .. r0 + g St + St - 1 of the
// round that starts at draw r0, accumulating acc[s] = sum_k z2[s, k] D[k, j] in registers in
// state_t. St = 16 for fp32 state and 8 for fp64 state, so R = 4 St = 64 or 32, both halved when
// S <= R / 2 (draw_tile_for: otherwise S = 32 would leave two of the four groups idle); with
// __launch_bounds__(256, 4) every variant fits 64 registers without spilling (ptxas -v). The
// block takes rounds blockIdx.y, blockIdx.y + gridDim.y, ... of the nR = ceil(S / R) rounds.
//
// How often D is read. The block copies its slice of D (its 64 columns of Kc rows, in D's own
// dtype) into shared memory with coalesced row reads, and every round it runs consumes it there.
// Kc is the number of rows that fit next to the 8.5 KiB z2 stage in 48 KiB: 158 rows of fp32 D,
// 79 of fp64, 316 of fp16 / bf16 (either state dtype); more next to the 4.5 KiB stage of the
// halved draw tile. Exactly:
//   * K == 0: D is not read (gridDim.y = nR, one round per block).
//   * K <= Kc: each block loads its slice once, before its first round, so D is read from global
//     memory gy = gridDim.y times in all: gy = 1 (D read once) whenever gx = ceil(P / 64) >=
//     kMinBlocks = 512 (P > 32704). For smaller P, where the column blocks alone would not fill
//     the GPU, gy = min(nR, ceil(512 / gx)) block rows split the rounds and each reads the (then
//     small: at most K x 32704 elements) D once more; those repeated reads mostly hit L2.
//   * K > Kc: D goes through shared memory in chunks of Kc rows rounded down to a multiple of 32
//     (128 fp32 / 64 fp64 / 288 fp16, bf16), reloaded by every round: D is read nR times.
//
// z2 [S, K] (float, drawn first by swag_lowrank_noise_kernel) is staged per round, kKTile = 32
// k-rows at a time, into zs[kk][ss] in state_t (pitch R + L, L = 16 bytes / sizeof(state_t)).
// The copy walks bands of 8 k-rows: lanes 8q .. 8q + 7 of a warp read 8 consecutive floats of one
// z2 row (one 32-byte sector, two where the row segment is not sector-aligned) and the warp's
// store lands in distinct bank slots (layout comment at zs_pitch). z2 itself (S K floats, small
// next to D and the output) is read gx times, once per column block, mostly from L2. The inner loop reads zs[kk][g St + s .. + L - 1] as one 16-byte vector: all lanes
// of a warp (one group) read the same address, a broadcast. D[kk][c] comes from shared memory
// as consecutive elements per lane, also conflict-free. The sum runs in k order, like the CPU
// kernel's: acc[s] += z2[s, k] D[k, j] for k = 0, 1, ..., K - 1.
//
// z1 comes from Philox in-kernel, the same streams as the CPU kernel (draw s: stream
// kSwagDiagStream + s, block (offset + j) / 4, lane (offset + j) % 4). Aligned offset (offset % 4
// == 0, every whole-vector call and the DDP column shards): the 4 threads of a column quad share
// one Philox block, each computes it for ONE draw (4 normals for the quad's 4 columns) and a 4x4
// transpose by warp shuffles hands every thread its column's normal of 4 draws: one Philox call
// per 4 outputs. Unaligned offset (a piece of a vector starting anywhere, e.g. an FSDP2 local
// shard): a quad's columns straddle two Philox blocks, so every thread computes the block of its
// own column for each of its draws and keeps lane (offset + j) % 4 (4 Philox calls per 4
// outputs, no shuffles). offset is a kernel argument, so the choice is uniform over the grid. A
// warp is one group, so the draw loop's bounds are uniform over the warp and every lane (also
// those of columns >= P) takes part in the shuffles; loads and stores are guarded by j < P and
// s < S.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks/common.h"
#include "checks/swag.h"
#include "common/philox.h"
#include "common/swag.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

constexpr int kCols = 64;                   // columns per CUDA block
constexpr int kGroups = kThreads / kCols;   // draw groups per CUDA block (4)
constexpr int kKTile = 32;                  // k-rows of z2 staged in shared memory at a time
constexpr int kBand = 8;                    // k-rows per band of the z2 staging copy
constexpr int kMinBlocks = 512;             // below this many column blocks, blockIdx.y splits the draws
constexpr int kSmemBytes = 48 * 1024;       // static + dynamic shared memory per block (no opt-in needed)
constexpr int kBlocksPerSm = 4;             // register budget: 64 per thread (4 x 48 KiB of shared memory fit too)
static_assert(kThreads % kCols == 0 && kCols % 32 == 0, "a warp must lie inside one draw group");
static_assert(kKTile % kBand == 0, "the z2 stage is whole bands");

// Draws per thread (St, the register accumulators): a template parameter of the kernel, chosen per
// call (draw_tile_for) so that the 4 draw groups of a block all have draws: St = 16 (fp32 state)
// or 8 (fp64) for many draws; 8 or 4 when S <= 4 St / 2 (S = 32 with St = 16 left two of the
// four groups idle). ptxas -v: no variant spills, each stays at <= 64 registers (4 blocks of 256
// threads per SM).
template <typename state_t>
constexpr int max_draw_tile() {
  return sizeof(state_t) == 8 ? 8 : 16;
}
template <typename state_t>
int draw_tile_for(int64_t S) {
  return S <= kGroups * max_draw_tile<state_t>() / 2 ? max_draw_tile<state_t>() / 2 : max_draw_tile<state_t>();
}
constexpr int round_draws(int St) { return kGroups * St; }  // R: draws per round of a block
// z2 is staged in state_t (converted from float once here, not in the inner loop). A warp's
// store of 4-byte elements is served in one wavefront of 32 lanes, of 8-byte elements in two of
// 16 lanes; a wavefront is conflict-free when its lanes hit distinct slots of the W = 128 bytes /
// sizeof(state_t) element slots (32 or 16) of the 32 banks. A wavefront of the staging copy
// holds kBand = 8 k-rows x L = W / 8 draws (L = 4 or 2); with R a multiple of W and the pitch
// Rp = R + L, element (kk, ss) sits in slot (L kk + ss) mod W: all W distinct. Rp sizeof(state_t)
// (144 or 272 bytes) keeps every row 16-byte aligned for the broadcast vector loads (L elements).
template <typename state_t>
constexpr int zs_lanes() {
  return 16 / static_cast<int>(sizeof(state_t));  // elements per 16-byte vector: 4 or 2
}
template <typename state_t, int St>
constexpr int zs_pitch() {
  return round_draws(St) + zs_lanes<state_t>();
}
template <typename state_t, int St>
constexpr int zs_bytes() {
  return kKTile * zs_pitch<state_t, St>() * static_cast<int>(sizeof(state_t));
}
template <typename state_t, int St>
constexpr bool zs_layout_ok() {
  // slots: 4-byte banks / element words = elements of one store wavefront; L draws per wavefront
  constexpr int slots = 128 / static_cast<int>(sizeof(state_t)), L = slots / kBand;
  return L == zs_lanes<state_t>() && round_draws(St) % slots == 0 && zs_pitch<state_t, St>() % slots == L &&
         (zs_pitch<state_t, St>() * sizeof(state_t)) % 16 == 0 && kBand * L == slots && St % L == 0;
}
static_assert(zs_layout_ok<float, 16>() && zs_layout_ok<float, 8>() && zs_layout_ok<double, 8>() &&
                  zs_layout_ok<double, 4>(),
              "the z2 stage layout of the header comment");

// acc[0..L) += z[0..L) * d with one 16-byte shared-memory load (L = 4 floats or 2 doubles)
__device__ __forceinline__ void axpy_vec(float* acc, const float* z, float d) {
  const float4 v = *reinterpret_cast<const float4*>(z);
  acc[0] += v.x * d;
  acc[1] += v.y * d;
  acc[2] += v.z * d;
  acc[3] += v.w * d;
}
__device__ __forceinline__ void axpy_vec(double* acc, const double* z, double d) {
  const double2 v = *reinterpret_cast<const double2*>(z);
  acc[0] += v.x * d;
  acc[1] += v.y * d;
}

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

// K: rows of D; Kc: rows of D resident in shared memory at a time (Kc == K: the whole slice,
// loaded once per block; otherwise a multiple of kKTile, reloaded every round). nR = ceil(S / R).
template <typename state_t, typename d_t, bool kLowRank, int St>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    swag_sample_kernel(const state_t* __restrict__ mean, const state_t* __restrict__ sq, const d_t* __restrict__ D,
                       int64_t ldD, int K, int Kc, const float* __restrict__ z2, int64_t P, int S, int nR,
                       state_t* __restrict__ out, state_t c_diag, state_t c_low, state_t eps, uint64_t seed,
                       uint32_t step, int64_t offset) {
  constexpr int R = round_draws(St);
  constexpr int Rp = zs_pitch<state_t, St>();
  __shared__ __align__(16) state_t zs[kKTile * Rp];        // z2 stage: zs[kk * Rp + ss]
  extern __shared__ __align__(16) unsigned char smem[];    // D slice: Ds[k * kCols + c], Kc rows
  d_t* Ds = reinterpret_cast<d_t*>(smem);

  const int g = threadIdx.x / kCols, c = threadIdx.x % kCols;
  const int64_t col0 = int64_t(blockIdx.x) * kCols;
  const int64_t j = col0 + c;  // column; j % 4 == threadIdx.x % 4 (col0 % 4 == 0)
  const bool valid = j < P;
  state_t m = 0, sg = 0;
  if (valid) {
    m = mean[j];
    sg = swag_sigma(m, sq[j], eps);
  }
  const int r = threadIdx.x & 3;                                   // j % 4 (col0 % 4 == 0)
  const bool aligned = (offset & 3) == 0;                           // uniform over the grid
  const uint64_t block4 = static_cast<uint64_t>(offset + j) >> 2;  // Philox block of column j's normal
  const int lane = static_cast<int>((offset + j) & 3);              // its lane there (== r when aligned)
  const int nDc = kLowRank ? (K + Kc - 1) / Kc : 0;                // row chunks of D

  for (int rnd = blockIdx.y; rnd < nR; rnd += gridDim.y) {  // uniform over the CUDA block
    const int r0 = rnd * R;               // first draw of the round
    const int s_begin = r0 + g * St;       // this group's first draw
    const int s_count = min(St, S - s_begin);  // may be <= 0: the group idles but joins the barriers
    state_t acc[St];
#pragma unroll
    for (int s = 0; s < St; ++s) acc[s] = 0;
    if constexpr (kLowRank) {
      for (int dc = 0; dc < nDc; ++dc) {
        const int kd0 = dc * Kc, kdn = min(Kc, K - kd0);
        if (nDc > 1 || rnd == static_cast<int>(blockIdx.y)) {
          __syncthreads();  // every thread is done with the previous chunk
          // coalesced: consecutive threads read consecutive columns of one row of D
#pragma unroll 1
          for (int idx = threadIdx.x; idx < kdn * kCols; idx += kThreads) {
            const int kk = idx / kCols, cc = idx % kCols;
            Ds[idx] = (col0 + cc < P) ? D[int64_t(kd0 + kk) * ldD + col0 + cc] : d_t(0);
          }
          // made visible by the barrier after the z2 stage below (kdn >= 1)
        }
        for (int kz0 = 0; kz0 < kdn; kz0 += kKTile) {
          const int kn = min(kKTile, kdn - kz0);
          const int nstage = (kn + kBand - 1) / kBand * kBand * R;  // whole bands of 8 k-rows x R draws
          __syncthreads();  // every thread is done with the previous stage
#pragma unroll 1
          for (int idx = threadIdx.x; idx < nstage; idx += kThreads) {
            // band b: k-rows 8b..8b+7; inside a band lane groups of 8 walk k (consecutive floats of
            // z2 row r0 + ss) and 4 such groups of a warp take 4 consecutive draws
            const int b = idx / (kBand * R), w = idx - b * (kBand * R);
            const int ss = w / kBand, kk = b * kBand + w % kBand;
            const int s = r0 + ss;
            zs[kk * Rp + ss] =
                (kk < kn && s < S) ? static_cast<state_t>(z2[int64_t(s) * K + kd0 + kz0 + kk]) : state_t(0);
          }
          __syncthreads();
          const state_t* zg = zs + g * St;
          const d_t* dcol = Ds + kz0 * kCols + c;
#pragma unroll 1
          for (int kk = 0; kk < kn; ++kk) {
            const state_t dv = static_cast<state_t>(dcol[kk * kCols]);
            const state_t* zr = zg + kk * Rp;  // broadcast: one address for the whole warp
#pragma unroll
            for (int s = 0; s < St; s += zs_lanes<state_t>()) axpy_vec(acc + s, zr + s, dv);
          }
        }
      }
    }
    // z1 and the output, 4 draws per step. s_count is uniform over the warp (one group), so every
    // lane takes part in the shuffles. Not unrolled (one copy of Philox, no interleaving of
    // several Philox chains): the step uses acc[0..3] and then shifts the accumulators down by 4
    // (register moves), so every index into acc stays a compile-time constant.
#pragma unroll 1
    for (int s0 = 0; s0 < s_count; s0 += 4) {
      float v[4], wz[4];
      if (aligned) {
        philox_normal4(seed, block4, kSwagDiagStream + static_cast<uint32_t>(s_begin + s0 + r), step, v);
        // 4x4 transpose inside the quad: lane r ends with wz[q] = normal of draw s_begin + s0 + q at column j
#pragma unroll
        for (int dlt = 0; dlt < 4; ++dlt) {
          const float got = __shfl_xor_sync(0xffffffffu, pick4(v, r ^ dlt), dlt);
#pragma unroll
          for (int q = 0; q < 4; ++q)
            if (q == (r ^ dlt)) wz[q] = got;
        }
      } else {
        // column j's own block for each of the 4 draws (one Philox copy: the q loop is not
        // unrolled, the write into wz stays at compile-time indices)
#pragma unroll 1
        for (int q = 0; q < 4; ++q) {
          philox_normal4(seed, block4, kSwagDiagStream + static_cast<uint32_t>(s_begin + s0 + q), step, v);
          const float got = pick4(v, lane);
#pragma unroll
          for (int qq = 0; qq < 4; ++qq)
            if (qq == q) wz[qq] = got;
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (valid && s0 + q < s_count)
          out[int64_t(s_begin + s0 + q) * P + j] = swag_draw(m, sg, wz[q], acc[q], c_diag, c_low);
      }
#pragma unroll
      for (int q = 0; q + 4 < St; ++q) acc[q] = acc[q + 4];
    }
  }
}

// One kernel launch for draw tile St (the dispatch of swag_sample_cuda).
template <typename state_t, int St>
void launch_sample(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D, int64_t K,
                   int64_t P, int64_t n_draws, double scale, double eps, uint64_t useed, uint32_t ustep,
                   int64_t offset, const at::Tensor& z2, at::Tensor& out) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t gx = blocks_for(P, kCols);
  const auto coef = swag_coefficients(scale, K);
  const state_t c_diag = static_cast<state_t>(coef.diag), c_low = static_cast<state_t>(coef.lowrank);
  const int64_t nR = (n_draws + round_draws(St) - 1) / round_draws(St);  // <= 2^31 / 16
  // the header comment's rule: without D every round is its own block row; with D, the draws
  // are split over blocks only while the columns alone give fewer than kMinBlocks blocks
  const int64_t gy = K == 0 ? nR : gx >= kMinBlocks ? 1 : std::min<int64_t>(nR, (kMinBlocks + gx - 1) / gx);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (K == 0) {
    swag_sample_kernel<state_t, state_t, false, St><<<grid, kThreads, 0, stream>>>(
        mean.data_ptr<state_t>(), sq_mean.data_ptr<state_t>(), nullptr, 0, 0, 1, nullptr, P,
        static_cast<int>(n_draws), static_cast<int>(nR), out.data_ptr<state_t>(), c_diag, c_low,
        static_cast<state_t>(eps), useed, ustep, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, D->scalar_type(), "swag_sample_cuda_D", [&] {
    using d_t = scalar_t;
    // rows of D that fit next to the z2 stage; a chunked slice takes whole z2 stages
    constexpr int64_t fit = (kSmemBytes - zs_bytes<state_t, St>()) / (kCols * static_cast<int64_t>(sizeof(d_t)));
    static_assert((kSmemBytes - zs_bytes<state_t, St>()) / (kCols * 8) >= kKTile, "a D chunk holds one z2 stage");
    const int64_t Kc = K <= fit ? K : fit / kKTile * kKTile;
    const size_t dyn = static_cast<size_t>(Kc * kCols) * sizeof(d_t);
    swag_sample_kernel<state_t, d_t, true, St><<<grid, kThreads, dyn, stream>>>(
        mean.data_ptr<state_t>(), sq_mean.data_ptr<state_t>(), D->data_ptr<d_t>(), D->stride(0),
        static_cast<int>(K), static_cast<int>(Kc), z2.data_ptr<float>(), P, static_cast<int>(n_draws),
        static_cast<int>(nR), out.data_ptr<state_t>(), c_diag, c_low, static_cast<state_t>(eps), useed, ustep,
        offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor swag_sample_cuda(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D,
                            int64_t n_draws, double scale, double eps, int64_t seed, int64_t step, int64_t offset) {
  const int64_t K = check_swag_sample(mean, sq_mean, D, n_draws, scale, eps, offset, c10::DeviceType::CUDA);
  const int64_t P = mean.numel();
  TORCH_CHECK(K < (int64_t(1) << 31), "swag_sample: too many rows in D");
  const c10::cuda::CUDAGuard guard(mean.device());
  auto out = at::empty({n_draws, P}, mean.options());
  if (n_draws == 0 || P == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();  // the low-rank noise kernel's
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
  const int64_t gx = blocks_for(P, kCols);
  TORCH_CHECK(gx < (int64_t(1) << 31), "swag_sample: too many columns (", P, ")");
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "swag_sample_cuda_state", [&] {
    using state_t = scalar_t;
    constexpr int kTile = max_draw_tile<state_t>();
    if (draw_tile_for<state_t>(n_draws) == kTile)
      launch_sample<state_t, kTile>(mean, sq_mean, D, K, P, n_draws, scale, eps, useed, ustep, offset, z2, out);
    else
      launch_sample<state_t, kTile / 2>(mean, sq_mean, D, K, P, n_draws, scale, eps, useed, ustep, offset, z2, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("swag_sample", &swag_sample_cuda); }

}  // namespace pyfastbayes::cuda
