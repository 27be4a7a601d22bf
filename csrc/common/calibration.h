// Per-element rules of the calibration binning op, shared by the CPU loop and the CUDA kernel.
//
// Uniform bins. With B bins, bin k (0 <= k < B) holds the confidences x with k <= x*B < k+1,
// evaluated over the reals (not in rounded floating point), i.e. [k/B, (k+1)/B): every bin is
// closed on the left and open on the right, so a value exactly on an interior edge k/B goes to
// bin k, the bin ABOVE the edge. The last bin is closed on both sides: confidence 1.0 (and any
// value above 1 that passed the tolerance check) lands in bin B-1; confidence 0 lands in bin 0.
//
// Accumulators: per bin, float64 (count, sum of confidence, sum of correctness).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace pyfastbayes {

// Layout of the per-bin statistics: [..., B, kCalibStats].
constexpr int kCalibStats = 3;  // count, confidence sum, correct sum
// Layout of the diagnostics vector (float64 [kCalibDiag]); all are row counts.
constexpr int kCalibDiag = 4;
constexpr int kDiagBadSum = 0;     // S-averaged row does not sum to 1 within sum_tol (probabilities only)
constexpr int kDiagNegative = 1;   // row holds a negative probability (probabilities only)
constexpr int kDiagBadTarget = 2;  // target outside [0, C): row skipped
constexpr int kDiagNonFinite = 3;  // NaN / inf in the row (or all-(-inf) logits): row skipped

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

}  // namespace pyfastbayes
