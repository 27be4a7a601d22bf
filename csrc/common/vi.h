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
// vi_rademacher_ draws +1 / -1 from the raw Philox bits of the same counter scheme: element i
// is -1 when the top bit (bit 31) of word i % 4 of philox4x32_10(counter = (i / 4 lo, i / 4 hi,
// s, step), key = seed) is set, else +1. (The same (seed, s, step) would also feed the normal
// stream: give sign vectors their own stream id.)
//
// ---- Section 2 (reserved): further ops of this family (e.g. vi_kl) add their math below the
// ---- end of section 1, in a section of their own.
#pragma once
#include <cmath>
#include <cstdint>

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
PFB_HD float vi_rademacher_sign(uint32_t word) { return (word >> 31) != 0u ? -1.0f : 1.0f; }

// ======================= end of section 1 ======================================================

}  // namespace pyfastbayes
