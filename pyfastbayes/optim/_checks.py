"""Argument checks of the samplers and the schedule: numbers, tensor hyper-parameters, memory.

Everything here only reads its arguments; a check that fails raises a ValueError or TypeError
that names the argument and says how to fix it.
"""
from __future__ import annotations

import math
import numbers
import operator
from itertools import compress
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Interval", "check_number", "check_integer", "check_hyper", "overlaps_itself", "memory_overlaps"]

_HYPER_DTYPES = (torch.float32, torch.float64)


class Interval(NamedTuple):
    """The allowed range of a hyper-parameter: lo < x (lo <= x if lo_closed), x < hi (x <= hi if hi_closed)."""

    lo: float = 0.0
    hi: float = math.inf
    lo_closed: bool = False
    hi_closed: bool = False

    def __contains__(self, v: float) -> bool:
        above = v >= self.lo if self.lo_closed else v > self.lo
        below = v <= self.hi if self.hi_closed else v < self.hi
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>=' if self.lo_closed else '>'} {self.lo:g}"
        return f"in {'[' if self.lo_closed else '('}{self.lo:g}, {self.hi:g}{']' if self.hi_closed else ')'}"


def _where(where: str) -> str:
    return f" in {where}" if where else ""


def check_number(name: str, value, interval: Interval, where: str = "") -> float:
    """``value`` as a float inside ``interval``, else TypeError/ValueError naming ``name``.

    Accepts Python and NumPy reals; refuses bool, str and anything else (no silent conversion).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}{_where(where)}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite and {interval}, got an integer of {len(str(abs(int(value))))} "
                         f"digits{_where(where)}, which a float64 cannot hold (it must be below 1.8e308)") from None
    if v not in interval:
        raise ValueError(f"{name} must be finite and {interval}, got {value}{_where(where)}")
    return v


def check_integer(name: str, value, lo: int) -> int:
    """``value`` as an int >= ``lo`` (an integral float such as 1e4 is accepted), else TypeError/ValueError."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def check_hyper(name: str, value, interval: Interval, device: torch.device | None, where: str = "") -> None:
    """A hyper-parameter: a number inside ``interval``, or a 0-dim float32/float64 tensor on ``device``.

    The value of a tensor is not checked (that would need a host sync every step).
    """
    if not torch.is_tensor(value):
        check_number(name, value, interval, where)
        return
    fix = f"e.g. {name}=torch.tensor(0.5, dtype=torch.float64, device=...) or a Python number"
    if value.dim() != 0:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}{_where(where)}; pass "
                         f"{name}=torch.tensor(0.5) (no brackets) or {name}=t.reshape(())")
    if value.dtype not in _HYPER_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}{_where(where)}; {fix}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the parameters{_where(where)} are on {device}; "
                         f"move it with {name}.to({str(device)!r}) so the step reads it without a copy")


def overlaps_itself(t: Tensor) -> bool:
    """Can two elements of ``t`` [any shape] share memory (an expand()ed or as_strided view)?

    Exact for the usual layouts (permuted, sliced, stepped views); conservative (True) for a few
    exotic interleavings that torch itself cannot decide either.
    """
    if t.is_contiguous() or t.numel() <= 1:
        return False
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    reach = 0  # the largest element offset the smaller-stride dims can reach
    for stride, size in dims:
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


_NBYTES = operator.attrgetter("nbytes")


def _all_disjoint_fast(tensors: Sequence[Tensor]) -> bool:
    """True when every tensor is contiguous, all are on one device and their address ranges
    [data_ptr, data_ptr + nbytes) are pairwise disjoint: the usual case, decided with C-level
    maps instead of a Python loop over the tensors (this runs at every step). False: look closer.

    Non-empty ranges are pairwise disjoint iff, with starts and ends sorted separately, the i-th
    smallest end is <= the (i+1)-th smallest start (disjoint ranges are ordered by both at once;
    an overlap leaves fewer than i+1 ranges ending by the (i+1)-th start)."""
    if not all(map(Tensor.is_contiguous, tensors)) or len(set(map(Tensor.get_device, tensors))) > 1:
        return False
    sizes = list(map(_NBYTES, tensors))
    starts = list(compress(map(Tensor.data_ptr, tensors), sizes))
    sizes = list(filter(None, sizes))
    if 0 in starts:  # data_ptr 0: no memory (a meta tensor)
        starts, sizes = [a for a in starts if a], [z for a, z in zip(starts, sizes) if a]
    ends = sorted(map(operator.add, starts, sizes))
    starts.sort()
    return all(map(operator.le, ends, starts[1:]))


def _spans(tensors: Sequence[Tensor]) -> list[tuple[int, int, int, bool, int]]:
    """(device index, first byte, one past the last byte, dense, position) of every tensor that
    holds memory; dense: every byte of the range belongs to the tensor."""
    out = []
    for i, t in enumerate(tensors):
        start = t.data_ptr()
        if start == 0:  # no memory: empty, or a meta tensor
            continue
        if t.is_contiguous():
            nbytes, dense = t.nbytes, True
        else:
            size = t.element_size()
            nbytes = size * (1 + sum((sz - 1) * st for sz, st in zip(t.shape, t.stride())))
            dense = nbytes == size * t.numel()
        if nbytes:
            out.append((t.get_device(), start, start + nbytes, dense, i))
    return out


def _bytes_view(buf: Tensor, t: Tensor, base: int) -> Tensor:
    """The bytes of ``t`` as a view into ``buf``, a uint8 mirror of the address range from ``base``."""
    size = t.element_size()
    return buf.as_strided((*t.shape, size), (*(st * size for st in t.stride()), 1), t.data_ptr() - base)


def _really_overlap(a: Tensor, b: Tensor, lo: int, hi: int) -> bool:
    """Exact test for two tensors whose address ranges intersect but which are not both dense
    (interleaved views): mark a's bytes in a scratch mirror of [lo, hi), look for b's."""
    buf = torch.zeros(hi - lo, dtype=torch.uint8)
    _bytes_view(buf, a, lo).fill_(1)
    return bool(_bytes_view(buf, b, lo).any())


def memory_overlaps(tensors: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Pairs (i, j), i != j, of ``tensors`` (each [any shape], any dtype and device) that share at
    least one byte of memory.

    Sorts the tensors' address ranges per device (O(n log n)); ranges that intersect are then
    compared exactly unless the answer follows from density, so disjoint views of one storage
    (interleaved columns) are not reported. No tensor may overlap itself (:func:`overlaps_itself`).
    """
    if _all_disjoint_fast(tensors):
        return []
    found, active = [], []
    for s in sorted(_spans(tensors)):
        device, start, end, dense, index = s
        active = [a for a in active if a[0] == device and a[2] > start]
        for a in active:  # a starts at or before s and ends after s starts
            certain = a[3] or (dense and a[2] <= end)  # s's first or a's last byte is shared
            if certain or _really_overlap(tensors[a[4]], tensors[index], a[1], max(a[2], end)):
                found.append((a[4], index))
        active.append(s)
    return found
