// Per-element SG-MCMC update rules: the one definition used by the CPU loop and the CUDA kernel.
//
// Convention: g is the gradient of the MEAN negative log-likelihood of a minibatch,
//   grad U = num_data * g + prior_precision * theta,  xi ~ N(0, 1).
// Hyper-parameters arrive as one float64 vector (so schedules never re-setup and a CUDA graph
// can replay a step whose learning rate lives in device memory):
//   h = [lr, temperature, num_data, prior_precision, a, b]
//   SGHMC: a = friction;  pSGLD: a = alpha, b = eps.
#pragma once
#include <cmath>

#include "common/macros.h"

namespace pyfastbayes {

constexpr int kHyperSize = 6;

// SGLD (Welling & Teh 2011): theta <- theta - (lr/2) grad U + sqrt(lr T) xi
template <typename op_t>
struct SGLDRule {
  op_t half_lr, num_data, prior, noise;
  PFB_HD static SGLDRule make(const double* h) {
    return {op_t(0.5 * h[0]), op_t(h[2]), op_t(h[3]), op_t(sqrt(h[0] * h[1]))};
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
  op_t lr, num_data, prior, decay, noise;
  PFB_HD static SGHMCRule make(const double* h) {
    return {op_t(h[0]), op_t(h[2]), op_t(h[3]), op_t(1.0 - h[4]), op_t(sqrt(2.0 * h[4] * h[0] * h[1]))};
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
  op_t half_lr, num_data, prior, alpha, one_minus_alpha, eps, lr_t;
  PFB_HD static PSGLDRule make(const double* h) {
    return {op_t(0.5 * h[0]), op_t(h[2]), op_t(h[3]), op_t(h[4]), op_t(1.0 - h[4]), op_t(h[5]), op_t(h[0] * h[1])};
  }
  PFB_HD void operator()(op_t& p, op_t g, op_t& v, float xi) const {
    v = alpha * v + one_minus_alpha * g * g;
    const op_t precond = op_t(1) / (eps + sqrt(v));
    const op_t grad_u = num_data * g + prior * p;
    p = p - half_lr * precond * grad_u + sqrt(lr_t * precond) * op_t(xi);
  }
};

}  // namespace pyfastbayes
