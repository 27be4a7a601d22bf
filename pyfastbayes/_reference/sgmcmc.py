"""Reference of the fused SG-MCMC steps and of any_nonfinite (same Philox stream as the kernels)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..ops.layouts import HYPER, RNG
from .random import philox_normal


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noisy_step(kind: str, params, grads, bufs, hyper: Tensor, rng: Tensor, skip) -> None:
    if skip is not None and bool(skip):
        return
    h = [float(v) for v in hyper.tolist()]
    lr, temp, num_data, prior = h[HYPER.lr], h[HYPER.temperature], h[HYPER.num_data], h[HYPER.prior_precision]
    a, b = h[HYPER.a], h[HYPER.b]
    seed, step = int(rng[RNG.seed]), int(rng[RNG.step])
    for i, (p, g) in enumerate(zip(params, grads)):
        op = _opmath(p.dtype)
        xi = philox_normal(p.numel(), seed, i, step, p.device).view(p.shape).to(op)
        pv, gv = p.to(op), g.to(op)
        grad_u = num_data * gv + prior * pv
        if kind == "sgld":
            pv = pv - (0.5 * lr) * grad_u + math.sqrt(lr * temp) * xi
        elif kind == "sghmc":
            v = (1.0 - a) * bufs[i].to(op) - lr * grad_u + math.sqrt(2.0 * a * lr * temp) * xi
            pv = pv + v
            bufs[i].copy_(v)
        else:  # psgld
            v = a * bufs[i].to(op) + (1.0 - a) * gv * gv
            precond = 1.0 / (b + torch.sqrt(v))
            pv = pv - (0.5 * lr) * precond * grad_u + torch.sqrt((lr * temp) * precond) * xi
            bufs[i].copy_(v)
        p.copy_(pv)
    rng[RNG.step] += 1


def sgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], hyper: Tensor, rng: Tensor,
               skip: Tensor | None = None) -> None:
    """Reference of ``torch.ops.pyfastbayes.sgld_step_`` (see :class:`pyfastbayes.optim.SGLD`)."""
    _noisy_step("sgld", params, grads, None, hyper, rng, skip)


def sghmc_step_(params, grads, momenta, hyper, rng, skip=None) -> None:
    """Reference of ``torch.ops.pyfastbayes.sghmc_step_`` (see :class:`pyfastbayes.optim.SGHMC`)."""
    _noisy_step("sghmc", params, grads, momenta, hyper, rng, skip)


def psgld_step_(params, grads, square_avg, hyper, rng, skip=None) -> None:
    """Reference of ``torch.ops.pyfastbayes.psgld_step_`` (see :class:`pyfastbayes.optim.PSGLD`)."""
    _noisy_step("psgld", params, grads, square_avg, hyper, rng, skip)


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """True (bool scalar) when any element of any floating tensor is NaN or infinite."""
    flags = [~torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    if not flags:
        dev = tensors[0].device if len(tensors) else "cpu"
        return torch.zeros((), dtype=torch.bool, device=dev)
    return torch.stack([f.to(flags[0].device) for f in flags]).any()
