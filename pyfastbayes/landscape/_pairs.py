"""Checks on a pair of models joined by a line or a curve in the space of trainable parameters.

:func:`~pyfastbayes.landscape.interpolate` and the curves move only the trainable parameters
(requires_grad=True) and run model_a's module with them: everything else (frozen parameters,
buffers) comes from model_a, so it must be the same in model_b, BatchNorm running statistics
aside (recomputed per point, or warned about).
"""
from __future__ import annotations

import torch
from torch import nn

from .._warnings import warn_user
from ..nn.batchnorm import bn_keys, bn_modules


def same_fixed_tensors(model_a: nn.Module, model_b: nn.Module, what: str) -> None:
    """ValueError naming the first frozen parameter or buffer (BatchNorm running statistics
    excepted) that differs between the two models (name, shape, dtype or value): ``what`` ('the
    curve', 'the line') interpolates only trainable parameters and takes the rest from model_a."""
    def fixed(m: nn.Module) -> list:
        bn = {k for k, _, _ in bn_keys(m)}
        return [(n, t) for n, t in m.named_parameters() if not t.requires_grad] + [
            (n, t) for n, t in m.named_buffers() if n not in bn]
    fixed_a, fixed_b = fixed(model_a), fixed(model_b)
    if [n for n, _ in fixed_a] != [n for n, _ in fixed_b]:
        raise ValueError("model_a and model_b have different frozen parameters / buffers: "
                         f"{[n for n, _ in fixed_a]} vs {[n for n, _ in fixed_b]}")
    for (n, ta), (_, tb) in zip(fixed_a, fixed_b):
        if ta.shape != tb.shape or ta.dtype != tb.dtype or not torch.equal(ta.detach().cpu(), tb.detach().cpu()):
            raise ValueError(f"frozen parameter / buffer {n!r} differs between model_a and model_b: {what} "
                             "interpolates only trainable parameters (requires_grad=True) and runs model_a with "
                             "them, so everything else must be equal in both models (copy the one you want into "
                             "the other, or make it trainable)")


def warn_other_statistics(model_a: nn.Module, model_b: nn.Module) -> None:
    """Warn when bn='eval' would give the line's end model_a's BatchNorm statistics instead of
    model_b's own (their running statistics differ)."""
    a, b = bn_modules(model_a), bn_modules(model_b)
    differ = len(a) != len(b) or any(
        x.running_mean is not None and y.running_mean is not None and not (
            torch.equal(x.running_mean, y.running_mean.to(x.running_mean)) and
            torch.equal(x.running_var, y.running_var.to(x.running_var))) for x, y in zip(a, b))
    if differ:
        warn_user("interpolate with bn='eval': every point, the end at offset 1 included, uses model_a's BatchNorm "
                  "running statistics, and model_b's differ, so the line does not end at model_b as it predicts; "
                  "pass bn='recompute' for statistics recomputed at each point (both ends then differ from the "
                  "models' own by their statistics on this data)", RuntimeWarning)
