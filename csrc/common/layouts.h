// Named slots of every small vector that crosses the op boundary: the one definition, used by
// the CPU and CUDA kernels and exported to Python by _C.layouts() (csrc/module.cpp).
#pragma once
#include <cstdint>

namespace pyfastbayes {

// SG-MCMC hyper-parameters: float64 [kHyperSize] on the parameters' device (common/sgmcmc_rules.h)
constexpr int kHyperLr = 0;
constexpr int kHyperTemperature = 1;
constexpr int kHyperNumData = 2;
constexpr int kHyperPrior = 3;  // prior precision
constexpr int kHyperA = 4;      // SGHMC: friction; pSGLD: alpha
constexpr int kHyperB = 5;      // pSGLD: eps
constexpr int kHyperSize = 6;

// RNG position of a fused step: int64 [kRngSize]; the op adds 1 to the step after the update
constexpr int kRngSeed = 0;
constexpr int kRngStep = 1;
constexpr int kRngSize = 2;

// calibration_bins: per-bin statistics [..., B, kCalibStats] (float64)
constexpr int kStatCount = 0;
constexpr int kStatConfidence = 1;  // sum of the binned confidences
constexpr int kStatCorrect = 2;     // sum of correctness
constexpr int kCalibStats = 3;
// calibration_bins: diagnostics, float64 [kCalibDiag] row counts
constexpr int kDiagBadSum = 0;     // S-averaged row does not sum to 1 within sum_tol (probabilities only)
constexpr int kDiagNegative = 1;   // row holds a negative probability (probabilities only)
constexpr int kDiagBadTarget = 2;  // target outside [0, C): row skipped
constexpr int kDiagNonFinite = 3;  // NaN / inf in the row (or all-(-inf) logits): row skipped
constexpr int kCalibDiag = 4;

// SWAG sampling: Philox stream ids and the draws of one call (common/swag.h)
constexpr uint32_t kSwagDiagStream = 0x53570000u;     // + draw index (< 2^16 draws per call)
constexpr uint32_t kSwagLowRankStream = 0x5357FFFFu;  // z2 of every draw of the call
constexpr int64_t kSwagMaxDraws = 0xFFFF;

}  // namespace pyfastbayes
