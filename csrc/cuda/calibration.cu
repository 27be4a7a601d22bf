// CUDA kernel of calibration_bins.
//
// Rows. Top-label with C <= 16: one row per thread (G = 1, row_per_thread: the row's C loads in
// flight at once, no shuffles). Otherwise a "group" of G lanes (G = the power of two >= C, at most
// 32; 32 when class-wise bins use the block histogram below) handles one row, grid-stride over the rows: lane l owns the classes
// c = l, l + G, ...; the row's max / argmax / sums are reduced with xor shuffles (every lane of the
// group ends with the same values). Per-row math in float64, in the same order as the CPU loop
// for each class (sum over the draws s = 0, 1, ...; each draw's softmax exp(x - m) / z).
//  - Register path (each lane owns K <= 8 classes, i.e. C <= 8 G): the lane keeps its classes'
//    sums over the draws in registers; logits: per draw, the lane's logits in registers, one max
//    and one sum-of-exp reduction, one exp per logit. No scratch for any S.
//  - Generic path (C > 256): no per-class state for S = 1 (probabilities: the value is reread when
//    binned; logits: a max pass and a sum-of-exp pass, the top-label confidence is 1 / z, the
//    class-wise values exp(x - m) / z recomputed when binned). S > 1 with logits or class-wise
//    bins needs the per-class sums over the draws: one float64 scratch row of C per group (a lane
//    rereads only its own writes), and only then is the grid capped to keep the scratch near
//    16 MiB (L2-sized). Top-label probabilities with S > 1 need no scratch (max taken on the fly).
// Bins, accumulated without float64 shared-memory atomics (compare-and-swap loops on sm_90) and
// flushed once per block with global float64 atomicAdd (native since sm_60):
//  - top-label: one [B, 3] histogram per warp in shared memory; the warp merges its rows by bin
//    (ballots and one shuffle sum per distinct bin, bin_top_warp) and lane 0 adds each bin once.
//  - class-wise, 8 * C * B * 24 bytes <= 48 KiB: one [C, B, 3] copy per warp, the groups of a
//    warp in turn, each lane writing its own classes (distinct histograms within a group).
//  - class-wise, larger: one copy per block of a tile of classes (blockIdx.y: tiles of as many
//    classes as the device's opt-in shared memory holds, every tile recomputing the rows'
//    statistics), G = 32 (one row per warp); eight rounds split by __syncthreads, in round r warp
//    w writes its classes c with (c / 32) % 8 == (w + r) % 8, so no two lanes of the block write
//    one class in the same round.
//  - more than kMaxTiles tiles (or one class's bins above the opt-in limit), or top-label B above
//    it: global atomics (rare shapes).
// Within a block the order of the additions is fixed (deterministic per block); across blocks the
// global atomics' order is not (results equal the CPU op to rounding; counts exactly). Diag
// counters: one register set per row-holding lane (tile 0 only), one global atomicAdd each.
// The row classification and the bin rule are common/calibration.h (the CPU loop's functions).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks/calibration.h"
#include "common/calibration.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

constexpr int kWarps = kThreads / 32;                        // warps (and block-histogram rounds) per block
constexpr int kRegClasses = 8;                               // classes per lane held in registers
constexpr int kRowPerThread = 16;                        // top-label with C <= this: one row per thread
constexpr int64_t kMaxWorkDoubles = int64_t(2) << 20;        // 16 MiB of per-row scratch (stays in L2)
constexpr int64_t kMaxTiles = 16;                            // class tiles (row recomputations) at most
constexpr size_t kDefaultSmem = 48 * 1024;                   // dynamic shared memory without opt-in
constexpr size_t kBinBytes = kCalibStats * sizeof(double);  // one bin's statistics

enum Mode : int {
  kTopWarp,      // top-label, one histogram per warp in shared memory
  kTopGlobal,    // top-label, B too large for shared memory: global atomics
  kClassWarp,    // class-wise, one copy of every class's histogram per warp
  kClassBlock,   // class-wise, one copy per block of its tile of classes, warps in rounds
  kClassGlobal,  // class-wise, too large to tile: global atomics
};

struct Args {
  const int64_t* y;
  int64_t S, N, C, B;
  bool logits, classwise;
  double tol;
  int G;              // lanes per row
  int mode;           // Mode
  int64_t tile;       // classes per blockIdx.y tile (class-wise); the tile of block y is [y tile, (y + 1) tile)
  double* work;       // generic path scratch [tiles, work_rows, C] or nullptr
  int64_t work_rows;  // scratch rows per tile: the groups that ever get a row, min(gridDim.x * groups, N)
  double* bins;
  double* diag;
};

template <typename scalar_t>
__device__ __forceinline__ double load(const scalar_t* p, int64_t i) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(p[i]));
}

// Register path (C <= G K): lane `lane` owns the classes lane + G k (k < K) and keeps in v[k] the
// sum over the S draws of that class's probability (probabilities: the values; logits: each
// draw's softmax exp(x - m) / z). mx / pred: the max of the lane's v and its class, reduced over
// the group by the caller. Inactive groups (no row) own nothing but join every shuffle.
template <typename scalar_t, int K>
__device__ __forceinline__ RowSummary row_in_registers(const scalar_t* row, const Args& a, int lane, bool active,
                                                       double (&v)[K], double& mx, int64_t& pred) {
  const int64_t stride_s = a.N * a.C;
  bool own[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = 0.0;
    own[k] = active && lane + int64_t(a.G) * k < a.C;
  }
  bool finite = true;
  int neg = 0;
  for (int64_t s = 0; s < a.S; ++s) {
    const scalar_t* rs = row + s * stride_s;
    double x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = own[k] ? load(rs, lane + int64_t(a.G) * k) : -INFINITY;
    if (!a.logits) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (own[k]) {
          neg |= x[k] < 0.0;
          v[k] += x[k];
        }
      continue;
    }
    double m = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (own[k]) m = fmax(m, x[k]);
    m = group_max(m, a.G);
    double z = 0.0;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (own[k]) {
        x[k] = exp(x[k] - m);  // once per logit
        z += x[k];
      }
    z = group_sum(z, a.G);
    finite = finite && isfinite(m) && isfinite(z);
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (own[k]) v[k] += x[k] / z;
  }
  double sum = 0.0;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (own[k]) {
      if (v[k] > mx) {  // strict: ties keep the lowest class
        mx = v[k];
        pred = lane + int64_t(a.G) * k;
      }
      sum += v[k];
    }
  if (a.logits) return {finite, false, 0.0};
  sum = group_sum(sum, a.G) / static_cast<double>(a.S);
  return {static_cast<bool>(isfinite(sum)), group_or(neg, a.G) != 0, sum};
}

// Top-label, one row per thread (G = 1, C <= K): per draw the thread issues its row's C loads
// before any arithmetic, then keeps in v[k] the sum over the draws of class k's probability
// (logits: exp(x - m) / z, each exponential computed twice rather than held, to keep registers
// for occupancy), in the CPU loop's order. mx / pred: the max of v and its class (strict: ties
// keep the lowest class). No shuffles: a row is one thread's.
template <typename scalar_t, int K>
__device__ __forceinline__ RowSummary row_per_thread(const scalar_t* row, const Args& a, bool active, double (&v)[K],
                                                     double& mx, int64_t& pred) {
  const int C = active ? static_cast<int>(a.C) : 0;  // an inactive thread owns nothing
  const int64_t stride_s = a.N * a.C;
  using op_t = at::opmath_type<scalar_t>;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = 0.0;
  bool finite = true;
  int neg = 0;
  for (int64_t s = 0; s < a.S && C > 0; ++s) {
    const scalar_t* rs = row + s * stride_s;
    scalar_t x[K];
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < C) x[k] = rs[k];
    auto val = [&](int k) { return static_cast<double>(static_cast<op_t>(x[k])); };
    if (!a.logits) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (k < C) {
          neg |= val(k) < 0.0;
          v[k] += val(k);
        }
      continue;
    }
    double m = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < C) m = fmax(m, val(k));
    double z = 0.0;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < C) z += exp(val(k) - m);
    finite = finite && isfinite(m) && isfinite(z);
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < C) v[k] += exp(val(k) - m) / z;
  }
  double sum = 0.0;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (k < C) {
      if (v[k] > mx) {
        mx = v[k];
        pred = k;
      }
      sum += v[k];
    }
  if (a.logits) return {finite, false, 0.0};
  sum /= static_cast<double>(a.S);
  return {static_cast<bool>(isfinite(sum)), neg != 0, sum};
}

// Generic path (any C): lane `lane` owns c = lane, lane + G, ... Keeps per-class state only in
// acc (the group's scratch row, non-null exactly when S > 1 and logits or class-wise bins):
// acc[c] = the sum over the draws. Logits with S = 1: m1 / z1 = the row's max logit and sum of
// exp(x - m1); mx / pred then track the max of exp(x - m1) (= 1, its class), the confidence is
// mx / z1 (the CPU's exp(0) / z). The CPU takes the first class of max exp(x - m) / z instead:
// the same class unless another class's exp(x - m) < 1 rounds to 1 / z after the division.
template <typename scalar_t>
__device__ __forceinline__ RowSummary row_generic(const scalar_t* row, const Args& a, int lane, bool active,
                                                  double* acc, double& mx, int64_t& pred, double& m1, double& z1) {
  const int64_t S = a.S, C = a.C, G = a.G, stride_s = a.N * a.C;
  const int64_t first = active ? lane : C;  // an inactive group's lanes loop over nothing
  if (!a.logits) {
    double sum = 0.0;
    int neg = 0;
    if (S == 1) {  // one draw: four loads in flight per lane, then the same per-class order as below
      for (int64_t c = first; c < C; c += 4 * G) {
        double x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) x[u] = c + u * G < C ? load(row, c + u * G) : 0.0;
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (c + u * G < C) {
            neg |= x[u] < 0.0;
            if (x[u] > mx) {
              mx = x[u];
              pred = c + u * G;
            }
            sum += x[u];
          }
      }
    }
    for (int64_t c = S == 1 ? C : first; c < C; c += G) {
      double v = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        const double x = load(row, s * stride_s + c);
        neg |= x < 0.0;
        v += x;
      }
      if (acc) acc[c] = v;  // class-wise, S > 1: binned as acc[c] / S
      if (v > mx) {
        mx = v;
        pred = c;
      }
      sum += v;
    }
    sum = group_sum(sum, a.G) / static_cast<double>(S);
    return {static_cast<bool>(isfinite(sum)), group_or(neg, a.G) != 0, sum};
  }
  bool finite = true;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* rs = row + s * stride_s;
    double m = -INFINITY;
#pragma unroll 4
    for (int64_t c = first; c < C; c += G) m = fmax(m, load(rs, c));
    m = group_max(m, a.G);
    double z = 0.0;
#pragma unroll 4
    for (int64_t c = first; c < C; c += G) {
      const double e = exp(load(rs, c) - m);
      z += e;
      if (S == 1 && e > mx) {
        mx = e;
        pred = c;
      }
    }
    z = group_sum(z, a.G);
    finite = finite && isfinite(m) && isfinite(z);
    if (S == 1) {
      m1 = m;
      z1 = z;
      break;
    }
    // the draw's softmax, its exponentials recomputed (no C-sized temporary)
    for (int64_t c = first; c < C; c += G) acc[c] = (s == 0 ? 0.0 : acc[c]) + exp(load(rs, c) - m) / z;
  }
  if (S > 1)
    for (int64_t c = first; c < C; c += G)
      if (acc[c] > mx) {
        mx = acc[c];
        pred = c;
      }
  return {finite, false, 0.0};
}

// Calls f(c, value of class c) for the classes c in [c0, c1) that this lane owns (c = lane + G j)
// and, with slice >= 0, only those with (c / 32) % kWarps == slice (G = 32 there, so j = c / 32).
// The register path's values are v[k] / S; the generic path's are recomputed or read from acc.
template <typename scalar_t, int K, class F>
__device__ __forceinline__ void for_own_classes(const scalar_t* row, const Args& a, int lane, int64_t c0, int64_t c1,
                                                int slice, const double (&v)[K > 0 ? K : 1], const double* acc,
                                                double m1, double z1, F&& f) {
  const double sd = static_cast<double>(a.S);  // divide (not multiply by 1/S): same rounding as the CPU
  if constexpr (K > 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = lane + int64_t(a.G) * k;
      if (c >= c0 && c < c1 && (slice < 0 || k % kWarps == slice)) f(c, v[k] / sd);
    }
  } else {
    auto value = [&](int64_t c) {
      if (a.S > 1) return acc[c] / sd;
      const double x = load(row, c);
      return a.logits ? exp(x - m1) / z1 : x;
    };
    if (slice < 0) {
      const int64_t c_start = c0 + ((lane - c0) % a.G + a.G) % a.G;  // first c >= c0 with c = lane (mod G)
      for (int64_t c = c_start; c < c1; c += a.G) f(c, value(c));
      return;
    }
    const int64_t j0 = c0 / 32;
    for (int64_t j = j0 + ((slice - j0) % kWarps + kWarps) % kWarps; lane + 32 * j < c1; j += kWarps) {
      const int64_t c = lane + 32 * j;
      if (c >= c0) f(c, value(c));
    }
  }
}

// Top-label bins of one warp's rows (kTopWarp), into the warp's own histogram copy: a lane holding
// a kept row (`mine`) adds (1, conf, correct) to bin uniform_bin(conf). The warp merges its rows by
// bin first: per distinct bin among them, two ballots (count, hits) and one xor-shuffle sum of the
// confidences, then lane 0 adds the three. No shared-memory atomics (float64 ones are
// compare-and-swap loops on sm_90) and no per-row rounds; a confident model puts most rows of a
// warp in one or two bins, so the loop usually runs once or twice. Every lane must call it (the
// loop bound comes from ballots: warp-uniform). The sum order is fixed: deterministic.
__device__ __forceinline__ void bin_top_warp(double* hist, bool mine, double conf, bool correct, int64_t B) {
  const int bin = mine ? static_cast<int>(uniform_bin(conf, B)) : -1;  // B <= 2^24
  unsigned pending = __ballot_sync(0xffffffffu, mine);
  while (pending) {
    const int b = __shfl_sync(0xffffffffu, bin, __ffs(pending) - 1);
    const bool in = mine && bin == b;
    const unsigned members = __ballot_sync(0xffffffffu, in);
    const unsigned hits = __ballot_sync(0xffffffffu, in && correct);
    double s = in ? conf : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) {
      double* at = hist + static_cast<int64_t>(b) * kCalibStats;
      at[kStatCount] += static_cast<double>(__popc(members));
      at[kStatConfidence] += s;
      at[kStatCorrect] += static_cast<double>(__popc(hits));
    }
    pending &= ~members;
  }
}

// One group of G lanes per row, grid-stride over rows; blockIdx.y = the class tile (class-wise
// block histograms), else 0. Shared memory: the histogram copies of the mode (see the top).
// kThread: top-label with one row per thread (G = 1, row_per_thread), modes kTopWarp / kTopGlobal.
template <typename scalar_t, int K, bool kThread>
__global__ void __launch_bounds__(kThreads) calibration_bins_kernel(const scalar_t* __restrict__ p, const Args a) {
  extern __shared__ double shist[];
  const int64_t B = a.B, C = a.C, N = a.N;
  const int G = a.G;
  const int64_t c0 = a.classwise ? static_cast<int64_t>(blockIdx.y) * a.tile : 0;
  const int64_t c1 = a.classwise ? (c0 + a.tile < C ? c0 + a.tile : C) : 1;
  const int64_t hsize = (c1 - c0) * B * kCalibStats;  // one copy of this block's histograms
  const int copies = a.mode == kTopWarp || a.mode == kClassWarp ? kWarps : a.mode == kClassBlock ? 1 : 0;
  for (int64_t i = threadIdx.x; i < copies * hsize; i += blockDim.x) shist[i] = 0.0;
  __syncthreads();

  const int warp = threadIdx.x / 32;
  double* hist = shist + (copies == kWarps ? warp * hsize : 0);  // the copy this lane writes (if any)
  const int gpb = kThreads / G;                                 // groups (rows in flight) per block
  const int gib = threadIdx.x / G;                              // group in the block
  const int lane = threadIdx.x % G;                             // lane in the group
  const int gw = (threadIdx.x % 32) / G;                        // group in the warp: its round
  const int warp_groups = 32 / G;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * gpb + gib;
  double* acc = a.work && group < a.work_rows ? a.work + (blockIdx.y * a.work_rows + group) * C : nullptr;
  const bool count_diag = blockIdx.y == 0 && lane == 0;
  double counts[kCalibDiag] = {};
  const double sd = static_cast<double>(a.S);
  auto add_shared = [&](int64_t i, double x) { hist[i] += x; };
  auto add_global = [&](int64_t i, double x) { atomicAdd(a.bins + i, x); };

  // The loop bound is uniform over the block, so every lane runs the same shuffles, __syncwarp
  // and __syncthreads; a group past the last row computes on nothing and records nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * gpb; base < N; base += static_cast<int64_t>(gridDim.x) * gpb) {
    const int64_t n = base + gib;
    const bool active = n < N;
    const scalar_t* row = p + (active ? n : 0) * C;
    double mx = -INFINITY, m1 = 0.0, z1 = 1.0;
    int64_t pred = INT64_MAX;
    double v[K > 0 ? K : 1];
    RowSummary r;
    if constexpr (kThread) r = row_per_thread<scalar_t, K>(row, a, active, v, mx, pred);
    else if constexpr (K > 0) r = row_in_registers<scalar_t, K>(row, a, lane, active, v, mx, pred);
    else r = row_generic(row, a, lane, active, acc, mx, pred, m1, z1);
    group_max_arg(mx, pred, G);
    const int64_t t = active ? a.y[n] : -1;
    const bool keep =
        active && classify_row([&](int slot) { if (count_diag) counts[slot] += 1.0; }, r, t, C, a.logits, a.tol);
    const double conf = (K == 0 && a.logits && a.S == 1) ? mx / z1 : mx / sd;
    auto bin_classes = [&](int slice, auto&& add) {
      for_own_classes<scalar_t, K>(row, a, lane, c0, c1, slice, v, acc, m1, z1,
                                   [&](int64_t c, double x) { bin_value(add, c - c0, x, c == t, B); });
    };
    if constexpr (kThread) {  // top-label only: every thread holds its own row
      if (a.mode == kTopWarp) bin_top_warp(hist, keep, conf, pred == t, B);
      else if (keep) bin_value(add_global, 0, conf, pred == t, B);
      continue;
    }
    switch (a.mode) {
      case kTopWarp:  // lane 0 of each group holds its row
        bin_top_warp(hist, keep && lane == 0, conf, pred == t, B);
        break;
      case kTopGlobal:
        if (keep && lane == 0) bin_value(add_global, 0, conf, pred == t, B);
        break;
      case kClassWarp:  // the warp's groups in turn, each lane its own classes
        for (int q = 0; q < warp_groups; ++q) {
          if (keep && gw == q) bin_classes(-1, add_shared);
          __syncwarp();
        }
        break;
      case kClassBlock:  // G = 32: warp w writes class slice (w + q) % kWarps in round q
        for (int q = 0; q < kWarps; ++q) {
          if (keep) bin_classes((warp + q) % kWarps, add_shared);
          __syncthreads();
        }
        break;
      default:  // kClassGlobal (one tile: c0 = 0)
        if (keep) bin_classes(-1, add_global);
    }
  }
#pragma unroll
  for (int i = 0; i < kCalibDiag; ++i)
    if (counts[i] != 0.0) atomicAdd(a.diag + i, counts[i]);
  if (copies > 0) {  // one flush per block: the copies summed in a fixed order
    __syncthreads();
    double* out = a.bins + c0 * B * kCalibStats;
    for (int64_t i = threadIdx.x; i < hsize; i += blockDim.x) {
      double s = 0.0;
      for (int w = 0; w < copies; ++w) s += shist[w * hsize + i];
      if (s != 0.0) atomicAdd(out + i, s);
    }
  }
}

// Launch geometry of one call.
struct Plan {
  int mode = kTopWarp;
  int G = 1;
  int64_t tiles = 1, tile = 1;
  size_t smem = 0;
};

Plan plan_for(int64_t C, int64_t B, bool classwise) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const auto optin = static_cast<int64_t>(std::max(prop->sharedMemPerBlockOptin, kDefaultSmem));
  const auto bin_bytes = static_cast<int64_t>(kBinBytes);
  Plan pl;
  while (pl.G < C && pl.G < 32) pl.G <<= 1;
  if (!classwise) {
    // small C: one row per thread (its C classes in registers, no shuffles per row); larger C: a
    // group of G lanes per row, so that a row's loads are spread over lanes
    if (C <= kRowPerThread) pl.G = 1;
    if (B <= optin / (kWarps * bin_bytes)) pl.smem = static_cast<size_t>(kWarps * B * bin_bytes);
    else pl.mode = kTopGlobal;
    return pl;
  }
  pl.tile = C;
  if (B <= int64_t(kDefaultSmem) / (kWarps * bin_bytes) && C <= int64_t(kDefaultSmem) / (kWarps * B * bin_bytes)) {
    pl.mode = kClassWarp;
    pl.smem = static_cast<size_t>(kWarps * C * B * bin_bytes);
    return pl;
  }
  const int64_t fit = optin / (B * bin_bytes);  // classes per tile that fit in one block
  const int64_t tiles = fit > 0 ? (C + fit - 1) / fit : kMaxTiles + 1;
  if (tiles > kMaxTiles) {
    pl.mode = kClassGlobal;
    return pl;
  }
  pl.mode = kClassBlock;
  pl.G = 32;
  pl.tile = (C + tiles - 1) / tiles;  // balanced tiles
  pl.tiles = (C + pl.tile - 1) / pl.tile;
  pl.smem = static_cast<size_t>(pl.tile * B * bin_bytes);
  return pl;
}

template <typename scalar_t, int K, bool kThread = false>
void launch(const at::Tensor& p, const Plan& pl, Args a) {
  auto kernel = calibration_bins_kernel<scalar_t, K, kThread>;
  if (pl.smem > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(pl.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, pl.smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t gpb = kThreads / pl.G;
  // the resident grid, shared by the tiles
  const int64_t resident = std::max<int64_t>(1, (sms * std::max(per_sm, 1) + pl.tiles - 1) / pl.tiles);
  int64_t gx = std::min<int64_t>(blocks_for(a.N, gpb), resident);
  at::Tensor work;
  if (K == 0 && a.S > 1 && (a.logits || a.classwise)) {
    // the rare case (C > 8 G with S > 1): one scratch row per group that ever gets a row, about
    // kMaxWorkDoubles in all (fewer blocks for long rows) unless one block's rows alone are longer
    gx = std::max<int64_t>(1, std::min<int64_t>(gx, kMaxWorkDoubles / (pl.tiles * gpb * a.C)));
    a.work_rows = std::min(gx * gpb, a.N);
    work = at::empty({pl.tiles * a.work_rows, a.C}, p.options().dtype(at::kDouble));
    a.work = work.data_ptr<double>();
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(pl.tiles));
  kernel<<<grid, kThreads, pl.smem, at::cuda::getCurrentCUDAStream()>>>(p.const_data_ptr<scalar_t>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> calibration_bins_cuda(const at::Tensor& probs, const at::Tensor& targets,
                                                         int64_t n_bins, bool from_logits, bool classwise,
                                                         double sum_tol) {
  check_calibration_args(probs, targets, n_bins, sum_tol, c10::DeviceType::CUDA);

  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t S = probs.size(0), N = probs.size(1), C = probs.size(2);
  at::Tensor bins, diag;
  std::tie(bins, diag) = calibration_outputs(probs, n_bins, classwise);
  if (N == 0) return {bins, diag};
  const at::Tensor p = probs.contiguous();
  const at::Tensor y = targets.contiguous();

  const Plan pl = plan_for(C, n_bins, classwise);
  const Args a{y.const_data_ptr<int64_t>(), S, N, C, n_bins, from_logits, classwise, sum_tol, pl.G, pl.mode, pl.tile,
               nullptr, 0, bins.data_ptr<double>(), diag.data_ptr<double>()};
  const int64_t per_lane = (C + pl.G - 1) / pl.G;  // classes per lane
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "calibration_bins_cuda", [&] {
    if (pl.G == 1 && !classwise) {  // one row per thread (plan_for: C <= kRowPerThread)
      if (C <= 4) launch<scalar_t, 4, true>(p, pl, a);
      else launch<scalar_t, kRowPerThread, true>(p, pl, a);
    } else if (per_lane <= 1) launch<scalar_t, 1>(p, pl, a);
    else if (per_lane <= 2) launch<scalar_t, 2>(p, pl, a);
    else if (per_lane <= 4) launch<scalar_t, 4>(p, pl, a);
    else if (per_lane <= kRegClasses) launch<scalar_t, kRegClasses>(p, pl, a);
    else launch<scalar_t, 0>(p, pl, a);
  });
  return {bins, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace pyfastbayes::cuda
