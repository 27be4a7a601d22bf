"""Argument and value checks shared by every part of :mod:`pyfastbayes.calibration`.

Two layers, both here and nowhere else:

- argument checks (types, shapes, devices, option values): cheap, on the host, always on;
- value checks (probabilities non-negative and summing to 1, finite, targets in range): ONE pass
  of the native binning op (:func:`pyfastbayes.ops.calibration_bins`), whose row diagnostics
  ``ops.CALIB_DIAG`` (bad row sum, negative entry, bad target, non-finite) :func:`raise_on_diag`
  turns into an error that names the argument and the fix. Metrics without targets pass zero
  targets. ``validate=False`` skips this pass (and its host synchronisation).

Every error names the offending argument and says how to fix it.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops

NORMS = ("l1", "l2", "max")
BINNINGS = ("uniform", "adaptive")
MAX_BINS = 2**24
DIAG = ops.CALIB_DIAG  # named slots of the op's row diagnostics
_LOGITS_HINT = "pass from_logits=True for logits"


class Prepared(NamedTuple):
    """Checked inputs of a metric: p3 [S, N, C], y int64 [N] (None without targets), and whether
    the input was binary [N] (then p3 is [1, N, 2] with columns (1 - p, p), or logits (0, l))."""

    p3: Tensor
    y: Tensor | None
    binary: bool


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def sum_tol(dtype: torch.dtype) -> float:
    """How far a row of probabilities may sum from 1: loose enough for rows rounded to dtype."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def check_choice(value, name: str, choices) -> str:
    """value, if it is one of choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool; numpy integers too) in [minimum, maximum] (no upper bound when maximum
    is None) as a Python int, else a TypeError / ValueError naming ``name``: the one count check of
    every public API (sizes, sample counts, steps, probes, batch sizes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is None:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return int(value)


def check_n_bins(n_bins) -> int:
    """n_bins as an int in [1, MAX_BINS]."""
    return check_int(n_bins, "n_bins", 1, MAX_BINS)


def _finite_real(value) -> float | None:
    """value as a finite float, or None when it is no real number (bool included) or not finite
    (a Python int too large for a float64 included: math.isfinite would raise OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        v = float(value)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def check_positive_float(value, name: str) -> float:
    """value as a finite float > 0."""
    v = _finite_real(value)
    if v is None or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r:.60}")
    return v


def check_nonnegative_float(value, name: str) -> float:
    """value as a finite float >= 0."""
    v = _finite_real(value)
    if v is None or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r:.60}")
    return v


def check_bool(value, name: str) -> bool:
    """value, if it is a bool (NumPy's included): a string such as 'no' or None must not pass
    as its truth value (from_logits='no' would read probabilities as logits)."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")
    return bool(value)


def check_generator(generator) -> torch.Generator | None:
    """``generator`` if it is None or a ``torch.Generator``, else a TypeError saying what to pass
    (a NumPy or ``random`` generator, a seed or a device string would otherwise fail deep inside
    torch, or, for a seed, be mistaken for a generator). The one check of every ``generator=``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}: pass e.g. "
                        "torch.Generator().manual_seed(seed) (for a seed alone, call torch.manual_seed)")
    return generator


def check_probs(probs, name: str = "probs") -> None:
    """Type and shape of probs: floating [N], [N, C] or [S, N, C] with C >= 2, S >= 1."""
    if not torch.is_tensor(probs):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}; convert it with .float()")
    if probs.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without data); pass a tensor that holds values")
    if probs.dim() not in (1, 2, 3):
        raise ValueError(f"{name} must be [N] (binary), [N, C] or [S, N, C], got shape {tuple(probs.shape)}")
    if probs.dim() >= 2 and probs.shape[-1] < 2:
        raise ValueError(f"{name} needs C >= 2 classes in its last dimension, got shape {tuple(probs.shape)}; "
                         f"pass binary problems as [N] probabilities of class 1")
    if probs.dim() == 3 and probs.shape[0] < 1:
        raise ValueError(f"{name} needs S >= 1 draws, got shape {tuple(probs.shape)}")


def as_3d(probs: Tensor, from_logits: bool, name: str = "probs") -> Tensor:
    """[N] / [N, C] / [S, N, C] -> [S, N, C] (binary [N] -> [1, N, 2]: (1 - p, p) or logits (0, l))."""
    check_probs(probs, name)
    if probs.dim() == 1:
        # in float64: 1 - p in float32 (and 8 / 11 bits) rounds class 0's probability (p = 1e-8 -> 1)
        probs = probs.double()
        first = torch.zeros_like(probs) if from_logits else 1 - probs  # (a +inf logit is refused as in [N, C])
        return torch.stack([first, probs], -1).unsqueeze(0)
    return probs.unsqueeze(0) if probs.dim() == 2 else probs


def check_targets(targets, n: int, device, name: str = "targets", probs_name: str = "probs") -> Tensor:
    """Type, shape and device of targets [N] (integer or bool); returns them as int64."""
    if not torch.is_tensor(targets):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{name} must hold integer class indices (or bool), got {targets.dtype}; "
                        f"convert with .long()")
    if targets.dim() != 1:
        raise ValueError(f"{name} must be [N], got shape {tuple(targets.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"{name} has N = {targets.shape[0]} entries but {probs_name} has N = {n} points")
    if targets.device != torch.device(device):
        raise ValueError(f"{name} is on {targets.device} but {probs_name} is on {device}; move one of them")
    return targets.long()


def check_not_empty(n: int, name: str, shape) -> None:
    """N = 0 is refused by every metric: a mean over no points has no value."""
    if n == 0:
        raise ValueError(f"no data points (N = 0): {name} has shape {tuple(shape)}; pass at least one data point")


# ---------------------------------------------------------------------------------------------
# values: one pass of the binning op
# ---------------------------------------------------------------------------------------------
def _bad_targets(count: int, y: Tensor, C: int, binary: bool, name: str) -> ValueError:
    valid = "0 or 1 for binary [N] probs" if binary else f"class indices 0..{C - 1}"
    return ValueError(f"{name} must lie in [0, {C}) (C = {C} classes); {count} of N = {y.numel()} do not "
                      f"(min {int(y.min())}, max {int(y.max())}): pass {valid}")


def raise_on_diag(diag: Tensor, p3: Tensor, y: Tensor, from_logits: bool, binary: bool, name: str = "probs",
                  targets_name: str = "targets") -> None:
    """Raise ValueError for the first kind of bad row the op counted (non-finite, bad target,
    negative, bad row sum), naming the argument, the count and the fix."""
    counts = diag.tolist()
    nonfinite, bad_target = int(counts[DIAG.nonfinite]), int(counts[DIAG.bad_target])
    neg, bad_sum = int(counts[DIAG.negative]), int(counts[DIAG.bad_sum])
    N, C = p3.shape[1], p3.shape[2]
    of = f"of N = {N}"
    if nonfinite:
        if from_logits:
            raise ValueError(f"{name} has NaN or infinite values in {nonfinite} {of} rows (logits may be -inf for "
                             f"a class of probability 0, but not NaN, +inf, or -inf in every class); drop or "
                             f"repair those rows")
        raise ValueError(f"{name} has NaN or infinite values in {nonfinite} {of} rows; probabilities must be "
                         f"finite: drop or repair those rows")
    if bad_target:
        raise _bad_targets(bad_target, y, C, binary, targets_name)
    if neg:
        if binary:
            raise ValueError(f"{name} must be non-negative probabilities of class 1, in [0, 1]; {neg} {of} values "
                             f"lie outside ({_LOGITS_HINT})")
        raise ValueError(f"{name} must be non-negative probabilities; {neg} {of} rows hold negative values "
                         f"({_LOGITS_HINT})")
    if bad_sum:
        raise ValueError(f"{name} rows must sum to 1 (within {sum_tol(p3.dtype):g}, a tolerance of its dtype "
                         f"{p3.dtype}); {bad_sum} {of} rows do not ({_LOGITS_HINT}; normalise probabilities with "
                         "p / p.sum(-1, keepdim=True); half-precision probabilities cast up with .float() keep their "
                         "rounding: pass them in their own dtype, or normalise after the cast)")


def checked_bins(prep: Prepared, n_bins: int, from_logits: bool, classwise: bool, validate: bool,
                 name: str = "probs", host: bool = False) -> Tensor:
    """The binning op over prep.p3 (targets: prep.y, or zeros without targets); with ``validate``
    its row diagnostics are checked. Returns bins [n_bins, 3] or [C, n_bins, 3], on the device of
    p3, or with ``host`` on the CPU: then bins and diagnostics come over in one copy (the call's one
    host synchronisation, which the checks need anyway)."""
    p3 = prep.p3
    y = prep.y if prep.y is not None else torch.zeros(p3.shape[1], dtype=torch.long, device=p3.device)
    bins, diag = ops.calibration_bins(p3, y, n_bins, from_logits, classwise, sum_tol(p3.dtype))
    if host and bins.device.type != "cpu":
        both = torch.cat([diag, bins.flatten()]).cpu()
        diag, bins = both[: diag.numel()], both[diag.numel():].view(bins.shape)
    if validate:
        raise_on_diag(diag, p3, y, from_logits, prep.binary, name)
    return bins


def check_target_range(y: Tensor, C: int, binary: bool, name: str = "targets") -> None:
    """Target range alone (one host sync): what metrics that index by target check when
    validate=False."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise _bad_targets(int(((y < 0) | (y >= C)).sum()), y, C, binary, name)


def prepare(probs, targets=None, *, from_logits: bool, validate: bool, name: str = "probs",
            allow_empty: bool = False, indexes_targets: bool = False) -> Prepared:
    """The one entry point of every metric: argument checks, N = 0 refused (unless
    ``allow_empty``), and with ``validate`` the value checks of one native pass. Without
    ``validate``, a metric that indexes by target (``indexes_targets``) still gets the target
    range checked: an out-of-range index must raise, never read out of bounds."""
    check_bool(from_logits, "from_logits")
    check_bool(validate, "validate")
    p3 = as_3d(probs, from_logits, name)
    binary = probs.dim() == 1
    if not allow_empty:
        check_not_empty(p3.shape[1], name, probs.shape)
    y = None if targets is None else check_targets(targets, p3.shape[1], p3.device, probs_name=name)
    prep = Prepared(p3, y, binary)
    if validate and p3.shape[1]:
        checked_bins(prep, 1, from_logits, False, True, name)
    elif indexes_targets and y is not None:
        check_target_range(y, p3.shape[2], binary)
    return prep


def check_logits(logits, targets) -> tuple[Tensor, Tensor]:
    """Logits [N, C] (N >= 1, C >= 2, every entry finite) and targets [N] in [0, C), through the
    same checks as the metrics -> (float64 logits, int64 targets)."""
    if torch.is_tensor(logits) and (logits.dim() != 2 or logits.shape[1] == 1):
        # (a [N, 1] column would get prepare()'s hint for probabilities, which these are not)
        raise ValueError(f"logits must be [N, C] with C >= 2 classes, got shape {tuple(logits.shape)}; for a binary "
                         f"problem pass both columns, e.g. torch.stack([torch.zeros_like(l), l], -1) for l [N]")
    prep = prepare(logits, targets, from_logits=True, validate=True, name="logits")
    inf = ~torch.isfinite(logits)
    if bool(inf.any()):
        raise ValueError(f"logits has -inf entries in {int(inf.any(-1).sum())} of N = {logits.shape[0]} rows; "
                         f"recalibration needs finite logits: replace -inf by a large negative finite value")
    return logits.detach().double(), prep.y


def check_scores(s, name: str) -> None:
    """OOD scores: a real, non-empty, finite 1-D tensor."""
    if not torch.is_tensor(s):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if s.is_complex() or s.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got {s.dtype}")
    if s.dim() != 1:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(s.shape)}; flatten it")
    if s.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor: no data points (N = 0)")
    if s.is_floating_point() and not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(s)).sum())
        raise ValueError(f"{name} holds NaN or infinite values ({bad} of {s.numel()}); drop or repair them")
