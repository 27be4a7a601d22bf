// Per-element SWAG / SWA rules (Izmailov et al. 2018; Maddox et al. 2019): the one definition
// used by the CPU loop and the CUDA kernel. Host-side argument checks: checks/swag.h.
//
// collect, with w = 1 / (n + 1) and n the number of models averaged before this call:
//   mean <- lerp(mean, theta, w);  sq_mean <- lerp(sq_mean, theta^2, w);  dev = theta - mean (new)
// lerp is written as ATen's (a + w (b - a) for w < 1/2, else b - (b - a)(1 - w)), so the running
// mean of fp32 parameters equals torch.optim.swa_utils.AveragedModel's (w = 1 gives theta exactly).
//
// sample, scale multiplies the covariance (swa_gaussian's convention; scale = 0.5 is the SWAG
// paper's posterior N(mean, (diag(sigma^2) + D^T D / (K - 1)) / 2)):
//   sigma^2 = max(sq_mean - mean^2, eps)
//   lowrank: Sigma = scale (diag(sigma^2) + D^T D / (K - 1)),
//            theta = mean + sqrt(scale) sigma z1 + sqrt(scale / (K - 1)) sum_k z2[k] D[k]
//   diag:    Sigma = scale diag(sigma^2), theta = mean + sqrt(scale) sigma z1
// z1 of draw s is the Philox normal stream (seed, kSwagDiagStream + s, step) indexed by the global
// parameter index; z2 [S, K] is the stream (seed, kSwagLowRankStream, step), element s * K + k
// (stream ids in common/layouts.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/fastmath.h"
#include "common/layouts.h"
#include "common/macros.h"

namespace pyfastbayes {

// every operation rounded on its own (mul_rn, ...: no FMA contraction on the device), so the CPU
// and CUDA moments and deviations agree to the bit
template <typename op_t>
PFB_HD op_t swag_lerp(op_t a, op_t b, op_t w) {
  const op_t d = sub_rn(b, a);
  return (w < op_t(0.5)) ? add_rn(a, mul_rn(w, d)) : sub_rn(b, mul_rn(d, sub_rn(op_t(1), w)));
}

// one collect for one element; returns the deviation from the updated mean
template <typename op_t>
PFB_HD op_t swag_collect_elem(op_t theta, op_t& mean, op_t& sq_mean, op_t w, bool has_sq) {
  mean = swag_lerp(mean, theta, w);
  if (has_sq) sq_mean = swag_lerp(sq_mean, mul_rn(theta, theta), w);
  return sub_rn(theta, mean);
}

// Element i of a collect: load mean (and sq_mean when has_sq), update, store them and the
// deviation (dev may be nullptr: SWA, or SWAG without a deviation row). The arrays may be tensors
// in memory or a thread's registers (the CUDA vector path: there sq always points to the
// register array and has_sq says whether to use it, so the arrays stay in registers).
template <typename param_t, typename state_t, typename dev_t>
PFB_HD void swag_collect_update(const param_t* p, state_t* mean, state_t* sq, bool has_sq, dev_t* dev, int64_t i,
                                state_t w) {
  state_t m = mean[i];
  state_t s = has_sq ? sq[i] : state_t(0);
  const state_t d = swag_collect_elem(static_cast<state_t>(p[i]), m, s, w, has_sq);
  mean[i] = m;
  if (has_sq) sq[i] = s;
  if (dev != nullptr) dev[i] = static_cast<dev_t>(d);
}

template <typename op_t>
PFB_HD op_t swag_sigma(op_t mean, op_t sq_mean, op_t eps) {
  const op_t var = sq_mean - mean * mean;
  return typed_sqrt(var > eps ? var : eps);  // in op_t on both sides
}

// the coefficients of a draw for the covariance convention above (K = 0: diagonal)
struct SwagCoefficients {
  double diag, lowrank;
};
PFB_HD SwagCoefficients swag_coefficients(double scale, int64_t K) {
  return {sqrt(scale), K > 0 ? sqrt(scale / static_cast<double>(K - 1)) : 0.0};
}

// c_diag, c_low from swag_coefficients; lowrank_acc = sum_k z2[s, k] D[k, j] accumulated in k order
template <typename op_t>
PFB_HD op_t swag_draw(op_t mean, op_t sigma, float z1, op_t lowrank_acc, op_t c_diag, op_t c_low) {
  return mean + c_diag * sigma * op_t(z1) + c_low * lowrank_acc;
}

}  // namespace pyfastbayes
