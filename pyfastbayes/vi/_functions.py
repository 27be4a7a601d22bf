"""The autograd functions of the Bayesian layers: the sampled weights and the pre-activation noise
are regenerated in the backward pass from the Philox position (seed, step, stream) instead of
being saved, so no noise tensor and no sampled-weight tensor outlives the forward.

- :class:`SampledAffine`: y = op(x, mu + sigma(rho) eps_w, mu_b + sigma(rho_b) eps_b) for op = linear
  or a convolution (the 'reparam' estimator). Saves x, the parameters and the 2-element RNG position; the backward
  forms grad_w with the layer's own op, then draws w again and d/d rho = grad_w * eps * sigmoid(rho)
  in one pass over the noise (``ops.vi_sample_and_backward``; one of ``ops.vi_sample`` /
  ``ops.vi_sample_backward`` when only grad_x or only d/d rho is needed), and grad_x from w.
- :class:`Flipout`: the flipout estimator's whole layer as one node (signs, perturbation and
  bias noise regenerated in the backward).
- :class:`LocalMoments`: the local reparameterisation's pre-activation mean = affine(x, mu, bias_mu)
  and var = affine(x^2, sigma^2, sigma_b^2) as one node; sigma^2 recomputed in the backward with
  d/d rho in one pass (``ops.vi_sigma_sq_and_backward_``, over the d/d sigma^2 it turns into d/d rho).
- :class:`LocalNoise`: out = mean + sqrt(var) eps over pre-activations (local
  reparameterisation); saves var and the RNG position, regenerates eps in the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops


class Affine:
    """The layer's operation op(x, w, b) and its two input/weight gradients."""

    def __init__(self, kind: str, stride=1, padding=0, dilation=1, groups=1):
        self.kind, self.stride, self.padding, self.dilation, self.groups = kind, stride, padding, dilation, groups

    def __call__(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def grad_input(self, x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        if self.kind == "linear":
            return torch.mm(g, w) if g.dim() == 2 else g @ w
        return torch.nn.grad.conv2d_input(x.shape, w, g, self.stride, self.padding, self.dilation, self.groups)

    def grad_weight(self, x: Tensor, w_shape, g: Tensor) -> Tensor:
        if self.kind == "linear":
            if g.dim() == 2 and x.dim() == 2:  # the common [N, features] case: no reshape dispatches
                return torch.mm(g.t(), x)
            return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return torch.nn.grad.conv2d_weight(x, w_shape, g, self.stride, self.padding, self.dilation, self.groups)

    def grad_bias(self, g: Tensor) -> Tensor:
        if self.kind == "linear":
            return g.sum(0) if g.dim() == 2 else g.reshape(-1, g.shape[-1]).sum(0)
        return g.sum((0, 2, 3))


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype`` (t itself when it already is: ``Tensor.to`` costs a dispatch even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def _fresh_as(t: Tensor, like: Tensor) -> Tensor:
    """t, a tensor this backward just made, in like's dtype and contiguous (the in-place vi_sigma_sq
    ops write over it): t itself when it already is (the weight and bias gradients of Affine are)."""
    t = _as_dtype(t, like.dtype)
    return t if t.is_contiguous() else t.contiguous()


def _in_param_dtype(mu: Tensor, *ts: Tensor | None) -> list:
    """The saved input and the incoming gradients in the parameters' dtype: under autocast the
    forward's affine op ran in the autocast dtype, so the gradients arrive in it (bf16) while x and
    the parameters are fp32, and the backward's products would mix dtypes; they are formed in the
    parameters' dtype (autograd hands grad_x back in x's own dtype). A no-op outside autocast."""
    return [t if t is None else _as_dtype(t, mu.dtype) for t in ts]


def _zero_mean(rho: Tensor) -> Tensor:
    return rho.new_zeros(()).expand(rho.shape)


class SampledAffine(torch.autograd.Function):
    """y = affine(x, W, b) with W = mu + sigma(rho) eps (eps from (rng, stream)) regenerated in backward."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, rng, stream, bias_stream, affine: Affine):
        w = ops.vi_sample(mu, rho, rng, stream)
        b = None if bias_mu is None else ops.vi_sample(bias_mu, bias_rho, rng, bias_stream)
        ctx.save_for_backward(x, mu, rho, bias_rho, rng)
        ctx.meta = (stream, bias_stream, affine, bias_mu is not None)
        return affine(x, w, b)

    @staticmethod
    @once_differentiable  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g):
        x, mu, rho, bias_rho, rng = ctx.saved_tensors
        x, g = _in_param_dtype(mu, x, g)
        stream, bias_stream, affine, has_bias = ctx.meta
        gx = gmu = grho = gbmu = gbrho = None
        need_x, need_mu, need_rho = ctx.needs_input_grad[:3]
        gw = _as_dtype(affine.grad_weight(x, rho.shape, g), rho.dtype) if need_mu or need_rho else None
        if need_x and need_rho:  # w and d/d rho from one draw of the noise
            w, grho = ops.vi_sample_and_backward(mu, rho, gw, rng, stream)
            gx = affine.grad_input(x, w, g)
            del w
        elif need_x:
            gx = affine.grad_input(x, ops.vi_sample(mu, rho, rng, stream), g)
        elif need_rho:
            grho = ops.vi_sample_backward(gw, rho, rng, stream)
        gmu = gw if need_mu else None
        if has_bias and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            gb = _as_dtype(affine.grad_bias(g), bias_rho.dtype)
            gbmu = gb if ctx.needs_input_grad[3] else None
            gbrho = ops.vi_sample_backward(gb, bias_rho, rng, bias_stream) if ctx.needs_input_grad[4] else None
        return gx, gmu, grho, gbmu, gbrho, None, None, None, None


def _signs_mul(t: Tensor, rng: Tensor, stream: int, affine: "Affine") -> Tensor:
    """t times random signs shared by the positions of an example: flipout's s_in / s_out are per
    example and feature (Wen et al. 2018; TFP's Conv2DFlipout: [N, C] broadcast over the pixels), so
    every position of one example sees the same weight draw. [N, F] inputs of a Linear (and t of
    any shape whose positions are its rows): one sign per element, the signs made inside the op;
    a conv's [N, C, H, W] (or a Linear's [N, ..., F]): a [N, C, 1, 1] ([N, 1, ..., F]) sign tensor."""
    if t.dim() <= 2:
        return ops.vi_rademacher_mul(t, rng, stream)
    if affine.kind == "linear":
        shape = (t.shape[0],) + (1,) * (t.dim() - 2) + (t.shape[-1],)
    else:
        shape = tuple(t.shape[:2]) + (1,) * (t.dim() - 2)
    signs = ops.vi_rademacher_(torch.empty(shape, dtype=t.dtype, device=t.device), rng, stream)
    return t * signs


class Flipout(torch.autograd.Function):
    """Flipout (Wen et al. 2018) as one autograd node:
    out = affine(x, mu, b) + affine(x * s_in, sigma(rho) eps, None) * s_out, b = bias_mu + sigma(bias_rho) eps_b,
    with the shared perturbation sigma eps (stream s), eps_b (s + 1) and the random signs s_in
    (s + 3) and s_out (s + 4), one per example and feature (:func:`_signs_mul`), all regenerated in
    the backward (for [N, F] inputs by ``ops.vi_rademacher_mul``: no sign tensor at all). Saves x,
    mu, rho, bias_rho and the RNG position: no noise or perturbation tensor outlives the forward."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, rng, stream: int, affine: Affine):
        b = None if bias_mu is None else ops.vi_sample(bias_mu, bias_rho, rng, stream + 1)
        xs = _signs_mul(x, rng, stream + 3, affine)  # x * s_in
        pert = affine(xs, ops.vi_sample(_zero_mean(rho), rho, rng, stream), None)
        del xs
        out = affine(x, mu, b)
        out.add_(_signs_mul(pert, rng, stream + 4, affine))  # + pert * s_out
        ctx.save_for_backward(x, mu, rho, bias_rho, rng)
        ctx.meta = (stream, affine, bias_mu is not None)
        return out

    @staticmethod
    @once_differentiable  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g):
        x, mu, rho, bias_rho, rng = ctx.saved_tensors
        x, g = _in_param_dtype(mu, x, g)
        stream, affine, has_bias = ctx.meta
        need = ctx.needs_input_grad
        gx = gmu = grho = gbmu = gbrho = None
        if need[0] or need[2]:  # the perturbation's path: grad_out g * s_out
            gp = _signs_mul(g, rng, stream + 4, affine)
        gdw = dw = None
        if need[2]:  # d/d dW from x * s_in
            gdw = _as_dtype(affine.grad_weight(_signs_mul(x, rng, stream + 3, affine), rho.shape, gp), rho.dtype)
        if need[0] and need[2]:  # dW and d/d rho from one draw of the noise
            dw, grho = ops.vi_sample_and_backward(_zero_mean(rho), rho, gdw, rng, stream)
        elif need[0]:
            dw = ops.vi_sample(_zero_mean(rho), rho, rng, stream)  # transient
        elif need[2]:
            grho = ops.vi_sample_backward(gdw, rho, rng, stream)
        if need[0]:
            gx = _signs_mul(affine.grad_input(x, dw, gp), rng, stream + 3, affine).add_(affine.grad_input(x, mu, g))
            del dw
        if need[1]:
            gmu = _as_dtype(affine.grad_weight(x, mu.shape, g), mu.dtype)
        if has_bias and (need[3] or need[4]):
            gb = _as_dtype(affine.grad_bias(g), bias_rho.dtype)
            gbmu = gb if need[3] else None
            gbrho = ops.vi_sample_backward(gb, bias_rho, rng, stream + 1) if need[4] else None
        return gx, gmu, grho, gbmu, gbrho, None, None, None


class LocalMoments(torch.autograd.Function):
    """The local reparameterisation's pre-activation moments as one autograd node: mean = affine(x,
    mu, bias_mu) and var = affine(x^2, sigma^2, sigma_b^2), sigma^2 = softplus(rho)^2 (``ops.vi_sigma_sq``).
    Saves x, mu, rho and bias_rho: sigma^2 and x^2 are recomputed in the backward (no weight-sized
    tensor outlives the forward). The noise is :class:`LocalNoise`'s, a node of its own so that the
    engine frees the saved var (activation-sized) as soon as its gradient is formed."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, affine: Affine):
        ctx.save_for_backward(x, mu, rho, bias_rho)
        ctx.meta = (affine, None if bias_mu is None else bias_mu.dtype)
        sb2 = None if bias_rho is None else ops.vi_sigma_sq(bias_rho)
        return affine(x, mu, bias_mu), affine(x.square(), ops.vi_sigma_sq(rho), sb2)

    @staticmethod
    @once_differentiable  # with LocalNoise's: no silent second order through half the graph
    def backward(ctx, g, gv):
        x, mu, rho, bias_rho = ctx.saved_tensors
        x, g, gv = _in_param_dtype(mu, x, g, gv)
        affine, bias_dtype = ctx.meta
        need = ctx.needs_input_grad
        gx = gmu = grho = gbmu = gbrho = s2 = None
        if need[2]:  # d/d sigma^2 (affine's weight gradient from x^2), turned into d/d rho in place, with
            # sigma^2 itself from the same pass when grad_x needs it; x^2 freed right after
            grho = _fresh_as(affine.grad_weight(x.square(), rho.shape, gv), rho)
            if need[0]:
                s2 = ops.vi_sigma_sq_and_backward_(grho, rho)
            else:
                ops.vi_sigma_sq_backward_(grho, rho)
        if bias_rho is not None and need[4]:
            gbrho = ops.vi_sigma_sq_backward_(_fresh_as(affine.grad_bias(gv), bias_rho), bias_rho)
        if need[0]:  # grad_x = affine^T(g, mu) + 2 x * affine^T(gv, sigma^2) (affine^T reads x's shape only)
            gx_var = affine.grad_input(x, ops.vi_sigma_sq(rho) if s2 is None else s2, gv)
            del s2
            gx = affine.grad_input(x, mu, g).addcmul_(x, gx_var, value=2)
            del gx_var
        if need[1]:
            gmu = _as_dtype(affine.grad_weight(x, mu.shape, g), mu.dtype)
        if bias_dtype is not None and need[3]:
            gbmu = _as_dtype(affine.grad_bias(g), bias_dtype)
        return gx, gmu, grho, gbmu, gbrho, None


class LocalNoise(torch.autograd.Function):
    """out = mean + sqrt(var) * eps over pre-activations (local reparameterisation), eps (stream
    ``stream``) regenerated in the backward; saves var and the RNG position."""

    @staticmethod
    def forward(ctx, mean, var, rng, stream):
        ctx.save_for_backward(var, rng)
        ctx.stream = stream
        return ops.vi_local_noise(mean, var, rng, stream)

    @staticmethod
    @once_differentiable  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g):
        var, rng = ctx.saved_tensors
        gv = ops.vi_local_noise_backward(g, var, rng, ctx.stream) if ctx.needs_input_grad[1] else None
        return g, gv, None, None
