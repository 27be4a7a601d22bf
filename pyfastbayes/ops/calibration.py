"""The calibration binning op (one pass over [S, N, C] predictions; see csrc/common/calibration.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.calibration import check_calibration_bins
from ._dispatch import select
from .layouts import CALIB_DIAG, CALIB_STATS

__all__ = ["calibration_bins"]


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, from_logits: bool = False,
                     classwise: bool = False, sum_tol: float = 1e-4, *,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    """One pass of binning for calibration metrics (native op or its reference).

    probs: [S, N, C] probabilities (or logits with ``from_logits``), averaged over the S draws
    inside; targets: int64 [N]. Returns (bins, diag): bins float64 [n_bins, 3] (top-label) or
    [C, n_bins, 3] (``classwise``) holding per bin the slots of ``layouts.CALIB_STATS`` (count,
    sum of confidence, sum of correct); diag float64 [4] = row counts in the slots of
    ``layouts.CALIB_DIAG`` (row sum off 1 by more than ``sum_tol``, negative entry, target outside
    [0, C), non-finite). Rows with a bad target or non-finite values are skipped. Bin k is
    [k/n_bins, (k+1)/n_bins), the last bin closed (see csrc/common/calibration.h).
    """
    fn = select("calibration_bins", probs.device, backend)
    return fn(probs, targets, int(n_bins), bool(from_logits), bool(classwise), float(sum_tol))


if _native.available():

    @torch.library.register_fake("pyfastbayes::calibration_bins")
    def _(probs, targets, n_bins, from_logits=False, classwise=False, sum_tol=1e-4):
        check_calibration_bins(probs, targets, n_bins, sum_tol, fake=True)
        shape = (probs.shape[2], n_bins, CALIB_STATS.size) if classwise else (n_bins, CALIB_STATS.size)
        return probs.new_empty(shape, dtype=torch.float64), probs.new_empty((CALIB_DIAG.size,), dtype=torch.float64)
