// CUDA kernel of calibration_bins. A "group" of G lanes (G = the power of two >= C, at most 32)
// handles one row: lane l owns the classes c = l, l + G, ...; the row's max / argmax / sum are
// reduced with xor shuffles (every lane ends with the same values). Top-label bins live in
// shared memory per block (float64 atomics, one lane per row), flushed to global with atomics at
// the end; class-wise bins go straight to global atomics. Per-row math in float64 for the
// averaged confidence; one device function per path (probabilities, logits); the row
// classification and the bin rule are common/calibration.h (the same functions as the CPU loop).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "checks/calibration.h"
#include "common/calibration.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

constexpr int64_t kMaxSmemBins = 48 * 1024 / (kCalibStats * sizeof(double));  // B up to 2048 in shared
constexpr int64_t kMaxWorkDoubles = int64_t(2) << 20;                          // 16 MiB of row scratch (stays in L2)

// The row a group of G lanes works on: lane l owns the classes c = l, l + G, ...
struct GroupRow {
  int lane, G;
  bool active;  // false for a group past the last row: it joins the shuffles, reads and writes nothing
};

// Probabilities: each lane sums its classes over the S draws (kept in acc when acc != nullptr,
// for the class-wise bins) and tracks its max / argmax; returns the group's sum / negative flag.
template <typename scalar_t>
__device__ __forceinline__ RowSummary row_probs(const scalar_t* row, int64_t S, int64_t stride_s, int64_t C,
                                                const GroupRow& g, double* acc, double& mx, int64_t& pred) {
  using op_t = at::opmath_type<scalar_t>;
  double sum = 0.0;
  int neg = 0;
  for (int64_t c = g.lane; g.active && c < C; c += g.G) {
    double a;
    if (S == 1) {
      const op_t v = static_cast<op_t>(row[c]);
      neg |= v < op_t(0);
      a = static_cast<double>(v);
    } else {
      a = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        const double v = static_cast<double>(static_cast<op_t>(row[s * stride_s + c]));
        neg |= v < 0.0;
        a += v;
      }
    }
    if (acc) acc[c] = a;  // sum over draws (divided by S when binned)
    if (a > mx) {
      mx = a;
      pred = c;
    }
    sum += a;
  }
  sum = group_sum(sum, g.G) / static_cast<double>(S);
  return {static_cast<bool>(isfinite(sum)), group_or(neg, g.G) != 0, sum};
}

// Logits: acc [C] = the sum over the S draws of each draw's softmax (tmp [C]: the draw's
// exponentials, one exp per element); each lane tracks the max / argmax of its classes.
template <typename scalar_t>
__device__ __forceinline__ RowSummary row_logits(const scalar_t* row, int64_t S, int64_t stride_s, int64_t C,
                                                 const GroupRow& g, double* acc, double* tmp, double& mx,
                                                 int64_t& pred) {
  using op_t = at::opmath_type<scalar_t>;
  bool finite = true;
  if (g.active)
    for (int64_t c = g.lane; c < C; c += g.G) acc[c] = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* rs = row + s * stride_s;
    double m = -INFINITY;
    for (int64_t c = g.lane; g.active && c < C; c += g.G) m = fmax(m, static_cast<double>(static_cast<op_t>(rs[c])));
    m = group_max(m, g.G);
    double z = 0.0;
    for (int64_t c = g.lane; g.active && c < C; c += g.G) {
      const double e = exp(static_cast<double>(static_cast<op_t>(rs[c])) - m);  // once per element
      tmp[c] = e;
      z += e;
    }
    z = group_sum(z, g.G);
    finite = finite && isfinite(m) && isfinite(z);
    for (int64_t c = g.lane; g.active && c < C; c += g.G) acc[c] += tmp[c] / z;  // the lane's own writes
  }
  for (int64_t c = g.lane; g.active && c < C; c += g.G) {
    if (acc[c] > mx) {
      mx = acc[c];
      pred = c;
    }
  }
  return {finite, false, 0.0};
}

// Count, classify and bin one row (rules in common/calibration.h): lane 0 counts the row and
// bins its top-label confidence; for class-wise bins every lane bins its own classes of acc.
__device__ __forceinline__ void finish_row(const RowSummary& r, double conf, int64_t pred, int64_t t,
                                           const double* acc, const GroupRow& g, int64_t C, int64_t B, double sd,
                                           bool logits, bool classwise, double tol, double* tgt,
                                           double (&counts)[kCalibDiag]) {
  auto count = [&](int slot) {
    if (g.lane == 0) counts[slot] += 1.0;
  };
  if (!classify_row(count, r, t, C, logits, tol)) return;
  auto add = [&](int64_t i, double x) { atomicAdd(tgt + i, x); };
  if (!classwise) {
    if (g.lane == 0) bin_value(add, 0, conf, pred == t, B);
    return;
  }
  for (int64_t c = g.lane; c < C; c += g.G) bin_value(add, c, acc[c] / sd, c == t, B);  // the lane's own acc
}

// One group of G lanes (G = the power of two >= C, at most 32) per row, grid-stride over rows.
// work: [gridDim.x * groups_per_block, C] (classwise) or [.., 2 C] (logits) float64 scratch, else
// nullptr. Top-label (and small class-wise) bins accumulate in shared memory, flushed at the end.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    calibration_bins_kernel(const scalar_t* __restrict__ p, const int64_t* __restrict__ y, int64_t S, int64_t N,
                            int64_t C, int64_t B, bool logits, bool classwise, double tol, int G,
                            bool smem_bins, double* __restrict__ work, double* __restrict__ bins,
                            double* __restrict__ diag) {
  extern __shared__ double sbins[];
  const int64_t nstat = (classwise ? C : 1) * B * kCalibStats;  // bins held in shared memory
  if (smem_bins) {
    for (int64_t i = threadIdx.x; i < nstat; i += blockDim.x) sbins[i] = 0.0;
    __syncthreads();
  }
  double* tgt = smem_bins ? sbins : bins;
  const int64_t gpb = blockDim.x / G;  // groups (rows in flight) per block
  const int64_t gib = threadIdx.x / G;
  const int64_t wstride = (logits ? 2 : 1) * C;  // per-row scratch: acc [C], with logits also tmp [C]
  // scratch rows exist for the groups that ever get a row (group index < N)
  const int64_t group = static_cast<int64_t>(blockIdx.x) * gpb + gib;
  double* acc = work && group < N ? work + group * wstride : nullptr;
  const int64_t stride_s = N * C;
  const double sd = static_cast<double>(S);  // divide (not multiply by 1/S): same rounding as the CPU
  double counts[kCalibDiag] = {};

  // The loop bound is uniform over the block, so every lane of a warp runs the same shuffles;
  // a group past the last row computes on nothing and records nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * gpb; base < N; base += static_cast<int64_t>(gridDim.x) * gpb) {
    const int64_t n = base + gib;
    const GroupRow g{static_cast<int>(threadIdx.x) % G, G, n < N};
    const scalar_t* row = p + (g.active ? n : 0) * C;
    double mx = -INFINITY;
    int64_t pred = INT64_MAX;
    const RowSummary r = logits ? row_logits(row, S, stride_s, C, g, acc, acc ? acc + C : nullptr, mx, pred)
                                : row_probs(row, S, stride_s, C, g, acc, mx, pred);
    group_max_arg(mx, pred, G);
    if (!g.active) continue;
    finish_row(r, mx / sd, pred, y[n], acc, g, C, B, sd, logits, classwise, tol, tgt, counts);
  }
#pragma unroll
  for (int i = 0; i < kCalibDiag; ++i)
    if (counts[i] != 0.0) atomicAdd(diag + i, counts[i]);
  if (smem_bins) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < nstat; i += blockDim.x)
      if (sbins[i] != 0.0) atomicAdd(bins + i, sbins[i]);
  }
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

  int G = 1;
  while (G < C && G < 32) G <<= 1;
  const int64_t gpb = kThreads / G;
  int64_t blocks = resident_blocks_for(N, gpb);
  at::Tensor work;
  if (from_logits || classwise) {
    // one scratch row per group that ever gets a row: at most 16 MiB (fewer blocks for long rows)
    // unless one block's rows alone are longer, and never more rows than N
    const int64_t wstride = (from_logits ? 2 : 1) * C;
    blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxWorkDoubles / (gpb * wstride)));
    work = at::empty({std::min(blocks * gpb, N), wstride}, probs.options().dtype(at::kDouble));
  }
  const int64_t nbins_total = (classwise ? C : 1) * n_bins;  // class-wise bins too, when they fit
  const bool smem_bins = nbins_total <= kMaxSmemBins;
  const size_t smem = smem_bins ? static_cast<size_t>(nbins_total) * kCalibStats * sizeof(double) : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "calibration_bins_cuda", [&] {
    calibration_bins_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        p.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), S, N, C, n_bins, from_logits, classwise, sum_tol,
        G, smem_bins, work.defined() ? work.data_ptr<double>() : nullptr, bins.data_ptr<double>(),
        diag.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {bins, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace pyfastbayes::cuda
