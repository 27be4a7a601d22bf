// Schemas of the vi family (variational inference). Math: common/vi.h; checks: checks/vi.h.
//
// Section 1: reparameterised noise. Every op of this section takes
//   rng:    int64 [2] = (seed, step), contiguous, on the tensors' device (the SG-MCMC ops' RNG
//           position, ops.RNG); read by the kernel (on the device for CUDA: CUDA-graph safe) and
//           NOT advanced: the caller advances the step between draws
//   stream: Philox stream id in [0, 2^32)
// and draws eps_i, element i in logical (row-major) order, as exactly the float32 normal stream of
// philox_normal_(out, seed, stream, step) (lane i % 4 of Philox block i / 4), generated inside the
// kernel and never stored. Math in float32 (float64 for float64 tensors); results in the inputs'
// dtype, a new contiguous tensor of their shape.
//
// Section 2: the closed-form KL of mean-field Gaussians against zero-mean Gaussian priors, summed
// over a list of T >= 1 tensor pairs in ONE launch (the multi-tensor launchers). mus[t], rhos[t]:
// equal shapes, one kernel float dtype for all, one device, any strides; sigma = softplus(rho)
// (torch's, threshold 20); prior_var: float64 [T] on that device, the prior variance of tensor t,
// finite and > 0 (checked on the host for a CPU tensor; on CUDA not checked, which would cost a
// sync: a bad value makes the KL NaN and tensor t's gradients NaN).
//
// Section 3: the local reparameterisation's weight variance sigma^2 = softplus(rho)^2 and its
// gradient, elementwise, no noise. rho (and grad): one kernel float dtype, one device, equal shapes,
// any strides; math in float32 (float64 for float64); sigma^2 a new contiguous tensor of rho's shape
// and dtype; the gradient written over grad in place (grad is the caller's temporary: a layer's
// backward holds one weight-sized tensor fewer at its peak).
//
// Section 4: a layer's weight function with its KL term (common/vi.h, section 4). mu, rho: one shape,
// kernel float dtype and device, any strides; rng, stream: as section 1 (kind 2 draws no noise but
// takes and checks them alike); prior_var: the prior variance v, a finite float > 0 (a host value);
// kind: 0 (w = mu + sigma eps), 1 (w = sigma eps), 2 (w = sigma^2).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  // ---- Section 1: reparameterised noise ----
  // mu, rho: same shape and dtype (float64, float32, float16, bfloat16), any strides
  // -> w = mu + softplus(rho) * eps   (softplus: torch's, threshold 20)
  m.def("vi_sample(Tensor mu, Tensor rho, Tensor rng, int stream) -> Tensor");
  // grad_w, rho: as vi_sample's mu, rho -> grad_rho = grad_w * eps * softplus'(rho) (the same eps;
  // grad_mu is grad_w itself)
  m.def("vi_sample_backward(Tensor grad_w, Tensor rho, Tensor rng, int stream) -> Tensor");
  // mu, rho, grad_w: one shape, dtype and device -> (w, grad_rho): vi_sample(mu, rho) and
  // vi_sample_backward(grad_w, rho) from ONE draw of eps (a layer's backward that needs the weights
  // for its input gradient and d/d rho), bit for bit the two ops' results
  m.def("vi_sample_and_backward(Tensor mu, Tensor rho, Tensor grad_w, Tensor rng, int stream) -> (Tensor, Tensor)");
  // mean, var: same shape and dtype -> mean + sqrt(var) * eps (local reparameterisation of
  // pre-activations); var < 0 (rounding) counts as 0
  m.def("vi_local_noise(Tensor mean, Tensor var, Tensor rng, int stream) -> Tensor");
  // grad_out, var -> grad_var = grad_out * eps / (2 sqrt(var)), 0 where var <= 0 (grad_mean = grad_out)
  m.def("vi_local_noise_backward(Tensor grad_out, Tensor var, Tensor rng, int stream) -> Tensor");
  // out: any floating dtype and strides, filled in place with +1 / -1: element i is -1 when bit i % 32
  // of word (i / 32) % 4 of Philox block i / 128 (the counter scheme of the normal stream) is set
  m.def("vi_rademacher_(Tensor(a!) out, Tensor rng, int stream) -> ()");
  // x: a kernel float dtype, any strides -> x * s (a new contiguous tensor), s the signs vi_rademacher_
  // draws for the same (rng, stream): flipout's sign flips without a sign tensor (exact: x or -x)
  m.def("vi_rademacher_mul(Tensor x, Tensor rng, int stream) -> Tensor");
  // ---- end of section 1 (further ops of the family: a section of their own below) ----

  // ---- Section 2: closed-form KL(q || p) of mean-field Gaussians ----
  // -> 0-dim tensor (float64 for float64 inputs, float32 otherwise):
  //    sum_t sum_i [0.5 log(prior_var[t]) - log(sigma_ti) + (sigma_ti^2 + mu_ti^2) / (2 prior_var[t]) - 0.5]
  //    terms in float32 (float64 for float64), float32 sums of at most 65 terms added in float64,
  //    deterministic (per-block partials, then one fixed-order reduction; no atomics)
  m.def("vi_kl(Tensor[] mus, Tensor[] rhos, Tensor prior_var) -> Tensor");
  // grad: 0-dim floating tensor on the device (read there: no host sync), the gradient of vi_kl's
  // result -> (grad_mus, grad_rhos): new contiguous tensors shaped like mus / rhos, in their dtype,
  //    grad_mu = grad * mu / prior_var[t],  grad_rho = grad * (sigma / prior_var[t] - 1 / sigma) * softplus'(rho)
  m.def("vi_kl_backward(Tensor grad, Tensor[] mus, Tensor[] rhos, Tensor prior_var) -> (Tensor[], Tensor[])");
  // ---- end of section 2 ----

  // ---- Section 3: the local reparameterisation's weight variance ----
  // rho -> softplus(rho)^2   (softplus: torch's, threshold 20)
  m.def("vi_sigma_sq(Tensor rho) -> Tensor");
  // grad <- grad * 2 softplus(rho) softplus'(rho) in place (the gradient of vi_sigma_sq; softplus' is 1
  // above 20): grad must not overlap itself or rho
  m.def("vi_sigma_sq_backward_(Tensor(a!) grad, Tensor rho) -> ()");
  // vi_sigma_sq_backward_(grad, rho) and -> vi_sigma_sq(rho), in one pass over rho, bit for bit the two
  // ops' results (a local layer's backward needs sigma^2 for its input gradient and d/d rho)
  m.def("vi_sigma_sq_and_backward_(Tensor(a!) grad, Tensor rho) -> Tensor");
  // ---- end of section 3 ----

  // ---- Section 4: a layer's weight function with its KL term ----
  // -> (w, kl): w of `kind` (a new contiguous tensor of mu's shape and dtype) and the closed-form
  //    KL(N(mu, sigma^2) || N(0, prior_var)) summed over the elements (0-dim, float64 for float64,
  //    float32 otherwise; section 2's terms and summation rules: deterministic), from one pass
  m.def("vi_weight_kl(Tensor mu, Tensor rho, Tensor rng, int stream, float prior_var, int kind) -> (Tensor, Tensor)");
  // grad_rho (in: dL/dw; out: dL/drho through w and the KL), grad_mu (in: dL/dmu by other paths,
  // ignored for kind 0; out: the total dL/dmu), both written in place (no overlap with each other or
  // any input); kl_grad: dL/dkl, a 0-dim kernel float tensor on the device (read there) -> w of
  // `kind` (as vi_weight_kl's) when want_w, else an empty [0] tensor. One pass, one draw of eps.
  m.def("vi_weight_kl_backward_(Tensor(a!) grad_rho, Tensor(b!) grad_mu, Tensor mu, Tensor rho, Tensor rng, "
        "int stream, Tensor kl_grad, float prior_var, int kind, bool want_w) -> Tensor");
  // ---- end of section 4 ----
}
