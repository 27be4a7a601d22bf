// Math of the vi family (variational inference), shared by the CPU loops and the CUDA kernels.
// Host-side argument checks: checks/vi.h; schemas: ops/vi.cpp; reference: pyfastbayes/_reference/vi.py.
//
// ---- Section 1: reparameterised noise (vi_sample, vi_sample_backward, vi_local_noise,
// ---- vi_local_noise_backward, vi_rademacher_)
//
// The noise eps_i of element i (logical row-major index) of a call with rng = (seed, step) and
// stream id s is the normal stream of philox_normal_(out, seed, s, step): lane i % 4 of
// philox_normal4(seed, i / 4, s, step) (common/philox.h), a float32 value in every dtype. It is
// computed on the fly from the counter, never stored, so a backward pass regenerates exactly the
// forward's eps from the same (rng, stream). The four noisy rules are elementwise functions
// f(a, b, eps) of two inputs of one dtype; T is their math type (float for fp32 / fp16 / bf16,
// double for fp64), eps converted to T (exactly).
//
//   vi_sample:               w      = mu + softplus(rho) * eps
//   vi_sample_backward:      grad_rho = grad_w * eps * softplus'(rho)
//   vi_local_noise:          out    = mean + sqrt(max(var, 0)) * eps
//   vi_local_noise_backward: grad_var = grad_out * eps / (2 sqrt(var)), 0 where var <= 0
//
// softplus is torch's (beta 1, threshold 20): rho for rho > 20, else log1p(exp(rho)), and
// softplus' its exact derivative: 1 for rho > 20, else sigmoid(rho) = e / (1 + e), e = exp(rho)
// (torch's softplus_backward), so vi_sample_backward is the derivative of vi_sample on both sides
// of the threshold. NaN propagates through every rule (no clamp swallows it). var < 0 (a variance
// that rounding pushed below zero) counts as 0: no noise, and a zero gradient.
//
// vi_rademacher_ draws +1 / -1 from the raw Philox bits of the same counter scheme, every bit of a
// block used (128 signs per Philox evaluation, not 4: the sign vectors of a flipout CNN step were
// ~18 % of its CPU time): element i is -1 when bit i % 32 of word (i / 32) % 4 of
// philox4x32_10(counter = (i / 128 lo, i / 128 hi, s, step), key = seed) is set, else +1. (The
// same (seed, s, step) would also feed the normal stream: give sign vectors their own stream id.)
// vi_rademacher_mul(x) = x_i * s_i with those signs, in x's dtype (exact: x_i or -x_i; NaN stays
// NaN): flipout's flips of its input and output without a sign tensor.
//
// ---- Section 2: closed-form KL of mean-field Gaussians (vi_kl, vi_kl_backward)
//
// q = N(mu, sigma^2), sigma = softplus(rho) (section 1's vi_softplus), against the prior N(0, v)
// of the element's tensor (v = prior_var[t]); per element, in the math type T:
//
//   kl    = 0.5 log v - log sigma + (sigma^2 + mu^2) / (2 v) - 0.5            (>= 0)
//   d/dmu  = g mu / v
//   d/drho = g (sigma softplus'(rho) / v - softplus'(rho) / sigma)
//
// log sigma is evaluated stably over the whole float range: rho itself for rho < -20 (softplus(rho)
// = exp(rho) (1 - exp(rho) / 2 + ...), so log sigma = rho to a relative 1e-9, while log1p(exp(rho))
// underflows to 0 in float32 below rho ~ -103 and log(0) = -inf), log(rho) above the threshold 20
// (sigma = rho there), log(log1p(exp(rho))) between. The ratio softplus'(rho) / sigma of the
// gradient (sigmoid(rho) / softplus(rho) -> 1 as rho -> -inf, a 0/0 once both underflow) is the
// exact derivative of that log sigma: 1 for rho < -20, 1 / rho above 20, sigmoid / softplus between
// (both >= 2e-9 there). NaN propagates (every comparison with NaN is false: the middle branch);
// rho = -inf gives kl = +inf and d/drho = -g.
//
// Per-tensor constants (half_log_v = 0.5 log v, inv_2v = 0.5 / v, inv_v = 1 / v) are computed in
// float64 once per tensor (CPU work item / CUDA block) and rounded to T. A prior variance that is
// not finite and > 0 (possible only on CUDA, where prior_var is not checked on the host) makes
// every term of its tensor NaN: the KL and that tensor's gradients are NaN (ViKlPrior::make).
//
// ---- Section 3: the local reparameterisation's weight variance (vi_sigma_sq, vi_sigma_sq_backward_,
// ---- vi_sigma_sq_and_backward_)
//
// The local estimator's pre-activation variance is x^2 (sigma^2)^T with sigma = softplus(rho); these
// rules give sigma^2 and its gradient in one pass over rho (no noise), in the math type T:
//
//   vi_sigma_sq:           s2       = s * s,              s = softplus(rho) (section 1's vi_softplus)
//   vi_sigma_sq_backward_: grad_rho = grad * (2 s * s'),  s' = softplus'(rho) (vi_softplus_grad), over grad
//
// (torch's softplus and softplus_backward with the threshold 20, so autograd through
// F.softplus(rho).square() gives the same numbers to an ulp). rho = -inf: s = s' = 0, so 0 and
// grad * 0; rho = +inf: +inf and grad * inf; NaN propagates.
//
// ---- Section 4: a layer's weight function with its KL term (vi_weight_kl, vi_weight_kl_backward_)
//
// One pass over a Bayesian layer's (mu, rho) that makes the tensor its forward needs, the weight
// function w of the layer's estimator (kind), and the KL term of the same elements (section 2's
// closed form against N(0, v)), so that a layer's forward and backward carry their KL and its
// gradient instead of a separate reduction and a separate backward pass re-reading mu and rho and
// re-computing softplus:
//
//   kind 0 (kViWeightSample):       w = mu + sigma eps        (the reparameterised weight draw)
//   kind 1 (kViWeightPerturbation): w = sigma eps             (flipout's shared perturbation)
//   kind 2 (kViWeightVariance):     w = sigma^2               (the local estimator's variance; no noise)
//
//   vi_weight_kl:           (w, kl = sum_i kl_term_i)   (section 2's terms and summation rules)
//   vi_weight_kl_backward_: given d = dL/dw (held in grad_rho on entry) and g = dL/dkl,
//     grad_rho = data + g (sigma s' / v - s' / sigma),  data = d eps s' (kinds 0, 1), d (2 sigma s') (kind 2)
//     grad_mu  = (kind 0: d; kinds 1, 2: grad_mu's entry value) + g mu / v
//   and w again when asked (the input gradient needs it). s' = softplus'(rho); s' / sigma as section
//   2's vi_kl_grad (1 below -20, 1 / rho above 20). With g = 0 the results are sections 1 and 3's
//   (vi_sample_and_backward, vi_sigma_sq_and_backward_) to rounding.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "common/philox.h"

namespace pyfastbayes {

// ======================= Section 1: reparameterised noise ======================================

constexpr double kViSoftplusThreshold = 20.0;  // torch.nn.functional.softplus's default threshold

PFB_HD float vi_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
PFB_HD double vi_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PFB_HD float vi_log1p(float x) {
#if defined(__CUDA_ARCH__)
  return log1pf(x);
#else
  return std::log1p(x);
#endif
}
PFB_HD double vi_log1p(double x) {
#if defined(__CUDA_ARCH__)
  return ::log1p(x);
#else
  return std::log1p(x);
#endif
}

// softplus(x) = x above the threshold, log1p(exp(x)) below (exp never overflows there)
template <class T>
PFB_HD T vi_softplus(T x) {
  return x > T(kViSoftplusThreshold) ? x : vi_log1p(vi_exp(x));
}

// d softplus / dx: 1 above the threshold, e / (1 + e) with e = exp(x) below (e <= exp(20): finite;
// x -> -inf gives 0, NaN gives NaN)
template <class T>
PFB_HD T vi_softplus_grad(T x) {
  if (x > T(kViSoftplusThreshold)) return T(1);
  const T e = vi_exp(x);
  return e / (T(1) + e);
}

// The four noisy rules: out = Rule{}(a, b, eps), a and b in the math type T.
struct ViSampleRule {  // a = mu, b = rho
  template <class T>
  PFB_HD T operator()(T mu, T rho, T eps) const {
    return mu + vi_softplus(rho) * eps;
  }
};
struct ViSampleBackwardRule {  // a = grad_w, b = rho
  template <class T>
  PFB_HD T operator()(T grad_w, T rho, T eps) const {
    return grad_w * eps * vi_softplus_grad(rho);
  }
};
struct ViLocalNoiseRule {  // a = mean, b = var; var < 0 -> 0 (NaN stays NaN: NaN < 0 is false)
  template <class T>
  PFB_HD T operator()(T mean, T var, T eps) const {
    return mean + typed_sqrt(var < T(0) ? T(0) : var) * eps;
  }
};
struct ViLocalNoiseBackwardRule {  // a = grad_out, b = var; var <= 0 -> 0 (NaN var gives NaN)
  template <class T>
  PFB_HD T operator()(T grad_out, T var, T eps) const {
    return var <= T(0) ? T(0) : grad_out * eps / (T(2) * typed_sqrt(var));
  }
};

// The 128 raw Philox bits of counter block `block` of stream `stream` at step `step` (the counter
// and key of philox_normal4, before Box-Muller)
PFB_HD void vi_philox_bits4(uint64_t seed, uint64_t block, uint32_t stream, uint32_t step, uint32_t r[4]) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, step};
  philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), r);
}

// +1 or -1 from one Philox word: -1 when its top bit is set
constexpr int kViSignsPerBlock = 128;  // vi_rademacher_: 4 words x 32 bits of one Philox block
// the sign of bit `bit` (0..31) of a Philox word
PFB_HD float vi_rademacher_sign(uint32_t word, int bit) { return ((word >> bit) & 1u) != 0u ? -1.0f : 1.0f; }

// ======================= end of section 1 ======================================================

// ======================= Section 2: closed-form KL of mean-field Gaussians =====================

constexpr int kViKlRun = 64;  // CPU: float32 partial sums of at most this many terms (then float64)

PFB_HD float vi_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
PFB_HD double vi_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// The per-tensor constants of the prior N(0, v), computed in float64 and rounded to T. v not finite
// and > 0 (NaN included) gives NaN constants, hence a NaN term for every element of the tensor.
template <class T>
struct ViKlPrior {
  T half_log_v, inv_2v, inv_v;
  PFB_HD static ViKlPrior make(double v) {
    const bool ok = v > 0.0 && v <= std::numeric_limits<double>::max();  // finite and > 0 (NaN fails both)
    const double nan = std::numeric_limits<double>::quiet_NaN();
    ViKlPrior p;
    p.half_log_v = static_cast<T>(ok ? 0.5 * vi_log(v) : nan);
    p.inv_2v = static_cast<T>(ok ? 0.5 / v : nan);
    p.inv_v = static_cast<T>(ok ? 1.0 / v : nan);
    return p;
  }
};

// log(softplus(rho)) given sigma = vi_softplus(rho), stable for every rho (see the section's head)
template <class T>
PFB_HD T vi_log_sigma(T rho, T sigma) {
  return rho < T(-kViSoftplusThreshold) ? rho : vi_log(sigma);
}

// One element's KL(N(mu, sigma^2) || N(0, v)), sigma = softplus(rho)
template <class T>
PFB_HD T vi_kl_term(T mu, T rho, const ViKlPrior<T>& p) {
  const T sigma = vi_softplus(rho);
  return p.half_log_v - vi_log_sigma(rho, sigma) + (sigma * sigma + mu * mu) * p.inv_2v - T(0.5);
}

// One element's gradients of g * kl: grad_mu = g mu / v, grad_rho = g (sigma s' / v - s' / sigma),
// s' = softplus'(rho) (vi_softplus_grad: 1 above the threshold), s' / sigma the exact derivative of
// vi_log_sigma (1 below -20: never 0 / 0)
// sigma = softplus(rho), ds = softplus'(rho) and ratio = ds / sigma = d log sigma / d rho (1 below
// -20, 1 / rho above the threshold 20), as the KL gradients need them
template <class T>
PFB_HD void vi_softplus_parts(T rho, T& sigma, T& ds, T& ratio) {
  if (rho > T(kViSoftplusThreshold)) {
    sigma = rho;
    ds = T(1);
    ratio = T(1) / rho;
  } else {
    const T e = vi_exp(rho);
    sigma = vi_log1p(e);
    ds = e / (T(1) + e);
    ratio = rho < T(-kViSoftplusThreshold) ? T(1) : ds / sigma;
  }
}

template <class T>
PFB_HD void vi_kl_grad(T mu, T rho, T g, const ViKlPrior<T>& p, T& grad_mu, T& grad_rho) {
  grad_mu = g * mu * p.inv_v;
  T sigma, ds, ratio;
  vi_softplus_parts(rho, sigma, ds, ratio);
  grad_rho = g * (sigma * ds * p.inv_v - ratio);
}

// ======================= end of section 2 ======================================================

// ======================= Section 3: the local reparameterisation's weight variance ============

struct ViSigmaSqRule {  // rho -> softplus(rho)^2
  template <class T>
  PFB_HD T operator()(T rho) const {
    const T s = vi_softplus(rho);
    return s * s;
  }
};
struct ViSigmaSqBackwardRule {  // (grad, rho) -> grad * 2 softplus(rho) softplus'(rho)
  template <class T>
  PFB_HD T operator()(T grad, T rho) const {
    return grad * (T(2) * vi_softplus(rho) * vi_softplus_grad(rho));
  }
};

// ======================= end of section 3 ======================================================

// ======================= Section 4: a layer's weight function with its KL term =================

constexpr int kViWeightSample = 0;        // w = mu + sigma eps
constexpr int kViWeightPerturbation = 1;  // w = sigma eps
constexpr int kViWeightVariance = 2;      // w = sigma^2 (no noise)

// w of kind K from mu, sigma and eps
template <int K, class T>
PFB_HD T vi_weight_value(T mu, T sigma, T eps) {
  if constexpr (K == kViWeightSample) return mu + sigma * eps;
  else if constexpr (K == kViWeightPerturbation) return sigma * eps;
  else return sigma * sigma;
}

// One element of vi_weight_kl_backward_: d = dL/dw (grad_rho's entry value), gm_in = grad_mu's entry
// value (unused for kind 0), g = dL/dkl; writes grad_rho, grad_mu and w (kind K)
template <int K, class T>
PFB_HD void vi_weight_grad(T mu, T rho, T eps, T d, T gm_in, T g, const ViKlPrior<T>& p, T& grad_rho, T& grad_mu,
                           T& w) {
  T sigma, ds, ratio;
  vi_softplus_parts(rho, sigma, ds, ratio);
  const T data = K == kViWeightVariance ? d * (T(2) * sigma * ds) : d * eps * ds;
  grad_rho = data + g * (sigma * ds * p.inv_v - ratio);
  grad_mu = (K == kViWeightSample ? d : gm_in) + g * mu * p.inv_v;
  w = vi_weight_value<K>(mu, sigma, eps);
}

// ======================= end of section 4 ======================================================

}  // namespace pyfastbayes
