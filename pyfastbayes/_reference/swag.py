"""Reference of the SWA / SWAG ops (math in csrc/common/swag.h)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..ops.layouts import SWAG
from ._checks import (OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type, num, scalar_type,
                      sizes)
from .random import philox_normal, philox_normal_range

_STATE_DTYPES = (torch.float32, torch.float64)
_DEV_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_N = 2**53 - 1  # n + 1 and the weight 1 / (n + 1) are exact in float64 up to here (kSwagMaxModels)


def check_swag_collect(params: Sequence[Tensor], mean: Tensor, sq_mean: Tensor | None, deviation: Tensor | None,
                       n: int, *, fake: bool = False) -> int:
    """The checks of ``swag_collect_`` (``check_swag_collect``, csrc/checks/swag.h); returns P."""
    op = "swag_collect_"
    check_meta_mix(op, params=params, mean=mean, sq_mean=sq_mean, deviation=deviation)
    check_dense(op, params=params, mean=mean, sq_mean=sq_mean, deviation=deviation)
    check(n >= 0, op, ": n (models averaged so far) must be >= 0, got ", n)
    check(n <= MAX_N, op, ": n (models averaged so far) must be < 2**53 (the weight 1 / (n + 1) is float64), got ", n)
    kernel = dispatch_device_type(params, mean, sq_mean, deviation)
    check(mean.device.type.upper() == kernel, op, ": mean is on ", mean.device, ", expected ", kernel)
    check(mean.dtype in _STATE_DTYPES, op, ": mean must be float32 or float64, got ", scalar_type(mean.dtype))
    check(mean.dim() == 1 and mean.is_contiguous(), op, ": mean must be a contiguous 1-D tensor, got shape ",
          sizes(mean))
    total = 0
    for i, p in enumerate(params):
        check(p.device == mean.device, op, ": params[", i, "] is on ", p.device, " but mean is on ", mean.device)
        check(p.dtype in _DEV_DTYPES, op, ": params[", i, "] must be float64/32/16 or bfloat16, got ",
              scalar_type(p.dtype))
        total += p.numel()
    check(mean.numel() == total, op, ": mean has ", mean.numel(), " elements but the params have ", total)
    if sq_mean is not None:
        check(sq_mean.device == mean.device and sq_mean.dtype == mean.dtype and sq_mean.shape == mean.shape
              and sq_mean.is_contiguous(), op, ": sq_mean must be a contiguous ", scalar_type(mean.dtype),
              " [", total, "] on ", mean.device, " like mean")
    if deviation is not None:
        check(sq_mean is not None, op, ": a deviation row needs sq_mean (SWAG); pass neither for SWA")
        check(deviation.device == mean.device, op, ": deviation is on ", deviation.device, " but mean is on ",
              mean.device)
        check(deviation.dtype in _DEV_DTYPES, op, ": deviation must be float64/32/16 or bfloat16, got ",
              scalar_type(deviation.dtype))
        check(deviation.dim() == 1 and deviation.numel() == total and deviation.is_contiguous(), op,
              ": deviation must be a contiguous [", total, "] row, got shape ", sizes(deviation))
    (OverlapCheck(op, fake).add_list(params, "params", False).add(mean, "mean", True).add(sq_mean, "sq_mean", True)
     .add(deviation, "deviation", True).run())
    return total


def check_swag_sample(mean: Tensor, sq_mean: Tensor, D: Tensor | None, n_draws: int, scale: float, eps: float,
                      offset: int, *, fake: bool = False) -> int:
    """The checks of ``swag_sample`` (``check_swag_sample``, csrc/checks/swag.h); returns K (0: no D)."""
    op = "swag_sample"
    check_meta_mix(op, mean=mean, sq_mean=sq_mean, D=D)
    check_dense(op, mean=mean, sq_mean=sq_mean, D=D)
    kernel = dispatch_device_type(mean, sq_mean, D)
    check(mean.device.type.upper() == kernel, op, ": mean is on ", mean.device, ", expected ", kernel)
    check(mean.dtype in _STATE_DTYPES, op, ": mean must be float32 or float64, got ", scalar_type(mean.dtype))
    check(mean.dim() == 1 and mean.is_contiguous(), op, ": mean must be a contiguous 1-D tensor, got shape ",
          sizes(mean))
    check(sq_mean.device == mean.device and sq_mean.dtype == mean.dtype and sq_mean.shape == mean.shape
          and sq_mean.is_contiguous(), op, ": sq_mean must be a contiguous ", scalar_type(mean.dtype),
          " tensor shaped like mean on ", mean.device)
    check(0 <= n_draws <= SWAG.max_draws, op, ": n_draws must be in [0, ", SWAG.max_draws, "], got ", n_draws)
    check(math.isfinite(scale) and scale > 0, op, ": scale must be a finite number > 0, got ", num(scale))
    check(math.isfinite(eps) and eps >= 0, op, ": eps must be finite and >= 0, got ", num(eps))
    check(mean.dtype != torch.float32 or eps <= torch.finfo(torch.float32).max, op,
          ": eps must be finite in float32 (the state's dtype), got ", num(eps))
    check(offset >= 0, op, ": offset must be >= 0, got ", offset)
    check(offset <= 2**63 - 1 - mean.numel(), op, ": offset + ", mean.numel(), " elements must be below 2^63, got "
          "offset = ", offset)
    if D is None:
        return 0
    check(D.device == mean.device, op, ": D is on ", D.device, " but mean is on ", mean.device)
    check(D.dtype in _DEV_DTYPES, op, ": D must be float64/32/16 or bfloat16, got ", scalar_type(D.dtype))
    check(D.dim() == 2 and D.shape[1] == mean.numel(), op, ": D must be [K, ", mean.numel(), "], got ", sizes(D))
    check(D.shape[0] >= 2, op, ": the low-rank part needs K >= 2 deviation rows, got ", D.shape[0])
    check(D.stride(1) == 1 or D.shape[1] <= 1, op, ": D's rows must be contiguous (stride(1) == 1)")
    return D.shape[0]


def _swag_lerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    return torch.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


def swag_collect_(params: Sequence[Tensor], mean: Tensor, sq_mean: Tensor | None, deviation: Tensor | None,
                  n: int) -> None:
    """Reference of ``torch.ops.pyfastbayes.swag_collect_``: with w = 1 / (n + 1) (rounded in the
    state dtype), mean <- lerp(mean, theta, w), sq_mean <- lerp(sq_mean, theta^2, w) and
    deviation <- theta - mean (updated), theta = the params flattened in list order [P]."""
    total = check_swag_collect(params, mean, sq_mean, deviation, n)
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
    check_swag_sample(mean, sq_mean, D, n_draws, scale, eps, offset)
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
