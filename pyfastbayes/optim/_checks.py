"""Argument checks of the samplers and the schedule: numbers and tensor hyper-parameters (memory
overlap: :mod:`pyfastbayes._memory`).

Everything here only reads its arguments; a check that fails raises a ValueError or TypeError
that names the argument and says how to fix it.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

__all__ = ["Interval", "check_number", "check_integer", "check_hyper"]

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
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {value.dtype}{_where(where)}; {fix}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the parameters{_where(where)} are on {device}; "
                         f"move it with {name}.to({str(device)!r}) so the step reads it without a copy")
