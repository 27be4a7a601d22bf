// CPU kernel of calibration_bins: rows split into one contiguous chunk per thread
// (at::parallel_for), each chunk accumulating its own float64 partial bins, then a reduction in
// chunk order (deterministic for a given thread count). One function per path (probabilities with
// S = 1, probabilities averaged over S > 1 draws, logits); per-row math in float64; the row
// classification and the bin rule are common/calibration.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks/calibration.h"
#include "common/calibration.h"
#include "cpu/clones.h"

namespace pyfastbayes::cpu {
namespace {

// Row reductions of the S = 1 path, written so that gcc vectorises them. Their relaxed
// floating-point flags are scoped to these helpers and cannot change a result that is used:
// a row holding NaN or inf has a non-finite sum (the sum keeps IEEE NaN/inf semantics, it is
// only reassociated), is counted as non-finite and is not binned, so its (then unspecified) max
// is never read; the sum is only compared with 1 within a tolerance.
template <typename scalar_t>
__attribute__((optimize("finite-math-only", "no-signed-zeros"))) auto row_max(const scalar_t* row, int64_t C) {
  using cmp_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  cmp_t mx = static_cast<cmp_t>(row[0]);
  for (int64_t c = 1; c < C; ++c) {
    const cmp_t v = static_cast<cmp_t>(row[c]);
    mx = v > mx ? v : mx;
  }
  return mx;
}

template <typename scalar_t>
__attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math"))) double row_sum(
    const scalar_t* row, int64_t C, bool& neg) {
  double sum = 0.0;
  int any_neg = 0;  // an int (not bool) OR-reduction: gcc vectorises it
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(row[c]);
    sum += v;
    any_neg |= static_cast<int>(v < 0.0);
  }
  neg = any_neg != 0;
  return sum;
}

// acc[i] += src[i] in float64 over one draw's slab; returns whether any value was negative.
// Plain loops: the AVX2 / AVX-512 clones gcc emits (picked at load time) vectorise them.
template <typename scalar_t>
int accumulate_slab(const scalar_t* src, double* acc, int64_t len) {
  int neg = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double v = static_cast<double>(src[i]);
    acc[i] += v;
    neg |= static_cast<int>(v < 0.0);
  }
  return neg;
}
PFB_CPU_CLONES int accumulate_slab_f32(const float* src, double* acc, int64_t len) {
  return accumulate_slab(src, acc, len);
}
PFB_CPU_CLONES int accumulate_slab_f64(const double* src, double* acc, int64_t len) {
  return accumulate_slab(src, acc, len);
}
template <typename scalar_t>
bool accumulate(const scalar_t* src, double* acc, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, float>) return accumulate_slab_f32(src, acc, len) != 0;
  else if constexpr (std::is_same_v<scalar_t, double>) return accumulate_slab_f64(src, acc, len) != 0;
  else return accumulate_slab(src, acc, len) != 0;
}

// One chunk's accumulators and the constants of the call.
struct ChunkBins {
  double* stats;  // [(classwise ? C : 1), B, kCalibStats]
  double* diag;   // [kCalibDiag]
  const int64_t* y;
  int64_t S, stride_s, C, B;  // stride_s = N * C: from one draw to the next
  bool logits, classwise;
  double tol;

  // Count, classify and bin row n (rules in common/calibration.h): conf / pred of its S-averaged
  // distribution, value_of(c) its probability of class c (only read for class-wise bins).
  template <class ValueOf>
  void finish(int64_t n, const RowSummary& row, double conf, int64_t pred, ValueOf&& value_of) {
    const int64_t t = y[n];
    if (!classify_row([&](int slot) { diag[slot] += 1.0; }, row, t, C, logits, tol)) return;
    auto add = [&](int64_t i, double x) { stats[i] += x; };
    if (!classwise) {
      bin_value(add, 0, conf, pred == t, B);
      return;
    }
    for (int64_t c = 0; c < C; ++c) bin_value(add, c, value_of(c), c == t, B);
  }
};

// Probabilities, S = 1: each row read in place, no accumulator.
template <typename scalar_t>
void rows_direct(const scalar_t* p, int64_t r0, int64_t r1, ChunkBins& out) {
  const int64_t C = out.C;
  for (int64_t n = r0; n < r1; ++n) {
    const scalar_t* row = p + n * C;
    double conf, sum = 0.0;
    int64_t pred = 0;
    bool neg = false;
    if (C < 64) {  // short rows: one fused scalar pass
      scalar_t mx = row[0];
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t v = row[c];
        const bool gt = v > mx;  // strict: ties keep the lowest class index
        mx = gt ? v : mx;
        pred = gt ? c : pred;
        sum += static_cast<double>(v);
        neg |= v < scalar_t(0);
      }
      conf = static_cast<double>(mx);
    } else {  // long rows: vectorised sum and max, then the first index of the max
      sum = row_sum(row, C, neg);
      const auto mx = row_max(row, C);
      if (std::isfinite(sum))
        while (pred < C - 1 && static_cast<decltype(mx)>(row[pred]) != mx) ++pred;
      conf = static_cast<double>(mx);
    }
    out.finish(n, {std::isfinite(sum), neg, sum}, conf, pred, [&](int64_t c) { return static_cast<double>(row[c]); });
  }
}

// Probabilities, S > 1: rows are processed `block` at a time, draw by draw, so each draw's slab
// of block * C values is read contiguously (not S far-apart rows per point). The block's sums
// take block * C doubles: at most kBlock rows, never more than the chunk has, and no more than
// kScratchDoubles unless one row alone is longer (then one row: the scratch stays within the
// input's size).
constexpr int64_t kBlock = 256;
constexpr int64_t kScratchDoubles = int64_t(1) << 18;  // 2 MiB per thread

template <typename scalar_t>
void rows_averaged(const scalar_t* p, int64_t r0, int64_t r1, ChunkBins& out) {
  const int64_t S = out.S, C = out.C;
  const int64_t block = std::max<int64_t>(1, std::min({kBlock, r1 - r0, kScratchDoubles / C}));
  std::vector<double> acc(static_cast<size_t>(block * C));
  std::vector<char> negrow(static_cast<size_t>(block));
  for (int64_t blk = r0; blk < r1; blk += block) {
    const int64_t nb = std::min(block, r1 - blk), len = nb * C;
    std::fill(acc.begin(), acc.begin() + len, 0.0);
    bool any_neg = false;
    for (int64_t s = 0; s < S; ++s) any_neg |= accumulate(p + s * out.stride_s + blk * C, acc.data(), len);
    std::fill(negrow.begin(), negrow.begin() + nb, 0);
    if (any_neg)  // rare (invalid input): find which rows
      for (int64_t s = 0; s < S; ++s)
        for (int64_t i = 0; i < len; ++i)
          if (static_cast<double>(p[s * out.stride_s + blk * C + i]) < 0.0) negrow[i / C] = 1;
    for (int64_t r = 0; r < nb; ++r) {
      const double* a = acc.data() + r * C;
      double mx = a[0], sum = 0.0;
      int64_t pred = 0;
      for (int64_t c = 0; c < C; ++c) {
        const bool gt = a[c] > mx;
        mx = gt ? a[c] : mx;
        pred = gt ? c : pred;
        sum += a[c];
      }
      sum /= static_cast<double>(S);
      out.finish(blk + r, {std::isfinite(sum), negrow[r] != 0, sum}, mx / static_cast<double>(S), pred,
                 [&](int64_t c) { return a[c] / static_cast<double>(S); });
    }
  }
}

// Logits: each draw's softmax (one exp per logit) summed over the S draws.
template <typename scalar_t>
void rows_logits(const scalar_t* p, int64_t r0, int64_t r1, ChunkBins& out) {
  const int64_t S = out.S, C = out.C;
  std::vector<double> acc(static_cast<size_t>(C)), tmp(static_cast<size_t>(C));
  for (int64_t n = r0; n < r1; ++n) {
    const scalar_t* row = p + n * C;
    std::fill(acc.begin(), acc.end(), 0.0);
    bool finite = true;
    for (int64_t s = 0; s < S && finite; ++s) {
      const scalar_t* rs = row + s * out.stride_s;
      double m = -INFINITY;
      for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(rs[c]));
      double z = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        tmp[c] = std::exp(static_cast<double>(rs[c]) - m);
        z += tmp[c];
      }
      finite = std::isfinite(m) && std::isfinite(z);
      for (int64_t c = 0; c < C; ++c) acc[c] += tmp[c] / z;
    }
    double mx = acc[0];
    int64_t pred = 0;
    for (int64_t c = 0; c < C; ++c) {
      const bool gt = acc[c] > mx;
      mx = gt ? acc[c] : mx;
      pred = gt ? c : pred;
    }
    out.finish(n, {finite, false, 0.0}, mx / static_cast<double>(S), pred,
               [&](int64_t c) { return acc[c] / static_cast<double>(S); });
  }
}

// Rows split into one contiguous chunk per thread, each with its own partial bins, reduced in
// chunk order at the end (deterministic for a given thread count).
template <typename scalar_t>
void bins_kernel(const scalar_t* p, const int64_t* y, int64_t S, int64_t N, int64_t C, int64_t B, bool logits,
                 bool classwise, double tol, double* bins, double* diag) {
  const int64_t nstat = (classwise ? C : 1) * B * kCalibStats;
  const int64_t width = nstat + kCalibDiag;
  const int64_t min_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * C));
  const int64_t nchunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (N + min_rows - 1) / min_rows));
  std::vector<double> partial(static_cast<size_t>(nchunks * width), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      double* st = partial.data() + chunk * width;
      ChunkBins out{st, st + nstat, y, S, N * C, C, B, logits, classwise, tol};
      const int64_t r0 = chunk * N / nchunks, r1 = (chunk + 1) * N / nchunks;
      if (logits) rows_logits(p, r0, r1, out);
      else if (S == 1) rows_direct(p, r0, r1, out);
      else rows_averaged(p, r0, r1, out);
    }
  });
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    const double* st = partial.data() + chunk * width;
    for (int64_t j = 0; j < nstat; ++j) bins[j] += st[j];
    for (int64_t j = 0; j < kCalibDiag; ++j) diag[j] += st[nstat + j];
  }
}

std::tuple<at::Tensor, at::Tensor> calibration_bins_cpu(const at::Tensor& probs, const at::Tensor& targets,
                                                        int64_t n_bins, bool from_logits, bool classwise,
                                                        double sum_tol) {
  check_calibration_args(probs, targets, n_bins, sum_tol, c10::DeviceType::CPU);
  const int64_t S = probs.size(0), N = probs.size(1), C = probs.size(2);
  at::Tensor bins, diag;
  std::tie(bins, diag) = calibration_outputs(probs, n_bins, classwise);
  if (N == 0) return {bins, diag};
  const at::Tensor p = probs.contiguous();
  const at::Tensor y = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "calibration_bins", [&] {
    bins_kernel<scalar_t>(p.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), S, N, C, n_bins, from_logits,
                          classwise, sum_tol, bins.data_ptr<double>(), diag.data_ptr<double>());
  });
  return {bins, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) { m.impl("calibration_bins", &calibration_bins_cpu); }

}  // namespace pyfastbayes::cpu
