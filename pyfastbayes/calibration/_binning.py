"""Binning shared by :func:`~pyfastbayes.calibration.ece`, the streaming
:class:`~pyfastbayes.calibration.CalibrationError` and the reliability diagram.

What is binned against what (the *mode*):

- ``'top'``: the top-label confidence max_c pbar_c against [argmax_c pbar_c == y] ([N, C] and
  [S, N, C] inputs);
- ``'positive'``: the probability of class 1 against [y == 1] (binary [N] inputs, as
  torchmetrics' ``binary_calibration_error`` and netcal do);
- ``'classwise'``: every class probability pbar_c against [y == c], one set of bins per class.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..ops import CALIB_STATS
from ._checks import Prepared, checked_bins


def mode_of(prep: Prepared, classwise: bool) -> str:
    """'classwise', 'positive' (binary [N] input) or 'top'."""
    if classwise:
        return "classwise"
    return "positive" if prep.binary else "top"


def uniform_bins(prep: Prepared, n_bins: int, from_logits: bool, mode: str, validate: bool,
                 name: str = "probs", host: bool = False) -> Tensor:
    """Uniform bins of one native pass (which also validates): [n_bins, 3] for 'top' and
    'positive', [C, n_bins, 3] for 'classwise'; per bin (count, value sum, hit sum). ``host``:
    returned on the CPU (see ``checked_bins``)."""
    bins = checked_bins(prep, n_bins, from_logits, mode != "top", validate, name, host)
    return bins[1] if mode == "positive" else bins


def mean_probs(p3: Tensor, from_logits: bool) -> Tensor:
    """BMA predictive [N, C] in float64 of [S, N, C] probabilities or logits."""
    x = p3.double()
    if x.shape[0] == 1:  # one draw: no mean to take (saves a pass over [N, C])
        return x[0].softmax(-1) if from_logits else x[0]
    return (x.softmax(-1) if from_logits else x).mean(0)


def adaptive_bins(prep: Prepared, n_bins: int, from_logits: bool, mode: str) -> Tensor:
    """Equal-mass bins: sort by the binned value and cut the sorted rows into n_bins runs whose
    sizes differ by at most one (the first N % n_bins runs one longer), except that equal values
    stay together, in the bin where their sorted run starts (a cut through them made the result
    depend on the rows' order: saturated confidences of exactly 1.0 are common); so bins may hold
    more or fewer rows, or none. Returns [K, n_bins, 3] with K = C ('classwise') or 1. Rows with
    non-finite values or bad targets are dropped first (they only exist when validate=False)."""
    avg, y = mean_probs(prep.p3, from_logits), prep.y
    C = avg.shape[-1]
    keep = torch.isfinite(avg).all(-1) & (y >= 0) & (y < C)
    avg, y = avg[keep], y[keep]
    if mode == "classwise":
        vals, hit = avg, F.one_hot(y, C).double()
    elif mode == "positive":
        vals, hit = avg[:, 1:], (y == 1).double()[:, None]
    else:
        conf, pred = avg.max(-1)
        vals, hit = conf[:, None], (pred == y).double()[:, None]
    n, k = vals.shape
    order = vals.argsort(dim=0, stable=True)
    v, h = vals.gather(0, order), hit.gather(0, order)
    sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long)
    sizes[: n % n_bins] += 1
    bin_of = torch.repeat_interleave(torch.arange(n_bins), sizes).to(avg.device)
    pos = torch.arange(n, device=avg.device)[:, None].expand(n, k)
    starts = torch.ones_like(v, dtype=torch.bool)
    starts[1:] = v[1:] != v[:-1]
    first = torch.where(starts, pos, 0).cummax(0).values  # where each row's run of equal values starts
    idx = bin_of[first]
    out = torch.zeros(n_bins, k, CALIB_STATS.size, dtype=torch.float64, device=avg.device)
    out[..., CALIB_STATS.count].scatter_add_(0, idx, torch.ones_like(v))
    out[..., CALIB_STATS.confidence].scatter_add_(0, idx, v)
    out[..., CALIB_STATS.correct].scatter_add_(0, idx, h)
    return out.permute(1, 0, 2)


def split_stats(bins: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, confidence sum, correct sum) [..., B] of bins [..., B, CALIB_STATS.size], by slot name."""
    return bins[..., CALIB_STATS.count], bins[..., CALIB_STATS.confidence], bins[..., CALIB_STATS.correct]


def error_from_bins(bins: Tensor, norm: str) -> Tensor:
    """Calibration error of bins [..., B, 3] -> [...] (weights: bin count over the total count)."""
    cnt, conf, hit = split_stats(bins)
    total = cnt.sum(-1, keepdim=True).clamp_min(1)
    gap = (hit - conf).abs() / cnt.clamp_min(1)  # |accuracy - mean confidence|; 0 for empty bins
    w = cnt / total
    if norm == "l1":
        return (w * gap).sum(-1)
    if norm == "l2":
        return (w * gap * gap).sum(-1).sqrt()
    return torch.where(cnt > 0, gap, torch.zeros_like(gap)).amax(-1)


def error_from_host_bins(rows: list, norm: str) -> float:
    """:func:`error_from_bins` of one set of bins given as a Python list of B [count, confidence
    sum, correct sum] rows (already on the host): the same float64 formulas in Python, without the
    dozen small tensor ops (their dispatch was most of ``ece``'s host time). Refuses bins that hold
    no row as :func:`require_binned` does."""
    ci, fi, hi = CALIB_STATS.count, CALIB_STATS.confidence, CALIB_STATS.correct
    filled = [(r[ci], abs(r[hi] - r[fi]) / r[ci]) for r in rows if r[ci] > 0]  # (count, |acc - conf|)
    if not filled:
        raise _no_rows()
    if norm == "max":
        return max(g for _, g in filled)
    total = sum(c for c, _ in filled)
    if norm == "l1":
        return sum(c / total * g for c, g in filled)
    return math.sqrt(sum(c / total * g * g for c, g in filled))


def require_binned(bins: Tensor) -> None:
    """Refuse bins that hold no row: every row was skipped (a bad target or non-finite values,
    which only pass with validate=False)."""
    if split_stats(bins)[0].sum() == 0:
        raise _no_rows()


def _no_rows() -> ValueError:
    return ValueError("no valid rows to bin: every row of probs has a bad target or non-finite values "
                      "(validate=False skipped the checks that say which)")
