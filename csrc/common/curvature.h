// Per-element math of loss_hessian, shared by the CPU loop and the CUDA kernel. T is the op math
// type: float for fp32 / fp16 / bf16 inputs, double for fp64; row sums and dots accumulate in
// double. Host-side argument checks: checks/curvature.h.
//
// Row n of outputs, x [C], and the k columns v of V_n [C, k]:
//  - cross_entropy: m = max(x), e_c = exp(x_c - m) (<= 1: no overflow for any magnitude),
//    z = sum e_c in double, p_c = e_c / z (in double, rounded once to T), q = sqrt(p).
//    H = diag(p) - p p^T = B B^T with B = diag(q) - p q^T. Every product is a * (v - b t) with one
//    dot t = sum_c w_c v_c per column (double):
//      hessian  H v   = p (v - t),   w = p;   factor_t B^T v = q (v - t),   w = p;
//      factor   B v   = q (v - q t), w = q.
//    C = 1: p = 1, every product is 0.
//  - bce: h = s (1 - s), s = sigmoid(x), computed as e / (1 + e)^2 with e = exp(-|x|) (no
//    cancellation in 1 - s, no overflow); H = diag(h), B = B^T = diag(sqrt(h)).
//  - mse: H = 2 I, B = B^T = sqrt(2) I.
//  - gaussian_natural: C = 2D outputs, the natural parameters of D Gaussians, eta1 = x[d] =
//    mu / s2 and eta2 = x[D + d] = -1 / (2 s2) < 0 (s2 the variance). The row's loss, the sum of
//    the D negative log-likelihoods -eta1 y - eta2 y^2 + A(eta), A = -eta1^2 / (4 eta2)
//    - log(-2 eta2) / 2, has the y-free Hessian of A, one 2 x 2 block per d on (d, D + d):
//      H = [[s2, 2 mu s2], [2 mu s2, 4 mu^2 s2 + 2 s2^2]] = B B^T, B = [[s, 0], [2 mu s, sqrt(2) s2]],
//    s = sqrt(s2), mu = eta1 s2 (so the exact GGN is the Fisher). Per column (v1, v2) of the block:
//      hessian  o1 = s2 (v1 + 2 mu v2),  o2 = 2 mu o1 + 2 s2^2 v2
//      factor   o1 = s v1,               o2 = 2 mu o1 + sqrt(2) s2 v2
//      factor_t o1 = s (v1 + 2 mu v2),   o2 = sqrt(2) s2 v2
//    eta2 >= 0 (no Gaussian) or NaN gives NaN in both rows of the block.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/fastmath.h"
#include "common/macros.h"

namespace pyfastbayes {

enum class LossKind : int { kCrossEntropy = 0, kBce = 1, kMse = 2, kGaussianNatural = 3 };
enum class HessMode : int { kHessian = 0, kFactor = 1, kFactorT = 2 };

struct LossProblem {
  LossKind kind;
  HessMode mode;
};

// The scale of an elementwise kind (bce, mse) at output x: H's diagonal entry ('hessian') or
// B's ('factor', 'factor_t': B is diagonal, B = B^T).
template <class T>
PFB_HD T elementwise_scale(LossKind kind, HessMode mode, T x) {
  if (kind == LossKind::kMse) return mode == HessMode::kHessian ? T(2) : static_cast<T>(1.4142135623730951);
  const T e = typed_exp(x < T(0) ? x : -x);  // exp(-|x|) in (0, 1]
  const T d = T(1) + e;
  const T h = e / (d * d);
  return mode == HessMode::kHessian ? h : typed_sqrt(h);
}

// Softmax probability of a class from its e = exp(x - m) and the row's double sum z.
template <class T>
PFB_HD T softmax_prob(T e, double z) {
  return static_cast<T>(static_cast<double>(e) / z);
}

// cross_entropy: the weight w of the column dot t = sum_c w_c v_c (q for 'factor', else p) and
// the output scale a (p for 'hessian', else q), from the class probability p.
template <class T>
PFB_HD T ce_dot_weight(T p, HessMode mode) {
  return mode == HessMode::kFactor ? typed_sqrt(p) : p;
}
template <class T>
PFB_HD T ce_out_scale(T p, HessMode mode) {
  return mode == HessMode::kHessian ? p : typed_sqrt(p);
}

// cross_entropy: one output entry a (v - b t) from the class's scale a, the entry v of V and the
// column's dot t (rounded to T); b = a for 'factor' (b = q), else 1.
template <class T>
PFB_HD T ce_out(T a, T v, T t, HessMode mode) {
  return mode == HessMode::kFactor ? a * (v - a * t) : a * (v - t);
}

// gaussian_natural: the block's outputs (o1, o2) for one column (v1, v2) of V, from eta1, eta2.
template <class T>
PFB_HD void gaussian_natural_out(T eta1, T eta2, T v1, T v2, HessMode mode, T& o1, T& o2) {
  const T s2 = eta2 < T(0) ? T(-0.5) / eta2 : std::numeric_limits<T>::quiet_NaN();
  const T mu2 = T(2) * eta1 * s2;  // 2 mu
  if (mode == HessMode::kHessian) {
    o1 = s2 * (v1 + mu2 * v2);
    o2 = mu2 * o1 + T(2) * s2 * s2 * v2;
  } else if (mode == HessMode::kFactor) {
    o1 = typed_sqrt(s2) * v1;
    o2 = mu2 * o1 + static_cast<T>(1.4142135623730951) * s2 * v2;
  } else {
    o1 = typed_sqrt(s2) * (v1 + mu2 * v2);
    o2 = static_cast<T>(1.4142135623730951) * s2 * v2;
  }
}

}  // namespace pyfastbayes
