"""Reference of calibration_bins (uniform bins, exact edges; see csrc/common/calibration.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.layouts import CALIB_DIAG, CALIB_STATS
from ._checks import (KERNEL_DTYPES, check, check_dense, check_meta_mix, dispatch_device_type, num, scalar_type,
                      sizes)


def uniform_bin(x: Tensor, n_bins: int) -> Tensor:
    """Bin index (int64, same shape) of float64 confidences ``x`` for ``n_bins`` uniform bins.

    Bin k holds k <= x * n_bins < k + 1 over the reals: left-closed, an interior edge k / n_bins
    goes to bin k; the last bin is closed, so x = 1 lands in bin n_bins - 1; x <= 0 in bin 0.
    The rounded product x * n_bins can only cross an edge when it equals that edge, and there the
    exact sign of the rounding error is found with Dekker's error-free product (the kernel's fma).
    """
    check(1 <= n_bins < 2**53, "uniform_bin: n_bins must be in [1, 2**53), got ", n_bins)
    b = float(n_bins)
    p = x * b
    f = torch.floor(p)
    edge = (f == p) & (f > 0)
    if bool(edge.any()):
        xh, xl = _split(x)
        bh, bl = _split(torch.full_like(x, b))
        err = ((xh * bh - p) + xh * bl + xl * bh) + xl * bl  # exact x * b - p (Dekker's TwoProduct)
        f = torch.where(edge & (err < 0), f - 1, f)
    f = torch.nan_to_num(f, nan=0.0)
    return f.clamp(0, n_bins - 1).long()


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Veltkamp split x = hi + lo, hi with 26 significant bits (float64)."""
    c = x * 134217729.0
    hi = c - (c - x)
    return hi, x - hi


def check_calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, sum_tol: float, *,
                           fake: bool = False) -> None:
    """The checks of ``calibration_bins`` (``check_calibration_args``, csrc/checks/calibration.h)."""
    op = "calibration_bins"
    check_meta_mix(op, probs=probs, targets=targets)
    check_dense(op, probs=probs, targets=targets)
    check(probs.dim() == 3, op, ": probs must be [S, N, C], got shape ", sizes(probs))
    check(probs.is_floating_point(), op, ": probs must be floating point, got ", scalar_type(probs.dtype))
    check(probs.dtype in KERNEL_DTYPES, op, ": probs must be float64, float32, float16 or bfloat16, got ",
          scalar_type(probs.dtype))
    kernel = dispatch_device_type(probs, targets)
    check(probs.device.type.upper() == kernel, op, ": probs must be on ", kernel, " here, got ", probs.device)
    check(targets.dtype == torch.int64, op, ": targets must be int64, got ", scalar_type(targets.dtype))
    check(targets.device == probs.device, op, ": targets on ", targets.device, " but probs on ", probs.device)
    check(targets.dim() == 1 and targets.shape[0] == probs.shape[1], op, ": targets must be [N] with N = ",
          probs.shape[1], " (probs.size(1)), got shape ", sizes(targets))
    check(1 <= n_bins < 2**53, op, ": n_bins must be in [1, 2^53), got ", n_bins)
    check(probs.shape[0] >= 1, op, ": probs needs S >= 1 draws, got S = ", probs.shape[0])
    check(probs.shape[2] >= 1, op, ": probs needs C >= 1 classes, got C = ", probs.shape[2])
    check(sum_tol >= 0.0, op, ": sum_tol must be >= 0, got ", num(sum_tol))


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, from_logits: bool = False,
                     classwise: bool = False, sum_tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.pyfastbayes.calibration_bins`` (see csrc/ops/calibration.cpp).

    probs [S, N, C] (probabilities or logits), targets int64 [N] -> (bins float64 [n_bins, 3] or
    [C, n_bins, 3] of (count, confidence sum, correct sum), diag float64 [4] row counts of
    (bad row sum, negative entry, target out of range, non-finite)).
    """
    check_calibration_bins(probs, targets, n_bins, sum_tol)
    S, N, C = probs.shape
    f64 = dict(dtype=torch.float64, device=probs.device)
    nstat = (C if classwise else 1) * n_bins
    diag = torch.zeros(CALIB_DIAG.size, **f64)
    if N == 0:
        shape = (C, n_bins, CALIB_STATS.size) if classwise else (n_bins, CALIB_STATS.size)
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
    diag[CALIB_DIAG.nonfinite] = (~finite).sum()
    diag[CALIB_DIAG.bad_target] = (finite & bad_target).sum()
    if not from_logits:
        diag[CALIB_DIAG.bad_sum] = (valid & ~((rowsum - 1).abs() <= sum_tol)).sum()
        diag[CALIB_DIAG.negative] = (valid & neg).sum()
    y = targets.clamp(0, C - 1)
    if not classwise:
        k = uniform_bin(conf, n_bins)[valid]
        w = torch.stack([torch.ones_like(conf), conf, (pred == y).double()], -1)[valid]
        bins = torch.zeros(nstat, CALIB_STATS.size, **f64).index_add_(0, k, w)
        return bins, diag
    v = avg[valid]  # [M, C]
    k = uniform_bin(v, n_bins) + torch.arange(C, device=probs.device) * n_bins
    hit = torch.nn.functional.one_hot(y[valid], C).double()
    w = torch.stack([torch.ones_like(v), v, hit], -1).reshape(-1, CALIB_STATS.size)
    bins = torch.zeros(nstat, CALIB_STATS.size, **f64).index_add_(0, k.reshape(-1), w)
    return bins.view(C, n_bins, CALIB_STATS.size), diag
