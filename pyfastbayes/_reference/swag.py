"""Reference of the SWA / SWAG ops (math in csrc/common/swag.h)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..ops.layouts import SWAG
from .random import philox_normal, philox_normal_range


def _swag_lerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    return torch.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


def swag_collect_(params: Sequence[Tensor], mean: Tensor, sq_mean: Tensor | None, deviation: Tensor | None,
                  n: int) -> None:
    """Reference of ``torch.ops.pyfastbayes.swag_collect_``: with w = 1 / (n + 1) (rounded in the
    state dtype), mean <- lerp(mean, theta, w), sq_mean <- lerp(sq_mean, theta^2, w) and
    deviation <- theta - mean (updated), theta = the params flattened in list order [P]."""
    if n < 0:
        raise RuntimeError(f"swag_collect_: n (models averaged so far) must be >= 0, got {n}")
    if mean.dtype not in (torch.float32, torch.float64) or mean.dim() != 1:
        raise RuntimeError(f"swag_collect_: mean must be a float32/float64 1-D tensor, got {mean.dtype} "
                           f"{tuple(mean.shape)}")
    total = sum(p.numel() for p in params)
    if mean.numel() != total:
        raise RuntimeError(f"swag_collect_: mean has {mean.numel()} elements but the params have {total}")
    if deviation is not None and sq_mean is None:
        raise RuntimeError("swag_collect_: a deviation row needs sq_mean (SWAG); pass neither for SWA")
    for name, t in (("sq_mean", sq_mean), ("deviation", deviation)):
        if t is not None and (t.numel() != total or t.device != mean.device):
            raise RuntimeError(f"swag_collect_: {name} must have {total} elements on {mean.device}")
    if sq_mean is not None and sq_mean.dtype != mean.dtype:
        raise RuntimeError(f"swag_collect_: sq_mean must be {mean.dtype} like mean, got {sq_mean.dtype}")
    if not total:
        return
    theta = torch.cat([p.detach().reshape(-1).to(mean.device, mean.dtype) for p in params])
    w = torch.ones((), dtype=mean.dtype, device=mean.device) / (n + 1)
    mean.copy_(_swag_lerp(mean, theta, w))
    if sq_mean is not None:
        sq_mean.copy_(_swag_lerp(sq_mean, theta * theta, w))
    if deviation is not None:
        deviation.copy_(theta - mean)


def swag_sample(mean: Tensor, sq_mean: Tensor, D: Tensor | None, n_draws: int, scale: float, eps: float, seed: int,
                step: int = 0, offset: int = 0) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.swag_sample`` -> [S, P'] in mean's dtype.

    sigma^2 = max(sq_mean - mean^2, eps); with D [K, P'] (K >= 2) the covariance is
    scale (diag(sigma^2) + D^T D / (K - 1)): theta_s = mean + sqrt(scale) sigma z1_s +
    sqrt(scale / (K - 1)) (z2 @ D)_s; without D it is scale diag(sigma^2): theta_s = mean +
    sqrt(scale) sigma z1_s. z1_s: the normal stream (seed, SWAG.diag_stream + s,
    step) at global indices offset + j; z2 [S, K]: the stream (seed, SWAG.lowrank_stream, step).
    """
    if not (math.isfinite(scale) and scale > 0):
        raise RuntimeError(f"swag_sample: scale must be a finite number > 0, got {scale}")
    if not 0 <= n_draws <= SWAG.max_draws:
        raise RuntimeError(f"swag_sample: n_draws must be in [0, {SWAG.max_draws}], got {n_draws}")
    if offset < 0 or offset % 4:
        raise RuntimeError(f"swag_sample: offset must be a non-negative multiple of 4, got {offset}")
    if D is not None and (D.dim() != 2 or D.shape[1] != mean.numel() or D.shape[0] < 2):
        raise RuntimeError(f"swag_sample: D must be [K >= 2, {mean.numel()}], got {tuple(D.shape)}")
    P, dev, dt = mean.numel(), mean.device, mean.dtype
    var = sq_mean - mean * mean
    sigma = torch.sqrt(torch.where(var > eps, var, torch.full_like(var, eps)))
    c_diag = math.sqrt(scale)
    z1 = torch.stack([philox_normal_range(offset, P, seed, SWAG.diag_stream + s, step, dev)
                      for s in range(n_draws)]) if n_draws else torch.empty(0, P, device=dev)
    out = mean + c_diag * sigma * z1.to(dt)
    if D is not None:
        K = D.shape[0]
        z2 = philox_normal(n_draws * K, seed, SWAG.lowrank_stream, step, dev).view(n_draws, K).to(dt)
        out = out + math.sqrt(scale / (K - 1)) * (z2 @ D.to(dt))
    return out.reshape(n_draws, P)
