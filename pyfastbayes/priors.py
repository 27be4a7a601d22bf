"""Per-layer Gaussian priors for the SG-MCMC samplers, as optimizer param groups.

The samplers of :mod:`pyfastbayes.optim` take the prior as a ``prior_precision`` alpha per param
group: the potential is U(theta) = N * mean-NLL(theta) + alpha * |theta|^2 / 2, i.e. the prior
is N(0, 1 / alpha) on every element of the group. :func:`scaled_groups` builds those groups for
the "fan-in scaled" prior of the BNN-prior literature (the variance of the He / LeCun
initialisations), under which a layer's pre-activations have a variance that does not grow with
its width::

    opt = pyfastbayes.optim.SGLD(scaled_groups(model, scale=2.0, temperature=0.1), lr=..., num_data=N)
"""
from __future__ import annotations

import math

from torch import nn

from .calibration._checks import check_nonnegative_float, check_positive_float

__all__ = ["scaled_groups", "FAN_IN_LAYERS"]

# Modules whose ``weight`` is [out, fan_in...]: Linear [out, in], Bilinear [out, in1, in2],
# Conv [out, in / groups, *kernel], ConvTranspose [in, out / groups, *kernel] (for the transposed
# convolutions this is torch.nn.init's convention, not the true fan-in of an output unit).
FAN_IN_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _precision(fan_in: int, scale: float, name: str) -> float:
    """fan_in / scale, which must be finite: a tiny scale (1e-320) overflows to inf, a precision
    every sampler refuses (naming prior_precision, not the scale that made it)."""
    alpha = fan_in / scale
    if not math.isfinite(alpha):
        raise ValueError(f"{name} = {scale!r} is too small: the prior precision {fan_in} / {name} overflows a "
                         f"float64; pass {name} >= {fan_in / 1e308:.3g}")
    return alpha


def scaled_groups(model: nn.Module, scale: float = 1.0, *, bias_scale: float | None = None,
                  other_precision: float = 1.0, **options) -> list[dict]:
    """Optimizer param groups of ``model`` with the per-layer prior N(0, scale / fan_in).

    The exact convention, per trainable parameter (``requires_grad``; a tensor shared by several
    modules counts once, under its first name in ``model.named_parameters()``):

    - the ``weight`` of a layer in :data:`FAN_IN_LAYERS` (Linear, Bilinear, Conv*, ConvTranspose*):
      every element ~ N(0, scale / fan_in) with fan_in = ``weight[0].numel()`` (what
      ``torch.nn.init`` calls fan_in: the second dimension times the kernel size), so
      ``prior_precision = fan_in / scale``;
    - the ``bias`` of such a layer: N(0, bias_scale), ``prior_precision = 1 / bias_scale``
      (default bias_scale = scale). A bias is one term of the pre-activation, next to a sum of
      fan_in weight terms whose variance is scale * E[x^2] under the weight prior: a bias variance
      of ``scale`` keeps the two of the same order, whatever the width;
    - every other parameter (normalisation scales and shifts, embeddings, ...):
      ``prior_precision = other_precision`` (default 1: N(0, 1); 0: no prior).

    Parameters with the same precision share one group (one fused sampler call per group and
    step); the groups come in the order of their first parameter, each a dict
    ``{"params": [...], "prior_precision": alpha, "param_names": [...], **options}``.
    ``options`` are any other per-group hyper-parameters of the sampler (``temperature``, ``lr``,
    ...); ``params``, ``prior_precision`` and ``param_names`` are set here and cannot be passed.

    Args:
        model: the network.  scale: s > 0 of N(0, s / fan_in) (s = 1: LeCun, s = 2: He).
        bias_scale: variance > 0 of the bias prior (default: ``scale``).
        other_precision: alpha >= 0 for parameters outside those layers.
    Returns:
        list of param-group dicts for :class:`pyfastbayes.optim.SGLD`, ``SGHMC``, ``PSGLD``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scale = check_positive_float(scale, "scale")
    bias_scale = scale if bias_scale is None else check_positive_float(bias_scale, "bias_scale")
    other_precision = check_nonnegative_float(other_precision, "other_precision")
    for key in ("params", "prior_precision", "param_names"):
        if key in options:
            raise TypeError(f"scaled_groups sets {key!r} itself; pass the other group options only")

    precision_of: dict[int, float] = {}  # id(parameter) -> its prior precision, from its owning layer
    for module in model.modules():
        if not isinstance(module, FAN_IN_LAYERS):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, nn.Parameter) and id(weight) not in precision_of:
            precision_of[id(weight)] = _precision(weight[0].numel(), scale, "scale")
        if isinstance(bias, nn.Parameter) and id(bias) not in precision_of:
            precision_of[id(bias)] = _precision(1, bias_scale, "bias_scale")

    groups: dict[float, dict] = {}  # precision -> group, in order of first appearance
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        alpha = precision_of.get(id(p), other_precision)
        group = groups.setdefault(alpha, {"params": [], "prior_precision": alpha, "param_names": [], **options})
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    return list(groups.values())
