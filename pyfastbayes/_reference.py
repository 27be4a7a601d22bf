"""Pure-PyTorch references of every native op.

They are the oracles of the tests and the fallbacks when the extension is absent. Each function
has the signature and in-place behaviour of the op of the same name in ``torch.ops.pyfastbayes``
and draws the same Philox4x32-10 stream, computed here with int64 tensor arithmetic.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors a < 2^32 and a 32-bit constant m."""
    lo_part = a * (m & 0xFFFF)  # < 2^48
    hi_part = a * (m >> 16)  # < 2^48
    s = lo_part + ((hi_part & 0xFFFF) << 16)
    return ((s >> 32) + (hi_part >> 16)) & _MASK, s & _MASK


def philox4x32(counters: Tensor, key0: int, key1: int) -> Tensor:
    """Philox4x32-10 of int64 counters [N, 4] (uint32 words) under key (key0, key1) -> int64 [N, 4]."""
    if counters.dtype != torch.int64 or counters.dim() != 2 or counters.shape[1] != 4:
        raise ValueError(f"counters must be int64 [N, 4], got {counters.dtype} {tuple(counters.shape)}")
    c0, c1, c2, c3 = (counters[:, i] & _MASK for i in range(4))
    k0, k1 = key0 & _MASK, key1 & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack([c0, c1, c2, c3], dim=1)


def philox_normal(numel: int, seed: int, stream: int, step: int, device=None) -> Tensor:
    """The float32 normal stream [numel]: element i is lane i % 4 of Philox block i // 4 with
    counter (block lo, block hi, stream, step) and key = the 64-bit seed; Box-Muller in float64."""
    nblocks = (numel + 3) // 4
    block = torch.arange(nblocks, dtype=torch.int64, device=device)
    ctr = torch.stack([block & _MASK, block >> 32, torch.full_like(block, stream & _MASK),
                       torch.full_like(block, step & _MASK)], dim=1)
    seed &= (1 << 64) - 1
    r = philox4x32(ctr, seed & _MASK, seed >> 32)
    u1 = ((r[:, 0::2] >> 8) + 1).double() * 2.0**-24  # lanes 0, 2: radius, (0, 1]
    u2 = (r[:, 1::2] >> 8).double() * 2.0**-24  # lanes 1, 3: angle
    rad = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([rad * torch.cos(2 * math.pi * u2), rad * torch.sin(2 * math.pi * u2)], dim=2)
    return z.reshape(-1)[:numel].float()


def philox_normal_(out: Tensor, seed: int, stream: int, step: int) -> Tensor:
    """Fill ``out`` (any shape, floating dtype) with the normal stream, in logical element order."""
    out.copy_(philox_normal(out.numel(), seed, stream, step, out.device).view(out.shape))
    return out


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noisy_step(kind: str, params, grads, bufs, hyper: Tensor, rng: Tensor, skip) -> None:
    if skip is not None and bool(skip):
        return
    lr, temp, num_data, prior, a, b = (float(v) for v in hyper[:6].tolist())
    seed, step = (int(v) for v in rng.tolist())
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
    rng[1] += 1


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


# ---------------------------------------------------------------------------------------------
# calibration (pyfastbayes.calibration): reference of calibration_bins
# ---------------------------------------------------------------------------------------------
_CALIB_STATS, _CALIB_DIAG = 3, 4


def uniform_bin(x: Tensor, n_bins: int) -> Tensor:
    """Bin index (int64, same shape) of float64 confidences ``x`` for ``n_bins`` uniform bins.

    Bin k holds k <= x * n_bins < k + 1 over the reals: left-closed, an interior edge k / n_bins
    goes to bin k; the last bin is closed, so x = 1 lands in bin n_bins - 1; x <= 0 in bin 0.
    The rounded product x * n_bins can only cross an edge when it equals that edge, and there the
    exact sign of the rounding error is found with Dekker's error-free product (n_bins < 2**26).
    """
    if not 1 <= n_bins < 2**26:
        raise ValueError(f"n_bins must be in [1, 2**26), got {n_bins}")
    b = float(n_bins)
    p = x * b
    f = torch.floor(p)
    edge = (f == p) & (f > 0)
    if bool(edge.any()):
        c = x * 134217729.0  # Veltkamp split: x = xh + xl, xh with 26 significant bits
        xh = c - (c - x)
        xl = x - xh
        err = (xh * b - p) + xl * b  # exact x * b - p
        f = torch.where(edge & (err < 0), f - 1, f)
    f = torch.nan_to_num(f, nan=0.0)
    return f.clamp(0, n_bins - 1).long()


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, from_logits: bool = False,
                     classwise: bool = False, sum_tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.pyfastbayes.calibration_bins`` (see csrc/ops/calibration.cpp).

    probs [S, N, C] (probabilities or logits), targets int64 [N] -> (bins float64 [n_bins, 3] or
    [C, n_bins, 3] of (count, confidence sum, correct sum), diag float64 [4] row counts of
    (bad row sum, negative entry, target out of range, non-finite)).
    """
    if probs.dim() != 3 or not probs.is_floating_point():
        raise ValueError(f"probs must be floating [S, N, C], got {probs.dtype} {tuple(probs.shape)}")
    if targets.dtype != torch.int64 or targets.shape != (probs.shape[1],):
        raise ValueError(f"targets must be int64 [{probs.shape[1]}], got {targets.dtype} {tuple(targets.shape)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    S, N, C = probs.shape
    if S < 1 or C < 1:
        raise ValueError(f"probs needs S >= 1 and C >= 1, got {tuple(probs.shape)}")
    f64 = dict(dtype=torch.float64, device=probs.device)
    nstat = (C if classwise else 1) * n_bins
    diag = torch.zeros(_CALIB_DIAG, **f64)
    if N == 0:
        shape = (C, n_bins, _CALIB_STATS) if classwise else (n_bins, _CALIB_STATS)
        return torch.zeros(shape, **f64), diag
    x = probs.double()
    if from_logits:
        m = x.amax(-1, keepdim=True)
        e = torch.exp(x - m)
        z = e.sum(-1, keepdim=True)
        finite = (torch.isfinite(m) & torch.isfinite(z)).squeeze(-1).all(0)
        total = (e / z).sum(0)
        rowsum = neg = None
    else:
        total = x.sum(0)
        rowsum = total.sum(-1) / S
        finite = torch.isfinite(rowsum)
        neg = (x < 0).any(-1).any(0)
    avg = total / S
    conf, pred = avg.max(-1)  # ties: the first (lowest) class
    bad_target = (targets < 0) | (targets >= C)
    valid = finite & ~bad_target
    diag[3] = (~finite).sum()
    diag[2] = (finite & bad_target).sum()
    if not from_logits:
        diag[0] = (valid & ~((rowsum - 1).abs() <= sum_tol)).sum()
        diag[1] = (valid & neg).sum()
    y = targets.clamp(0, C - 1)
    if not classwise:
        k = uniform_bin(conf, n_bins)[valid]
        w = torch.stack([torch.ones_like(conf), conf, (pred == y).double()], -1)[valid]
        bins = torch.zeros(nstat, _CALIB_STATS, **f64).index_add_(0, k, w)
        return bins, diag
    v = avg[valid]  # [M, C]
    k = uniform_bin(v, n_bins) + torch.arange(C, device=probs.device) * n_bins
    hit = torch.nn.functional.one_hot(y[valid], C).double()
    w = torch.stack([torch.ones_like(v), v, hit], -1).reshape(-1, _CALIB_STATS)
    bins = torch.zeros(nstat, _CALIB_STATS, **f64).index_add_(0, k.reshape(-1), w)
    return bins.view(C, n_bins, _CALIB_STATS), diag


# ---------------------------------------------------------------------------------------------
# SWA / SWAG (pyfastbayes.swag; math in csrc/common/swag.h)
# ---------------------------------------------------------------------------------------------
SWAG_DIAG_STREAM = 0x53570000  # + draw index: z1 of draw s
SWAG_LOWRANK_STREAM = 0x5357FFFF  # z2 [S, K] of every draw of one call, element s * K + k
SWAG_MAX_DRAWS = 0xFFFF


def philox_normal_range(start: int, numel: int, seed: int, stream: int, step: int, device=None) -> Tensor:
    """Elements [start, start + numel) of the float32 normal stream of :func:`philox_normal`."""
    first = start // 4
    nblocks = (start + numel + 3) // 4 - first
    block = torch.arange(first, first + nblocks, dtype=torch.int64, device=device)
    ctr = torch.stack([block & _MASK, block >> 32, torch.full_like(block, stream & _MASK),
                       torch.full_like(block, step & _MASK)], dim=1)
    seed &= (1 << 64) - 1
    r = philox4x32(ctr, seed & _MASK, seed >> 32)
    u1 = ((r[:, 0::2] >> 8) + 1).double() * 2.0**-24
    u2 = (r[:, 1::2] >> 8).double() * 2.0**-24
    rad = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([rad * torch.cos(2 * math.pi * u2), rad * torch.sin(2 * math.pi * u2)], dim=2).reshape(-1)
    return z[start - 4 * first: start - 4 * first + numel].float()


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

    sigma^2 = max(sq_mean - mean^2, eps); with D [K, P'] (K >= 2):
    theta_s = mean + sqrt(scale/2) sigma z1_s + sqrt(scale/(2(K-1))) (z2 @ D)_s, else (diagonal)
    theta_s = mean + sqrt(scale) sigma z1_s. z1_s: the normal stream (seed, SWAG_DIAG_STREAM + s,
    step) at global indices offset + j; z2 [S, K]: the stream (seed, SWAG_LOWRANK_STREAM, step).
    """
    if not (math.isfinite(scale) and scale > 0):
        raise RuntimeError(f"swag_sample: scale must be a finite number > 0, got {scale}")
    if not 0 <= n_draws <= SWAG_MAX_DRAWS:
        raise RuntimeError(f"swag_sample: n_draws must be in [0, {SWAG_MAX_DRAWS}], got {n_draws}")
    if offset < 0 or offset % 4:
        raise RuntimeError(f"swag_sample: offset must be a non-negative multiple of 4, got {offset}")
    if D is not None and (D.dim() != 2 or D.shape[1] != mean.numel() or D.shape[0] < 2):
        raise RuntimeError(f"swag_sample: D must be [K >= 2, {mean.numel()}], got {tuple(D.shape)}")
    P, dev, dt = mean.numel(), mean.device, mean.dtype
    var = sq_mean - mean * mean
    sigma = torch.sqrt(torch.where(var > eps, var, torch.full_like(var, eps)))
    c_diag = math.sqrt(scale / 2) if D is not None else math.sqrt(scale)
    z1 = torch.stack([philox_normal_range(offset, P, seed, SWAG_DIAG_STREAM + s, step, dev)
                      for s in range(n_draws)]) if n_draws else torch.empty(0, P, device=dev)
    out = mean + c_diag * sigma * z1.to(dt)
    if D is not None:
        K = D.shape[0]
        z2 = philox_normal(n_draws * K, seed, SWAG_LOWRANK_STREAM, step, dev).view(n_draws, K).to(dt)
        out = out + math.sqrt(scale / (2 * (K - 1))) * (z2 @ D.to(dt))
    return out.reshape(n_draws, P)
