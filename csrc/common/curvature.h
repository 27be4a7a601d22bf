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
#pragma once
#include <cmath>
#include <cstdint>

#include "common/fastmath.h"
#include "common/macros.h"

namespace pyfastbayes {

enum class LossKind : int { kCrossEntropy = 0, kBce = 1, kMse = 2 };
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

}  // namespace pyfastbayes
