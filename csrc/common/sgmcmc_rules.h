// Per-element SG-MCMC update rules: the one definition used by the CPU loop and the CUDA kernel.
//
// Convention: g is the gradient of the MEAN negative log-likelihood of a minibatch,
//   grad U = num_data * g + prior_precision * theta,  xi ~ N(0, 1).
// Hyper-parameters arrive as one float64 vector (so schedules never re-setup and a CUDA graph
// can replay a step whose learning rate lives in device memory), slots in common/layouts.h:
//   h = [lr, temperature, num_data, prior_precision, a, b]
//   SGHMC: a = friction;  pSGLD: a = alpha, b = eps.
//
// Arithmetic: the coefficients (make) are computed in float64 from hyper and rounded once to the
// math type op_t (at::opmath_type: fp32 for fp32/fp16/bf16, fp64 for fp64); every per-element
// intermediate stays in op_t on both sides (typed_sqrt below: an unqualified sqrt on a float used
// to resolve to ::sqrt(double) on the host while the device used sqrtf). Division and square root
// are IEEE-rounded on both sides (no fast math), but CPU and CUDA still differ in the last bits:
// nvcc contracts a * b + c into one FMA (its default), the host compiler does so only where it
// targets FMA hardware (the AVX2 / AVX-512 clones of fill_normal, which draws the CPU noise), so
// the same step agrees to ~1e-6 relative in fp32, not bit for bit; the CUDA-vs-CPU tests
// (tests/test_ops_sgmcmc_cuda.py) use ~1e-5 for fp32 for this reason.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/fastmath.h"
#include "common/layouts.h"
#include "common/macros.h"

namespace pyfastbayes {

// SGLD (Welling & Teh 2011): theta <- theta - (lr/2) grad U + sqrt(lr T) xi
template <typename op_t>
struct SGLDRule {
  using op_type = op_t;
  op_t half_lr, num_data, prior, noise;
  PFB_HD static SGLDRule make(const double* h) {
    return {op_t(0.5 * h[kHyperLr]), op_t(h[kHyperNumData]), op_t(h[kHyperPrior]),
            op_t(typed_sqrt(h[kHyperLr] * h[kHyperTemperature]))};
  }
  PFB_HD void operator()(op_t& p, op_t g, op_t& /*unused*/, float xi) const {
    const op_t grad_u = num_data * g + prior * p;
    p = p - half_lr * grad_u + noise * op_t(xi);
  }
};

// SGHMC (Chen, Fox & Guestrin 2014), momentum form:
//   v <- (1 - friction) v - lr grad U + sqrt(2 friction lr T) xi;  theta <- theta + v
template <typename op_t>
struct SGHMCRule {
  using op_type = op_t;
  op_t lr, num_data, prior, decay, noise;
  PFB_HD static SGHMCRule make(const double* h) {
    return {op_t(h[kHyperLr]), op_t(h[kHyperNumData]), op_t(h[kHyperPrior]), op_t(1.0 - h[kHyperA]),
            op_t(typed_sqrt(2.0 * h[kHyperA] * h[kHyperLr] * h[kHyperTemperature]))};
  }
  PFB_HD void operator()(op_t& p, op_t g, op_t& v, float xi) const {
    const op_t grad_u = num_data * g + prior * p;
    v = decay * v - lr * grad_u + noise * op_t(xi);
    p = p + v;
  }
};

// pSGLD (Li, Chen, Carlson & Carin 2016) without the Gamma correction term:
//   V <- alpha V + (1 - alpha) g^2;  G = 1 / (eps + sqrt V)
//   theta <- theta - (lr/2) G grad U + sqrt(lr T G) xi
template <typename op_t>
struct PSGLDRule {
  using op_type = op_t;
  op_t half_lr, num_data, prior, alpha, one_minus_alpha, eps, lr_t;
  PFB_HD static PSGLDRule make(const double* h) {
    return {op_t(0.5 * h[kHyperLr]), op_t(h[kHyperNumData]), op_t(h[kHyperPrior]), op_t(h[kHyperA]),
            op_t(1.0 - h[kHyperA]),   op_t(h[kHyperB]),       op_t(h[kHyperLr] * h[kHyperTemperature])};
  }
  PFB_HD void operator()(op_t& p, op_t g, op_t& v, float xi) const {
    v = alpha * v + one_minus_alpha * g * g;
    const op_t precond = op_t(1) / (eps + typed_sqrt(v));
    const op_t grad_u = num_data * g + prior * p;
    p = p - half_lr * precond * grad_u + typed_sqrt(lr_t * precond) * op_t(xi);
  }
};

// Element i of a fused step, in storage type T: load theta (and the state buffer), apply the
// rule in its math type (fp32 for the half types), store. b is only touched when kHasBuf.
// The arrays may be tensors in memory or a thread's registers (the CUDA vector path).
template <bool kHasBuf, class Rule, typename T>
PFB_HD void sgmcmc_update(const Rule& rule, T* p, const T* g, T* b, int64_t i, float xi) {
  using op_t = typename Rule::op_type;
  op_t pv = static_cast<op_t>(p[i]);
  op_t bv = kHasBuf ? static_cast<op_t>(b[i]) : op_t(0);
  rule(pv, static_cast<op_t>(g[i]), bv, xi);
  p[i] = static_cast<T>(pv);
  if constexpr (kHasBuf) b[i] = static_cast<T>(bv);
}

}  // namespace pyfastbayes
