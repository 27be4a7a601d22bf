// Per-row rules of the calibration binning op, shared by the CPU loop and the CUDA kernel.
//
// Uniform bins. With B bins, bin k (0 <= k < B) holds the confidences x with k <= x*B < k+1,
// evaluated over the reals (not in rounded floating point), i.e. [k/B, (k+1)/B): every bin is
// closed on the left and open on the right, so a value exactly on an interior edge k/B goes to
// bin k, the bin ABOVE the edge. The last bin is closed on both sides: confidence 1.0 (and any
// value above 1 that passed the tolerance check) lands in bin B-1; confidence 0 lands in bin 0.
//
// Accumulators: per bin, float64 (count, sum of confidence, sum of correctness); slots and the
// diagnostics vector in common/layouts.h. Host-side argument checks: checks/calibration.h.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/layouts.h"
#include "common/macros.h"

namespace pyfastbayes {

// Bin of confidence x for B uniform bins (the rule above). x*B is rounded once; the rounding can
// only move the exact product across an integer edge when the rounded product IS that integer,
// so only then is the exact sign of x*B - p needed (one fma, exact by construction).
PFB_HD int64_t uniform_bin(double x, int64_t n_bins) {
  const double b = static_cast<double>(n_bins);
  const double p = x * b;
  if (!(p > 0.0)) return 0;            // x <= 0 (NaN rows are skipped before binning)
  if (p >= b) return n_bins - 1;       // the last bin is closed: x = 1 lands here
  int64_t k = static_cast<int64_t>(p);  // floor, as 0 < p < b (no libm call on the CPU)
  if (static_cast<double>(k) == p && fma(x, b, -p) < 0.0) --k;  // exact x*B just below edge k >= 1
  return k;
}

// What a row's reductions tell: finite (no NaN / inf, softmax defined), sum of the S-averaged
// probabilities, any negative entry (both probabilities only).
struct RowSummary {
  bool finite;
  bool negative;
  double sum;
};

// Classify one row: a skipped row (non-finite, or its target outside [0, C)) bumps one diag slot
// and returns false; a kept row bumps bad_sum / negative when they apply (probabilities only) and
// returns true: bin it. count(slot) adds 1 to diag[slot] (+= on the CPU, a register on the GPU).
template <class Count>
PFB_HD bool classify_row(Count&& count, const RowSummary& r, int64_t target, int64_t C, bool logits, double tol) {
  if (!r.finite) {
    count(kDiagNonFinite);
    return false;
  }
  if (target < 0 || target >= C) {
    count(kDiagBadTarget);
    return false;
  }
  if (!logits) {
    if (!(fabs(r.sum - 1.0) <= tol)) count(kDiagBadSum);
    if (r.negative) count(kDiagNegative);
  }
  return true;
}

// Bin one value v of histogram `hist` (0 for the top-label bins, class c for the class-wise
// ones): its bin's count += 1, confidence sum += v, correct sum += 1 when correct.
// add(index, x) adds x to stats[index] of the flat [hists, B, kCalibStats] table.
template <class Add>
PFB_HD void bin_value(Add&& add, int64_t hist, double v, bool correct, int64_t n_bins) {
  const int64_t at = (hist * n_bins + uniform_bin(v, n_bins)) * kCalibStats;
  add(at + kStatCount, 1.0);
  add(at + kStatConfidence, v);
  if (correct) add(at + kStatCorrect, 1.0);
}

}  // namespace pyfastbayes
