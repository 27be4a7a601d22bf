"""Argument and value checks shared by every part of :mod:`pyfastbayes.calibration`.

Argument checks (types, shapes, devices, option values) are cheap host checks; value checks
(probabilities non-negative and summing to 1, finite, targets in range) read the row diagnostics
of the native binning op (slots ``ops.CALIB_DIAG``). Every error names the offending argument.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import ops

NORMS = ("l1", "l2", "max")
BINNINGS = ("uniform", "adaptive")
MAX_BINS = 2**24
DIAG = ops.CALIB_DIAG  # named slots of the op's row diagnostics


def sum_tol(dtype: torch.dtype) -> float:
    """How far a row of probabilities may sum from 1: loose enough for rows rounded to dtype."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if not 1 <= int(n_bins) <= MAX_BINS:
        raise ValueError(f"n_bins must be in [1, {MAX_BINS}], got {n_bins}")
    return int(n_bins)


def check_probs(probs, name: str = "probs") -> None:
    if not torch.is_tensor(probs):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}")
    if probs.dim() not in (1, 2, 3):
        raise ValueError(f"{name} must be [N] (binary), [N, C] or [S, N, C], got shape {tuple(probs.shape)}")
    if probs.dim() >= 2 and probs.shape[-1] < 2:
        raise ValueError(f"{name} needs C >= 2 classes in its last dimension, got shape {tuple(probs.shape)}; "
                         "pass binary problems as [N] probabilities of class 1")
    if probs.dim() == 3 and probs.shape[0] < 1:
        raise ValueError(f"{name} needs S >= 1 draws, got shape {tuple(probs.shape)}")


def as_3d(probs: Tensor, from_logits: bool) -> Tensor:
    """[N] / [N, C] / [S, N, C] -> [S, N, C] (binary [N] -> [1, N, 2]: (1 - p, p) or logits (0, l))."""
    check_probs(probs)
    if probs.dim() == 1:
        first = torch.zeros_like(probs) if from_logits else 1 - probs
        return torch.stack([first, probs], -1).unsqueeze(0)
    return probs.unsqueeze(0) if probs.dim() == 2 else probs


def check_targets(targets, n: int, device, name: str = "targets") -> Tensor:
    if not torch.is_tensor(targets):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{name} must hold integer class indices (or bool), got {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"{name} must be [N], got shape {tuple(targets.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"{name} has N = {targets.shape[0]} entries but probs has N = {n} points")
    if targets.device != torch.device(device):
        raise ValueError(f"{name} is on {targets.device} but probs is on {device}")
    return targets.long()


def check_target_range(y: Tensor, C: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"targets must lie in [0, {C}), got min {int(y.min())}, max {int(y.max())}")


def raise_on_diag(diag: Tensor, p3: Tensor, y: Tensor, from_logits: bool, tol: float) -> None:
    counts = [int(v) for v in diag.tolist()]
    bad_sum, neg = counts[DIAG.bad_sum], counts[DIAG.negative]
    bad_target, nonfinite = counts[DIAG.bad_target], counts[DIAG.nonfinite]
    if nonfinite:
        raise ValueError(f"probs has NaN or infinite values in {nonfinite} rows")
    if bad_target:
        C = p3.shape[-1]
        raise ValueError(f"targets must lie in [0, {C}) (C = {C} classes); {bad_target} do not "
                         f"(min {int(y.min())}, max {int(y.max())})")
    if not from_logits and neg:
        raise ValueError(f"probs must be non-negative probabilities; {neg} rows hold negative values "
                         "(pass from_logits=True for logits)")
    if not from_logits and bad_sum:
        raise ValueError(f"probs rows must sum to 1 (within {tol:g}); {bad_sum} rows do not "
                         "(pass from_logits=True for logits)")


def prep(probs, from_logits: bool, validate: bool) -> Tensor:
    p3 = as_3d(probs, from_logits)
    if validate and not from_logits:
        tol = sum_tol(p3.dtype)
        if bool((p3 < 0).any()):
            raise ValueError("probs must be non-negative probabilities (pass from_logits=True for logits)")
        if not bool(((p3.double().sum(-1) - 1).abs() <= tol).all()):
            raise ValueError(f"probs rows must sum to 1 (within {tol:g}); pass from_logits=True for logits")
    return p3


def check_logits(logits, targets) -> tuple[Tensor, Tensor]:
    """Logits [N, C] (finite, N >= 1, C >= 2) and targets [N] in range -> (float64 logits, int64 targets)."""
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with N >= 1, C >= 2, got shape {tuple(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits holds NaN or infinite values")
    y = check_targets(targets, logits.shape[0], logits.device)
    check_target_range(y, logits.shape[1])
    return logits.detach().double(), y


def check_scores(s, name: str) -> None:
    """OOD scores: a real, non-empty, finite 1-D tensor."""
    if not torch.is_tensor(s):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if s.is_complex() or s.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got {s.dtype}")
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
    if s.is_floating_point() and not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
