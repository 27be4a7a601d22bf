"""Binning shared by :func:`~pyfastbayes.calibration.ece`, the streaming
:class:`~pyfastbayes.calibration.CalibrationError` and the reliability diagram: one native pass
for uniform bins (which also yields the value diagnostics), equal-mass bins in PyTorch, and the
error of a set of bins."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import ops
from ._checks import as_3d, check_targets, raise_on_diag, sum_tol


def bins(probs, targets, n_bins: int, from_logits: bool, classwise: bool, validate: bool):
    """Check arguments, run the binning op. Returns (bins, p3, y)."""
    p3 = as_3d(probs, from_logits)
    y = check_targets(targets, p3.shape[1], p3.device)
    tol = sum_tol(p3.dtype)
    b, diag = ops.calibration_bins(p3, y, n_bins, from_logits, classwise, tol)
    if validate:
        raise_on_diag(diag, p3, y, from_logits, tol)
    return b, p3, y


def mean_probs(p3: Tensor, from_logits: bool) -> Tensor:
    """BMA predictive [N, C] in float64 of [S, N, C] probabilities or logits."""
    x = p3.double()
    return (x.softmax(-1) if from_logits else x).mean(0)


def adaptive_bins(p3: Tensor, y: Tensor, n_bins: int, from_logits: bool, classwise: bool) -> Tensor:
    """Equal-mass bins: sort by confidence (stable, ties by input order) and cut the sorted rows into
    n_bins runs whose sizes differ by at most one (the first N % n_bins runs one longer); returns
    [K, n_bins, 3] with K = C (classwise) or 1. Rows with non-finite values or bad targets are
    dropped first (they only exist when validate=False)."""
    avg = mean_probs(p3, from_logits)
    C = avg.shape[-1]
    keep = torch.isfinite(avg).all(-1) & (y >= 0) & (y < C)
    avg, y = avg[keep], y[keep]
    if classwise:
        vals, hit = avg, F.one_hot(y, C).double()
    else:
        conf, pred = avg.max(-1)
        vals, hit = conf[:, None], (pred == y).double()[:, None]
    n, k = vals.shape
    order = vals.argsort(dim=0, stable=True)
    v, h = vals.gather(0, order), hit.gather(0, order)
    sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long)
    sizes[: n % n_bins] += 1
    bin_of = torch.repeat_interleave(torch.arange(n_bins), sizes).to(avg.device)
    idx = bin_of[:, None].expand(n, k)
    out = torch.zeros(n_bins, k, 3, dtype=torch.float64, device=avg.device)
    out[..., 0].scatter_add_(0, idx, torch.ones_like(v))
    out[..., 1].scatter_add_(0, idx, v)
    out[..., 2].scatter_add_(0, idx, h)
    return out.permute(1, 0, 2)


def error_from_bins(b: Tensor, norm: str) -> Tensor:
    """Calibration error of bins [..., B, 3] -> [...] (weights: bin count over the total count)."""
    cnt, conf, hit = b.unbind(-1)
    total = cnt.sum(-1, keepdim=True).clamp_min(1)
    gap = (hit - conf).abs() / cnt.clamp_min(1)  # |accuracy - mean confidence|; 0 for empty bins
    w = cnt / total
    if norm == "l1":
        return (w * gap).sum(-1)
    if norm == "l2":
        return (w * gap * gap).sum(-1).sqrt()
    return torch.where(cnt > 0, gap, torch.zeros_like(gap)).amax(-1)
