"""The vi family: the noise of variational inference, drawn inside the kernels from the Philox
stream and never stored (math in csrc/common/vi.h, reference in pyfastbayes/_reference/vi.py).

Section 1, reparameterised noise. Every op takes ``rng``, the RNG position (seed, step): an int64
[2] tensor on the tensors' device (the layout :data:`pyfastbayes.ops.RNG` of the SG-MCMC steps),
read by the kernel itself (on the GPU for CUDA tensors, so calls can be captured in a CUDA graph)
and never advanced by these ops, and ``stream``, a Philox stream id in [0, 2^32). The noise of
element i (row-major logical order) is exactly element i of
``philox_normal_(out, seed=rng[0], stream, step=rng[1])``: a float32 standard normal, also for
float64 tensors. The same (rng, stream) therefore regenerates the same eps, which is how a
backward pass recovers the forward's noise without saving it.

Section 2, the closed-form KL of mean-field Gaussians (:func:`vi_kl`, :func:`vi_kl_backward`):
one fused reduction over every (mu, rho) tensor pair of a model, in one kernel launch.

Section 3, the local reparameterisation's weight variance (:func:`vi_sigma_sq`,
:func:`vi_sigma_sq_backward_`, :func:`vi_sigma_sq_and_backward_`): sigma^2 = softplus(rho)^2 and
its gradient (written over the incoming gradient) in one elementwise pass over rho (no noise), for
the local estimator's x^2 sigma^2^T.

Section 4, a layer's weight function with its KL term (:func:`vi_weight_kl`,
:func:`vi_weight_kl_backward_`): the tensor a Bayesian layer's forward needs (mu + sigma eps, sigma eps
or sigma^2) and the layer's closed-form KL from one pass over (mu, rho), and in the backward both
gradients, through the weight and through the KL, from one pass, so that a layer carries its KL
instead of a separate reduction and backward re-reading every mu and rho.

Ops of a further section of the family go at the end of this module.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _native
from .._reference.vi import (check_vi_kl, check_vi_pair, check_vi_rademacher_, check_vi_rademacher_mul,
                             check_vi_sample_and_backward, check_vi_sigma_sq, check_vi_weight_kl,
                             check_vi_weight_kl_backward_)
from ._dispatch import device_of, select

__all__ = ["vi_sample", "vi_sample_backward", "vi_sample_and_backward",
           "vi_local_noise", "vi_local_noise_backward", "vi_rademacher_", "vi_rademacher_mul", "vi_kl",
           "vi_kl_backward", "vi_sigma_sq", "vi_sigma_sq_backward_", "vi_sigma_sq_and_backward_", "vi_weight_kl",
           "vi_weight_kl_backward_", "WEIGHT_SAMPLE", "WEIGHT_PERTURBATION", "WEIGHT_VARIANCE"]

# ======================= Section 1: reparameterised noise =======================================


def vi_sample(mu: Tensor, rho: Tensor, rng: Tensor, stream: int, *, backend: str | None = None) -> Tensor:
    """A draw of mean-field Gaussian weights: ``w = mu + softplus(rho) * eps``.

    mu, rho: [any shape], one dtype (float64, float32, float16 or bfloat16), one device, any
    strides. rng: int64 [2] = (seed, step) on their device. stream: in [0, 2^32).
    Returns w, a new contiguous tensor of mu's shape and dtype. softplus is torch's (beta 1,
    threshold 20: rho itself above 20); math in float32 (float64 for float64). eps is the normal
    stream of ``philox_normal_`` at (rng[0], stream, rng[1]). Not differentiable by itself:
    d w / d mu = 1 and d w / d rho come from :func:`vi_sample_backward` (same rng and stream).

    backend: None (native kernel when available), 'native' or 'reference'.
    """
    return select("vi_sample", mu.device, backend)(mu, rho, rng, stream)


def vi_sample_backward(grad_w: Tensor, rho: Tensor, rng: Tensor, stream: int, *,
                       backend: str | None = None) -> Tensor:
    """The gradient of :func:`vi_sample` with respect to rho: ``grad_rho = grad_w * eps * softplus'(rho)``.

    grad_w, rho: [any shape], as vi_sample's mu and rho; rng and stream: those of the forward
    call, whose eps is regenerated (the step must not have been advanced in between).
    softplus'(rho) = sigmoid(rho) below the threshold 20 and exactly 1 above it (the derivative
    of vi_sample's softplus on both sides). Returns a new contiguous tensor of rho's shape and
    dtype. The gradient with respect to mu is grad_w itself.
    """
    return select("vi_sample_backward", grad_w.device, backend)(grad_w, rho, rng, stream)


def vi_sample_and_backward(mu: Tensor, rho: Tensor, grad_w: Tensor, rng: Tensor, stream: int, *,
                           backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``(vi_sample(mu, rho, rng, stream), vi_sample_backward(grad_w, rho, rng, stream))`` from ONE
    draw of eps: the backward pass of a layer that needs both its sampled weights (for the input
    gradient) and d/d rho, in one pass over the noise instead of two.

    mu, rho, grad_w: [any shape], one shape, dtype (fp64 / fp32 / fp16 / bf16) and device, any
    strides; rng and stream: those of the forward draw. Returns (w, grad_rho): new contiguous
    tensors of mu's shape and dtype, bit for bit the two ops' results on the same backend.
    """
    return select("vi_sample_and_backward", mu.device, backend)(mu, rho, grad_w, rng, stream)


def vi_local_noise(mean: Tensor, var: Tensor, rng: Tensor, stream: int, *, backend: str | None = None) -> Tensor:
    """Local reparameterisation of pre-activations: ``out = mean + sqrt(var) * eps``.

    mean, var: [any shape, e.g. N x out_features], one dtype (fp64 / fp32 / fp16 / bf16), one
    device, any strides; rng, stream as in :func:`vi_sample`. var must be >= 0; the op does not
    check it (no host sync): values below 0, as rounding can leave a computed variance, count as
    0 (out = mean there). NaN propagates. Returns a new contiguous tensor of mean's shape and dtype.
    """
    return select("vi_local_noise", mean.device, backend)(mean, var, rng, stream)


def vi_local_noise_backward(grad_out: Tensor, var: Tensor, rng: Tensor, stream: int, *,
                            backend: str | None = None) -> Tensor:
    """The gradient of :func:`vi_local_noise` with respect to var:
    ``grad_var = grad_out * eps / (2 sqrt(var))``, and 0 where var <= 0 (where sqrt is not
    differentiable; the forward had no noise there).

    grad_out, var: [any shape], as vi_local_noise's mean and var; rng and stream: those of the
    forward call. Returns a new contiguous tensor. The gradient with respect to mean is grad_out.
    """
    return select("vi_local_noise_backward", grad_out.device, backend)(grad_out, var, rng, stream)


def vi_rademacher_(out: Tensor, rng: Tensor, stream: int, *, backend: str | None = None) -> Tensor:
    """Fill ``out`` [any shape, any floating dtype and strides] with random signs +1 / -1 in place
    (flipout's sign vectors).

    Element i (row-major logical order) is -1 when bit i % 32 of word (i // 32) % 4 of the
    Philox4x32-10 block i // 128 is set, else +1 (128 signs per block), with counter (block lo,
    block hi, stream, step) and key seed: the raw bits under the normal stream of the same (seed,
    stream, step), so use a stream id of its own for the signs. out must not overlap itself or rng.
    rng: int64 [2] = (seed, step) on out's device; stream in [0, 2^32). Returns ``out``.
    """
    select("vi_rademacher_", out.device, backend)(out, rng, stream)
    return out


def vi_rademacher_mul(x: Tensor, rng: Tensor, stream: int, *, backend: str | None = None) -> Tensor:
    """``x * s`` with s the random signs :func:`vi_rademacher_` draws for the same (rng, stream),
    without a sign tensor (flipout's sign flips of its input, output and their gradients).

    x: [any shape], float64, float32, float16 or bfloat16, any strides. rng: int64 [2] = (seed,
    step) on x's device. stream: in [0, 2^32). Returns a new contiguous tensor of x's shape and
    dtype, element i = x_i or -x_i (exact; NaN stays NaN). Not differentiable by itself: its
    gradient is the same op on the upstream gradient (the signs are their own inverse).

    backend: None (native kernel when available), 'native' or 'reference'.
    """
    return select("vi_rademacher_mul", x.device, backend)(x, rng, stream)

# ======================= end of section 1 =======================================================

# ======================= Section 2: closed-form KL of mean-field Gaussians ========================


def vi_kl(mus: Sequence[Tensor], rhos: Sequence[Tensor], prior_var: Tensor, *, backend: str | None = None) -> Tensor:
    """KL(q || p) of mean-field Gaussians q = N(mu, sigma^2), sigma = softplus(rho), against
    zero-mean Gaussian priors N(0, prior_var[t]), summed over every element of every tensor:

        sum_t sum_i [0.5 log prior_var[t] - log sigma_ti + (sigma_ti^2 + mu_ti^2) / (2 prior_var[t]) - 0.5]

    mus, rhos: lists of T >= 1 tensors, rhos[t] of mus[t]'s shape [any shape, empty allowed], all of
    one dtype (float64, float32, float16 or bfloat16) on one device, any strides. prior_var: float64
    [T] on that device, each value finite and > 0: checked for a CPU tensor; a CUDA prior_var is not
    read on the host (no sync), and a bad value gives a NaN result. softplus is torch's (threshold
    20); log sigma is computed stably (= rho below -20), so any finite rho works (e.g. -80 .. 80).

    Returns a 0-dim tensor on the device: float64 for float64 inputs, else float32. The terms are
    computed in float32 (float64 for float64), summed in float32 runs of at most 65 terms that are
    added in float64; the result is deterministic (fixed summation order, no atomics). Not
    differentiable by itself: the gradients come from :func:`vi_kl_backward`.

    backend: None (native kernel when available), 'native' or 'reference'.
    """
    mus, rhos = list(mus), list(rhos)
    return select("vi_kl", device_of(mus, prior_var), backend)(mus, rhos, prior_var)


def vi_kl_backward(grad: Tensor, mus: Sequence[Tensor], rhos: Sequence[Tensor], prior_var: Tensor, *,
                   backend: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients of ``grad * vi_kl(mus, rhos, prior_var)``:

        grad_mus[t]  = grad * mu / prior_var[t]
        grad_rhos[t] = grad * (sigma / prior_var[t] - 1 / sigma) * softplus'(rho)

    grad: a 0-dim tensor (float64, float32, float16 or bfloat16) on the device, e.g. the gradient of
    vi_kl's result; read on the device for CUDA (no host sync). mus, rhos, prior_var: as
    :func:`vi_kl`. softplus' is sigmoid below the threshold 20 and 1 above it (the derivative of
    vi_kl's softplus), and softplus'(rho) / sigma is computed stably (-> 1 as rho -> -inf).
    Returns (grad_mus, grad_rhos): two lists of T new contiguous tensors shaped like mus[t], in the
    inputs' dtype (math in float32, float64 for float64). One kernel launch over all tensors.
    """
    mus, rhos = list(mus), list(rhos)
    gms, grs = select("vi_kl_backward", device_of(mus, prior_var), backend)(grad, mus, rhos, prior_var)
    return list(gms), list(grs)

# ======================= end of section 2 =======================================================

# ======================= Section 3: the local reparameterisation's weight variance =================


def vi_sigma_sq(rho: Tensor, *, backend: str | None = None) -> Tensor:
    """The weight variance of a mean-field Gaussian: ``sigma^2 = softplus(rho)^2``.

    rho: [any shape], float64, float32, float16 or bfloat16, any strides. Returns a new contiguous
    tensor of rho's shape and dtype. softplus is torch's (beta 1, threshold 20: rho itself above
    20); math in float32 (float64 for float64); rho = -inf gives 0, NaN stays NaN. Not
    differentiable by itself: the gradient comes from :func:`vi_sigma_sq_backward_`.

    backend: None (native kernel when available), 'native' or 'reference'.
    """
    return select("vi_sigma_sq", rho.device, backend)(rho)


def vi_sigma_sq_backward_(grad: Tensor, rho: Tensor, *, backend: str | None = None) -> Tensor:
    """The gradient of :func:`vi_sigma_sq`, in place: ``grad <- grad * 2 softplus(rho) softplus'(rho)``.

    grad, rho: [any shape], one shape, dtype (fp64 / fp32 / fp16 / bf16) and device, any strides;
    grad (the incoming gradient, overwritten with d/d rho: pass a temporary of your own) must not
    overlap itself or rho. softplus'(rho) = sigmoid(rho) below the threshold 20 and exactly 1 above
    it (the derivative of vi_sigma_sq on both sides), as torch's ``softplus_backward``. Returns
    ``grad``; a call refused by its checks leaves it unchanged.
    """
    select("vi_sigma_sq_backward_", grad.device, backend)(grad, rho)
    return grad


def vi_sigma_sq_and_backward_(grad: Tensor, rho: Tensor, *, backend: str | None = None) -> Tensor:
    """:func:`vi_sigma_sq_backward_` (grad overwritten with d/d rho) and ``vi_sigma_sq(rho)``, returned,
    in one pass over rho: the backward of a local-reparameterisation layer, which needs sigma^2 for
    its input gradient and d/d rho.

    grad, rho: as :func:`vi_sigma_sq_backward_`. Returns sigma^2, a new contiguous tensor of rho's
    shape and dtype; both results bit for bit those of the two ops on the same backend.
    """
    return select("vi_sigma_sq_and_backward_", grad.device, backend)(grad, rho)

# ======================= end of section 3 =======================================================

# ======================= Section 4: a layer's weight function with its KL term ======================

WEIGHT_SAMPLE, WEIGHT_PERTURBATION, WEIGHT_VARIANCE = 0, 1, 2  # the ``kind`` of the section 4 ops


def vi_weight_kl(mu: Tensor, rho: Tensor, rng: Tensor, stream: int, prior_var: float, kind: int, *,
                 backend: str | None = None) -> tuple[Tensor, Tensor]:
    """A Bayesian layer's weight function and its KL term from one pass over (mu, rho).

    mu, rho: [any shape], one dtype (float64, float32, float16 or bfloat16) and device, any strides.
    rng, stream: as :func:`vi_sample` (kind 2 draws no noise but checks them alike). prior_var: the
    prior variance v of N(0, v), a finite float > 0. kind: :data:`WEIGHT_SAMPLE` (0, w = mu + sigma
    eps: 'reparam'), :data:`WEIGHT_PERTURBATION` (1, w = sigma eps: flipout's perturbation) or
    :data:`WEIGHT_VARIANCE` (2, w = sigma^2: the local estimator's variance), sigma = softplus(rho).

    Returns (w, kl): w a new contiguous tensor of mu's shape and dtype (bit for bit :func:`vi_sample`
    / :func:`vi_sigma_sq` on the CPU), kl the 0-dim sum of KL(N(mu, sigma^2) || N(0, v)) over the
    elements, float64 for float64 inputs, else float32, summed as :func:`vi_kl` sums (deterministic).
    Not differentiable by itself: the gradients come from :func:`vi_weight_kl_backward_`.
    """
    return select("vi_weight_kl", mu.device, backend)(mu, rho, rng, stream, float(prior_var), int(kind))


def vi_weight_kl_backward_(grad_rho: Tensor, grad_mu: Tensor, mu: Tensor, rho: Tensor, rng: Tensor, stream: int,
                           kl_grad: Tensor, prior_var: float, kind: int, want_w: bool = False, *,
                           backend: str | None = None) -> Tensor:
    """The gradients of :func:`vi_weight_kl`'s two results in one pass, written in place:

        grad_rho <- d eps softplus'(rho)  (kinds 0, 1)  or  d 2 sigma softplus'(rho)  (kind 2)
                    + g (sigma / v - 1 / sigma) softplus'(rho)
        grad_mu  <- (d for kind 0, else grad_mu) + g mu / v

    with d = grad_rho's value on entry (dL/dw, e.g. the layer's weight gradient from its input) and g
    = kl_grad (dL/dkl, a 0-dim float tensor on the device, read there: no host sync). grad_mu holds on
    entry the gradient of mu by its other paths (flipout's and the local estimator's mean; ignored
    for kind 0, whose w is mu's only path). grad_rho, grad_mu, mu, rho: one shape, dtype and device,
    any strides; the two written tensors must not overlap themselves, each other or an input.
    The same eps as :func:`vi_weight_kl` at the same (rng, stream). Returns w (as
    :func:`vi_weight_kl`, for the layer's input gradient) when want_w, else an empty [0] tensor.
    A call refused by its checks changes nothing.
    """
    return select("vi_weight_kl_backward_", grad_rho.device, backend)(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad,
                                                                      float(prior_var), int(kind), bool(want_w))

# ======================= end of section 4 =======================================================


if _native.available():

    def _new_like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pyfastbayes::vi_sample")
    def _(mu, rho, rng, stream):
        check_vi_pair("vi_sample", mu, "mu", rho, "rho", rng, stream, fake=True)
        return _new_like(mu)

    @torch.library.register_fake("pyfastbayes::vi_sample_backward")
    def _(grad_w, rho, rng, stream):
        check_vi_pair("vi_sample_backward", grad_w, "grad_w", rho, "rho", rng, stream, fake=True)
        return _new_like(grad_w)

    @torch.library.register_fake("pyfastbayes::vi_sample_and_backward")
    def _(mu, rho, grad_w, rng, stream):
        check_vi_sample_and_backward(mu, rho, grad_w, rng, stream, fake=True)
        return _new_like(mu), _new_like(mu)

    @torch.library.register_fake("pyfastbayes::vi_local_noise")
    def _(mean, var, rng, stream):
        check_vi_pair("vi_local_noise", mean, "mean", var, "var", rng, stream, fake=True)
        return _new_like(mean)

    @torch.library.register_fake("pyfastbayes::vi_local_noise_backward")
    def _(grad_out, var, rng, stream):
        check_vi_pair("vi_local_noise_backward", grad_out, "grad_out", var, "var", rng, stream, fake=True)
        return _new_like(grad_out)

    @torch.library.register_fake("pyfastbayes::vi_rademacher_")
    def _(out, rng, stream):
        check_vi_rademacher_(out, rng, stream, fake=True)
        return None

    @torch.library.register_fake("pyfastbayes::vi_rademacher_mul")
    def _(x, rng, stream):
        check_vi_rademacher_mul(x, rng, stream, fake=True)
        return _new_like(x)

    @torch.library.register_fake("pyfastbayes::vi_kl")
    def _(mus, rhos, prior_var):
        check_vi_kl("vi_kl", mus, rhos, prior_var, fake=True)
        dtype = torch.float64 if mus[0].dtype == torch.float64 else torch.float32
        return mus[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("pyfastbayes::vi_kl_backward")
    def _(grad, mus, rhos, prior_var):
        check_vi_kl("vi_kl_backward", mus, rhos, prior_var, grad, fake=True)
        return [_new_like(m) for m in mus], [_new_like(m) for m in mus]

    @torch.library.register_fake("pyfastbayes::vi_sigma_sq")
    def _(rho):
        check_vi_sigma_sq("vi_sigma_sq", rho, fake=True)
        return _new_like(rho)

    @torch.library.register_fake("pyfastbayes::vi_sigma_sq_backward_")
    def _(grad, rho):
        check_vi_sigma_sq("vi_sigma_sq_backward_", rho, grad, fake=True)
        return None

    @torch.library.register_fake("pyfastbayes::vi_sigma_sq_and_backward_")
    def _(grad, rho):
        check_vi_sigma_sq("vi_sigma_sq_and_backward_", rho, grad, fake=True)
        return _new_like(rho)

    @torch.library.register_fake("pyfastbayes::vi_weight_kl")
    def _(mu, rho, rng, stream, prior_var, kind):
        check_vi_weight_kl(mu, rho, rng, stream, prior_var, kind, fake=True)
        dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
        return _new_like(mu), mu.new_empty((), dtype=dtype)

    @torch.library.register_fake("pyfastbayes::vi_weight_kl_backward_")
    def _(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad, prior_var, kind, want_w):
        check_vi_weight_kl_backward_(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad, prior_var, kind, fake=True)
        return _new_like(mu) if want_w else mu.new_empty(0)
