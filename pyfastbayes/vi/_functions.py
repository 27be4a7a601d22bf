"""The autograd functions of the Bayesian layers: the sampled weights and the pre-activation noise
are regenerated in the backward pass from the Philox position (seed, step, stream) instead of
being saved, so no noise tensor and no sampled-weight tensor outlives the forward.

- :class:`SampledAffine`: y = op(x, mu + sigma(rho) eps_w, mu_b + sigma(rho_b) eps_b) for op = linear
  or a convolution (the 'reparam' estimator; with ``center=False`` the weights are sigma eps only,
  flipout's perturbation). Saves x, the parameters and the 2-element RNG position; the backward
  draws w again (``ops.vi_sample``), forms grad_x and grad_w with the layer's own ops, and
  d/d rho = grad_w * eps * sigmoid(rho) in one fused pass (``ops.vi_sample_backward``).
- :class:`Regenerated`: out = mean + sqrt(var) eps over pre-activations (local
  reparameterisation), or a bias vector mu + softplus(rho) eps; saves var / rho and the RNG
  position, regenerates eps in the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
            return g @ w
        return torch.nn.grad.conv2d_input(x.shape, w, g, self.stride, self.padding, self.dilation, self.groups)

    def grad_weight(self, x: Tensor, w_shape, g: Tensor) -> Tensor:
        if self.kind == "linear":
            return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return torch.nn.grad.conv2d_weight(x, w_shape, g, self.stride, self.padding, self.dilation, self.groups)

    def grad_bias(self, g: Tensor) -> Tensor:
        if self.kind == "linear":
            return g.reshape(-1, g.shape[-1]).sum(0)
        return g.sum((0, 2, 3))


def _zero_mean(rho: Tensor) -> Tensor:
    return rho.new_zeros(()).expand(rho.shape)


class SampledAffine(torch.autograd.Function):
    """y = affine(x, W, b) with W = mu + sigma(rho) eps (eps from (rng, stream)) regenerated in backward."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, rng, stream, bias_stream, affine: Affine, center: bool):
        w = ops.vi_sample(mu if center else _zero_mean(rho), rho, rng, stream)
        b = None
        if bias_mu is not None:
            b = ops.vi_sample(bias_mu if center else _zero_mean(bias_rho), bias_rho, rng, bias_stream)
        ctx.save_for_backward(x, mu, rho, bias_rho, rng)
        ctx.meta = (stream, bias_stream, affine, center, bias_mu is not None)
        return affine(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, mu, rho, bias_rho, rng = ctx.saved_tensors
        stream, bias_stream, affine, center, has_bias = ctx.meta
        gx = gmu = grho = gbmu = gbrho = None
        if ctx.needs_input_grad[0]:
            w = ops.vi_sample(mu if center else _zero_mean(rho), rho, rng, stream)  # transient
            gx = affine.grad_input(x, w, g)
            del w
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw = affine.grad_weight(x, rho.shape, g).to(rho.dtype)
            gmu = gw if (center and ctx.needs_input_grad[1]) else None
            grho = ops.vi_sample_backward(gw, rho, rng, stream) if ctx.needs_input_grad[2] else None
        if has_bias and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            gb = affine.grad_bias(g).to(bias_rho.dtype)
            gbmu = gb if (center and ctx.needs_input_grad[3]) else None
            gbrho = ops.vi_sample_backward(gb, bias_rho, rng, bias_stream) if ctx.needs_input_grad[4] else None
        return gx, gmu, grho, gbmu, gbrho, None, None, None, None, None


class Regenerated(torch.autograd.Function):
    """out = a + scale(b) * eps with eps regenerated in the backward, for the two elementwise noise
    ops: kind 'sample' (b = rho: a + softplus(rho) eps; a bias vector) and 'local' (b = var:
    mean + sqrt(var) eps, local reparameterisation). Saves b and the RNG position."""

    OPS = {"sample": (ops.vi_sample, ops.vi_sample_backward), "local": (ops.vi_local_noise, ops.vi_local_noise_backward)}

    @staticmethod
    def forward(ctx, a, b, rng, stream, kind: str):
        ctx.save_for_backward(b, rng)
        ctx.stream, ctx.kind = stream, kind
        return Regenerated.OPS[kind][0](a, b, rng, stream)

    @staticmethod
    def backward(ctx, g):
        b, rng = ctx.saved_tensors
        gb = Regenerated.OPS[ctx.kind][1](g, b, rng, ctx.stream) if ctx.needs_input_grad[1] else None
        return g, gb, None, None, None


def _dsoftplus(rho: Tensor) -> Tensor:
    """d softplus / d rho for torch's softplus (threshold 20: the identity above it)."""
    return torch.where(rho > 20, torch.ones_like(rho), torch.sigmoid(rho))


class LocalVariance(torch.autograd.Function):
    """var = affine(x^2, softplus(rho)^2, softplus(rho_b)^2), the pre-activation variance of the local
    reparameterisation; saves x and the rho parameters only (sigma^2 and x^2 are recomputed in the
    backward: autograd through softplus would keep two weight-sized tensors per layer)."""

    @staticmethod
    def forward(ctx, x, rho, bias_rho, affine: Affine):
        ctx.save_for_backward(x, rho, bias_rho)
        ctx.affine = affine
        sb2 = None if bias_rho is None else F.softplus(bias_rho).square()
        return affine(x.square(), F.softplus(rho).square(), sb2)

    @staticmethod
    def backward(ctx, g):
        x, rho, bias_rho = ctx.saved_tensors
        affine = ctx.affine
        x2 = x.square()
        gx = grho = gbrho = None
        if ctx.needs_input_grad[0]:
            gx = affine.grad_input(x2, F.softplus(rho).square(), g) * (2 * x)
        if ctx.needs_input_grad[1]:
            grho = affine.grad_weight(x2, rho.shape, g).to(rho.dtype) * (2 * F.softplus(rho) * _dsoftplus(rho))
        if bias_rho is not None and ctx.needs_input_grad[2]:
            gbrho = affine.grad_bias(g).to(bias_rho.dtype) * (2 * F.softplus(bias_rho) * _dsoftplus(bias_rho))
        return gx, grho, gbrho, None
