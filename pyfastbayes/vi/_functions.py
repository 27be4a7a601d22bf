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

The layer's KL. Given ``prior_var`` (the Gaussian prior's variance; a layer passes it when it
samples with grad mode on), the first three nodes also return the layer's closed-form KL (weight
and bias) as one more output, made in the pass that makes w (``ops.vi_weight_kl``), and their
backward adds its gradient in the pass that forms d/d rho (``ops.vi_weight_kl_backward_``): no
separate reduction or backward re-reads mu and rho. Either output may be backpropagated alone and
in any order (``set_materialize_grads(False)``): a backward of the KL alone reads the parameters the
node keeps (their versions checked as autograd checks saved tensors) and keeps the saved tensors for
a later backward of the output, which would otherwise find them freed.
"""
from __future__ import annotations

import functools
import math
import weakref

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


# layer -> (its last forward's KL, the (mu, rho, bias_mu, bias_rho) it read, their versions, data
# pointers and requires_grad flags, the prior variance, the forward's token): outside the module (a
# tensor with a graph in a module attribute would break copy.deepcopy and pickling), weak in the
# layer. An entry holds its forward's graph, so it is dropped as soon as it is of no more use:
# taken by kl_divergence (once), or when that forward's backward runs, or at the layer's next
# forward. Only a grad-mode forward that is never backpropagated nor asked for its KL keeps its
# graph until the layer's next forward (and, with full backward hooks on the model, whose nodes hold
# the modules, keeps the layer alive until then).
_FORWARD_KL: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def release_forward_kl(owner) -> None:
    """Drop the layer's entry of the forward ``owner`` = (weakref to the layer, token) names (its
    node's backward ran: the KL is no more to be taken, and its graph must not be kept)."""
    layer = owner[0]()
    if layer is not None:
        entry = _FORWARD_KL.get(layer)
        if entry is not None and entry[-1] is owner[1]:
            del _FORWARD_KL[layer]


@functools.lru_cache(maxsize=64)
def prior_var_tensor(var: tuple, device: torch.device) -> Tensor:
    """The per-tensor prior variances as a float64 device tensor (``ops.vi_kl``'s prior_var), made
    once per (values, device) instead of a host-to-device copy at every step."""
    return torch.tensor(var, dtype=torch.float64, device=device)


def _versions(ts) -> tuple:
    return tuple(None if t is None else t._version for t in ts)


def _keep_for_kl(ctx, saved: tuple, params: tuple, prior_var: float | None, owner) -> None:
    """Save ``saved`` for the backward; with a prior_var (the node returns the KL too) also keep the
    parameters (mu, rho, bias_mu, bias_rho), the versions of everything, for backward runs of the KL
    alone (see the module docstring), and ``owner`` (a weak reference to the layer, the forward's
    token), whose carried KL the backward drops."""
    ctx.save_for_backward(*saved)
    ctx.prior_var, ctx.kept, ctx.owner = prior_var, None, owner
    if prior_var is not None:
        ctx.set_materialize_grads(False)
        ctx.params, ctx.param_versions, ctx.saved_versions = params, _versions(params), _versions(saved)


def _release(ctx) -> None:
    """This forward's backward runs: the layer no longer offers its KL (and holds no graph)."""
    if ctx.owner is not None:
        release_forward_kl(ctx.owner)
        ctx.owner = None


def _check_kept(ts, versions) -> None:
    if _versions(ts) != versions:
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                           "operation since the Bayesian layer's forward (an optimizer step between the forward and "
                           "this backward?): run the forward again before the backward")


def _saved(ctx) -> tuple:
    """The forward's saved tensors: ``ctx.saved_tensors``, or those a backward of the KL alone kept
    (kept with the node: the output's graph then stays usable, as with retain_graph)."""
    _release(ctx)
    if ctx.kept is None:
        return ctx.saved_tensors
    _check_kept(ctx.kept, ctx.saved_versions)
    return ctx.kept


def _kl_alone(ctx, g_kl: Tensor, n_inputs: int, graph: bool = False) -> tuple:
    """The backward of the KL output alone: the gradients of g_kl * KL for the parameters (inputs
    1 .. 4 = mu, rho, bias_mu, bias_rho) from ``ops.vi_kl_backward`` (``graph``: by differentiable
    torch ops, :func:`kl_grads_graph`), None for the rest; the saved tensors are kept for a later
    backward of the data output. No gradient for either output (a function downstream gave None
    for it): no gradients."""
    _release(ctx)
    if g_kl is None:
        return (None,) * n_inputs
    if ctx.kept is None:
        try:
            ctx.kept = ctx.saved_tensors
        except RuntimeError:  # the data output's backward already ran (and freed them): nothing to keep
            pass
    _check_kept(ctx.params, ctx.param_versions)
    return _add_kl(ctx, [None] * n_inputs, g_kl, *ctx.params, graph=graph)


def kl_grads(g_kl: Tensor, mu: Tensor, rho: Tensor, bias_mu: Tensor | None, bias_rho: Tensor | None,
             prior_var: float, graph: bool = False) -> tuple[list, list]:
    """([d/d mu, d/d bias_mu], [d/d rho, d/d bias_rho]) of g_kl * KL (one ``ops.vi_kl_backward``;
    ``graph``: :func:`kl_grads_graph`)."""
    mus, rhos = [mu] + ([] if bias_mu is None else [bias_mu]), [rho] + ([] if bias_rho is None else [bias_rho])
    if graph:
        gm, gr = kl_grads_graph(g_kl, mus, rhos, [prior_var] * len(mus))
    else:
        gm, gr = ops.vi_kl_backward(g_kl, mus, rhos, prior_var_tensor((prior_var,) * len(mus), mu.device))
    if bias_mu is None:
        gm, gr = gm + [None], gr + [None]
    return gm, gr


def closed_form_kl(mu: Tensor, rho: Tensor, v: float) -> Tensor:
    """KL(N(mu, softplus(rho)^2) || N(0, v)) summed, by differentiable torch ops (log softplus(rho)
    taken as rho below -20, where softplus underflows in float32 and the two agree to 1e-9): what
    the fused ops compute, for the paths they cannot take (a second order, torch.func transforms)."""
    sigma = F.softplus(rho)
    log_sigma = torch.where(rho < -20, rho, torch.log(F.softplus(rho.clamp_min(-20))))
    return (0.5 * math.log(v) - log_sigma + (sigma * sigma + mu * mu) / (2 * v) - 0.5).sum()


def kl_grads_graph(g_kl: Tensor, mus: list, rhos: list, prior_vars: list) -> tuple[list, list]:
    """The gradients ([d/d mu], [d/d rho]) of g_kl * sum_i KL(N(mu_i, softplus(rho_i)^2) || N(0,
    prior_vars[i])) as a graph (autograd of :func:`closed_form_kl`): the backward of a KL under
    ``create_graph=True`` (a second order through the KL, e.g. a gradient penalty; the fused
    ``ops.vi_kl_backward`` has no derivative). None for a tensor that does not require grad."""
    inputs = [t for t in (*mus, *rhos) if t.requires_grad]
    with torch.enable_grad():
        total = sum(closed_form_kl(mu, rho, float(v)) for mu, rho, v in zip(mus, rhos, prior_vars))
        got = iter(torch.autograd.grad(total * g_kl, inputs, create_graph=True))
    grads = [next(got) if t.requires_grad else None for t in (*mus, *rhos)]
    return grads[:len(mus)], grads[len(mus):]


def first_order(backward):
    """The layer nodes' backward, first order only: ``once_differentiable`` (the noise ops have no
    derivative of their own) except under ``create_graph=True``, where a backward of the KL output
    alone is formed by differentiable ops (:func:`kl_grads_graph`: a second order through the KL is
    right) and any other is refused at once: once_differentiable's gradients there are constants,
    or hang off a node that raises only when reached, and ``torch.autograd.grad(..., allow_unused=True)``
    never reaches it (a second order through the noise came back None or zero, silently)."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # a backward with create_graph=True
            if getattr(ctx, "prior_var", None) is not None and all(g is None for g in grads[:-1]):
                return _kl_alone(ctx, grads[-1], len(ctx.needs_input_grad), graph=True)
            raise RuntimeError("a Bayesian layer that samples has no second derivative (its noise is regenerated by "
                               "native ops), so a backward through it with create_graph=True would give gradients "
                               "that are wrong when differentiated again; for a second order set "
                               "layer.sample_weights = False (the deterministic pass at the means; the KL term "
                               "differentiates twice), or keep the layer out of the differentiated graph")
        return once(ctx, *grads)
    return wrapper


def _add_kl(ctx, grads: list, g_kl: Tensor, mu, rho, bias_mu, bias_rho, graph: bool = False) -> tuple:
    """grads (one per input: x, mu, rho, bias_mu, bias_rho, ...) plus those of g_kl * KL for the
    parameters that need one: the KL alone, or a node whose parameters do not all need a gradient
    (the fused path wants all four); ``graph``: by differentiable ops."""
    gm, gr = kl_grads(g_kl, mu, rho, bias_mu, bias_rho, ctx.prior_var, graph)
    need = ctx.needs_input_grad
    for i, kl_g in ((1, gm[0]), (2, gr[0]), (3, gm[1]), (4, gr[1])):
        if need[i] and kl_g is not None:
            grads[i] = kl_g if grads[i] is None else grads[i] + kl_g
    return tuple(grads)


def _all_params_need_grad(ctx, has_bias: bool) -> bool:
    need = ctx.needs_input_grad
    return need[1] and need[2] and (not has_bias or (need[3] and need[4]))


def _param_kl_backward(gr_in: Tensor, gm_in: Tensor | None, mu: Tensor, rho: Tensor, rng: Tensor, stream: int,
                       g_kl: Tensor, prior_var: float, kind: int, want_w: bool = False):
    """(d/d mu, d/d rho, w) of one parameter pair, KL included, by one ``ops.vi_weight_kl_backward_``:
    gr_in = dL/dw (w of ``kind``), gm_in = dL/d mu by its other paths (None for kind 0, whose w is
    mu's only path); both fresh tensors of this backward (written over when already contiguous and
    in the parameters' dtype)."""
    gr = _fresh_as(gr_in, rho)
    gm = torch.empty_like(rho, memory_format=torch.contiguous_format) if gm_in is None else _fresh_as(gm_in, mu)
    w = ops.vi_weight_kl_backward_(gr, gm, mu, rho, rng, stream, g_kl, prior_var, kind, want_w)
    return gm, gr, w


class SampledAffine(torch.autograd.Function):
    """y = affine(x, W, b) with W = mu + sigma(rho) eps (eps from (rng, stream)) regenerated in backward;
    with ``prior_var``: (y, the layer's KL)."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, rng, stream, bias_stream, affine: Affine, prior_var=None,
                owner=None):
        has_bias = bias_mu is not None
        if prior_var is None:
            w = ops.vi_sample(mu, rho, rng, stream)
            b = ops.vi_sample(bias_mu, bias_rho, rng, bias_stream) if has_bias else None
        else:
            w, kl = ops.vi_weight_kl(mu, rho, rng, stream, prior_var, ops.WEIGHT_SAMPLE)
            if has_bias:
                b, kl_b = ops.vi_weight_kl(bias_mu, bias_rho, rng, bias_stream, prior_var, ops.WEIGHT_SAMPLE)
                kl += kl_b
            else:
                b = None
        _keep_for_kl(ctx, (x, mu, rho, bias_mu, bias_rho, rng), (mu, rho, bias_mu, bias_rho), prior_var, owner)
        ctx.meta = (stream, bias_stream, affine, has_bias)
        out = affine(x, w, b)
        return out if prior_var is None else (out, kl)

    @staticmethod
    @first_order  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g, g_kl=None):
        if g is None:
            return _kl_alone(ctx, g_kl, 11)
        x, mu, rho, bias_mu, bias_rho, rng = _saved(ctx)
        x, g = _in_param_dtype(mu, x, g)
        stream, bias_stream, affine, has_bias = ctx.meta
        need_x = ctx.needs_input_grad[0]
        gx = gmu = grho = gbmu = gbrho = None
        if g_kl is not None and _all_params_need_grad(ctx, has_bias):  # the weight, its KL and w in one pass
            gmu, grho, w = _param_kl_backward(affine.grad_weight(x, rho.shape, g), None, mu, rho, rng, stream, g_kl,
                                              ctx.prior_var, ops.WEIGHT_SAMPLE, need_x)
            if need_x:
                gx = affine.grad_input(x, w, g)
            del w
            if has_bias:
                gbmu, gbrho, _ = _param_kl_backward(affine.grad_bias(g), None, bias_mu, bias_rho, rng, bias_stream,
                                                    g_kl, ctx.prior_var, ops.WEIGHT_SAMPLE)
            return gx, gmu, grho, gbmu, gbrho, None, None, None, None, None, None
        need_mu, need_rho = ctx.needs_input_grad[1:3]
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
        grads = [gx, gmu, grho, gbmu, gbrho, None, None, None, None, None, None]
        return tuple(grads) if g_kl is None else _add_kl(ctx, grads, g_kl, mu, rho, bias_mu, bias_rho)


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
    mu, rho, bias_mu, bias_rho and the RNG position: no noise or perturbation tensor outlives the
    forward. With ``prior_var``: (out, the layer's KL)."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, rng, stream: int, affine: Affine, prior_var=None, owner=None):
        has_bias = bias_mu is not None
        if prior_var is None:
            b = ops.vi_sample(bias_mu, bias_rho, rng, stream + 1) if has_bias else None
            dw = ops.vi_sample(_zero_mean(rho), rho, rng, stream)
        else:
            dw, kl = ops.vi_weight_kl(mu, rho, rng, stream, prior_var, ops.WEIGHT_PERTURBATION)
            if has_bias:
                b, kl_b = ops.vi_weight_kl(bias_mu, bias_rho, rng, stream + 1, prior_var, ops.WEIGHT_SAMPLE)
                kl += kl_b
            else:
                b = None
        xs = _signs_mul(x, rng, stream + 3, affine)  # x * s_in
        pert = affine(xs, dw, None)
        del xs, dw
        out = affine(x, mu, b)
        out.add_(_signs_mul(pert, rng, stream + 4, affine))  # + pert * s_out
        _keep_for_kl(ctx, (x, mu, rho, bias_mu, bias_rho, rng), (mu, rho, bias_mu, bias_rho), prior_var, owner)
        ctx.meta = (stream, affine, has_bias)
        return out if prior_var is None else (out, kl)

    @staticmethod
    @first_order  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g, g_kl=None):
        if g is None:
            return _kl_alone(ctx, g_kl, 10)
        x, mu, rho, bias_mu, bias_rho, rng = _saved(ctx)
        x, g = _in_param_dtype(mu, x, g)
        stream, affine, has_bias = ctx.meta
        need = ctx.needs_input_grad
        gx = gmu = grho = gbmu = gbrho = None
        if need[0] or need[2]:  # the perturbation's path: grad_out g * s_out
            gp = _signs_mul(g, rng, stream + 4, affine)
        if g_kl is not None and _all_params_need_grad(ctx, has_bias):  # d/d dW, d/d mu and the KL in one pass
            gdw = affine.grad_weight(_signs_mul(x, rng, stream + 3, affine), rho.shape, gp)
            gmu, grho, dw = _param_kl_backward(gdw, affine.grad_weight(x, mu.shape, g), mu, rho, rng, stream, g_kl,
                                               ctx.prior_var, ops.WEIGHT_PERTURBATION, need[0])
            del gdw
            if need[0]:
                gx = _signs_mul(affine.grad_input(x, dw, gp), rng, stream + 3, affine).add_(affine.grad_input(x, mu, g))
            del dw
            if has_bias:
                gbmu, gbrho, _ = _param_kl_backward(affine.grad_bias(g), None, bias_mu, bias_rho, rng, stream + 1,
                                                    g_kl, ctx.prior_var, ops.WEIGHT_SAMPLE)
            return gx, gmu, grho, gbmu, gbrho, None, None, None, None, None
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
        grads = [gx, gmu, grho, gbmu, gbrho, None, None, None, None, None]
        return tuple(grads) if g_kl is None else _add_kl(ctx, grads, g_kl, mu, rho, bias_mu, bias_rho)


class LocalMoments(torch.autograd.Function):
    """The local reparameterisation's pre-activation moments as one autograd node: mean = affine(x,
    mu, bias_mu) and var = affine(x^2, sigma^2, sigma_b^2), sigma^2 = softplus(rho)^2 (``ops.vi_sigma_sq``).
    Saves x, mu, rho and bias_rho (bias_mu too with a prior_var): sigma^2 and x^2 are recomputed in
    the backward (no weight-sized tensor outlives the forward). The noise is :class:`LocalNoise`'s, a
    node of its own so that the engine frees the saved var (activation-sized) as soon as its
    gradient is formed. With ``prior_var`` (and ``rng``, which the variance ops check but do not
    draw from): (mean, var, the layer's KL)."""

    @staticmethod
    def forward(ctx, x, mu, rho, bias_mu, bias_rho, affine: Affine, rng=None, prior_var=None, owner=None):
        has_bias = bias_mu is not None
        if prior_var is None:
            s2 = ops.vi_sigma_sq(rho)
            sb2 = ops.vi_sigma_sq(bias_rho) if has_bias else None
        else:
            s2, kl = ops.vi_weight_kl(mu, rho, rng, 0, prior_var, ops.WEIGHT_VARIANCE)
            if has_bias:
                sb2, kl_b = ops.vi_weight_kl(bias_mu, bias_rho, rng, 0, prior_var, ops.WEIGHT_VARIANCE)
                kl += kl_b
            else:
                sb2 = None
        _keep_for_kl(ctx, (x, mu, rho, bias_mu, bias_rho, rng), (mu, rho, bias_mu, bias_rho), prior_var, owner)
        ctx.meta = (affine, None if bias_mu is None else bias_mu.dtype)
        mean, var = affine(x, mu, bias_mu), affine(x.square(), s2, sb2)
        return (mean, var) if prior_var is None else (mean, var, kl)

    @staticmethod
    @first_order  # with LocalNoise's: no silent second order through half the graph
    def backward(ctx, g, gv, g_kl=None):
        if g is None and gv is None:
            return _kl_alone(ctx, g_kl, 9)
        x, mu, rho, bias_mu, bias_rho, rng = _saved(ctx)
        if g is None or gv is None:  # one of the two outputs unused (grads are not materialised with a KL)
            g, gv = (torch.zeros_like(gv) if g is None else g), (torch.zeros_like(g) if gv is None else gv)
        x, g, gv = _in_param_dtype(mu, x, g, gv)
        affine, bias_dtype = ctx.meta
        need = ctx.needs_input_grad
        gx = gmu = grho = gbmu = gbrho = s2 = None
        if g_kl is not None and _all_params_need_grad(ctx, bias_dtype is not None):
            # d/d sigma^2 -> d/d rho, d/d mu and the KL in one pass, with sigma^2 when grad_x needs it
            gmu, grho, s2 = _param_kl_backward(affine.grad_weight(x.square(), rho.shape, gv),
                                               affine.grad_weight(x, mu.shape, g), mu, rho, rng, 0, g_kl,
                                               ctx.prior_var, ops.WEIGHT_VARIANCE, need[0])
            if bias_dtype is not None:
                gbmu, gbrho, _ = _param_kl_backward(affine.grad_bias(gv), affine.grad_bias(g), bias_mu, bias_rho, rng,
                                                    0, g_kl, ctx.prior_var, ops.WEIGHT_VARIANCE)
            if need[0]:  # grad_x = affine^T(g, mu) + 2 x * affine^T(gv, sigma^2) (affine^T reads x's shape only)
                gx_var = affine.grad_input(x, s2, gv)
                del s2
                gx = affine.grad_input(x, mu, g).addcmul_(x, gx_var, value=2)
            return gx, gmu, grho, gbmu, gbrho, None, None, None, None
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
        grads = [gx, gmu, grho, gbmu, gbrho, None, None, None, None]
        return tuple(grads) if g_kl is None else _add_kl(ctx, grads, g_kl, mu, rho, bias_mu, bias_rho)


class LocalNoise(torch.autograd.Function):
    """out = mean + sqrt(var) * eps over pre-activations (local reparameterisation), eps (stream
    ``stream``) regenerated in the backward; saves var and the RNG position."""

    @staticmethod
    def forward(ctx, mean, var, rng, stream):
        ctx.save_for_backward(var, rng)
        ctx.stream = stream
        return ops.vi_local_noise(mean, var, rng, stream)

    @staticmethod
    @first_order  # the noise ops have no derivative of their own: a second order fails loudly
    def backward(ctx, g):
        var, rng = ctx.saved_tensors
        gv = ops.vi_local_noise_backward(g, var, rng, ctx.stream) if ctx.needs_input_grad[1] else None
        return g, gv, None, None
