"""Slot layouts shared by the Python API and the native ops: the Python mirror.

Every layout has ONE definition in C++ (named indices in ``csrc/common/``), exported by the
extension as ``pyfastbayes._C.layouts()``. This module mirrors it so the pure-PyTorch fallback
works without the extension; ``tests/test_ops_layouts.py`` checks that the two agree.

- ``HYPER``: the float64 hyper-parameter vector of the SG-MCMC steps, [lr, temperature, num_data,
  prior_precision, a, b] (SGHMC: a = friction; pSGLD: a = alpha, b = eps).
- ``RNG``: the int64 RNG position (seed, step) of a noisy op.
- ``CALIB_STATS``: per-bin statistics of ``calibration_bins`` (count, confidence sum, correct sum).
- ``CALIB_DIAG``: its row diagnostics (bad row sum, negative entry, bad target, non-finite).
- ``SWAG``: Philox stream ids and the per-call draw limit of ``swag_sample``.
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["Layout", "HYPER", "RNG", "CALIB_STATS", "CALIB_DIAG", "SWAG", "MIRROR", "native_layouts"]


class Layout:
    """Named integer slots of one layout: ``HYPER.lr == 0``, ``HYPER.size == 6``."""

    def __init__(self, name: str, slots: Mapping[str, int]):
        self._name = name
        self._slots = dict(slots)
        for k, v in self._slots.items():
            object.__setattr__(self, k, int(v))

    def __setattr__(self, key, value):
        if key.startswith("_"):
            object.__setattr__(self, key, value)
        else:
            raise AttributeError(f"layout {self._name} is read-only")

    def as_dict(self) -> dict[str, int]:
        """The slots as a plain dict (the shape of ``_C.layouts()[name]``)."""
        return dict(self._slots)

    def __repr__(self) -> str:
        return f"Layout({self._name!r}, {self._slots})"


HYPER = Layout("sgmcmc_hyper", dict(lr=0, temperature=1, num_data=2, prior_precision=3, a=4, b=5, size=6))
RNG = Layout("rng", dict(seed=0, step=1, size=2))
CALIB_STATS = Layout("calibration_stats", dict(count=0, confidence=1, correct=2, size=3))
CALIB_DIAG = Layout("calibration_diag", dict(bad_sum=0, negative=1, bad_target=2, nonfinite=3, size=4))
SWAG = Layout("swag", dict(diag_stream=0x53570000, lowrank_stream=0x5357FFFF, max_draws=0xFFFF))

MIRROR = {lay._name: lay for lay in (HYPER, RNG, CALIB_STATS, CALIB_DIAG, SWAG)}


def native_layouts() -> dict[str, dict[str, int]] | None:
    """The layouts the compiled extension was built with (None without the extension)."""
    from .. import _native

    if _native._C is None or not hasattr(_native._C, "layouts"):
        return None
    return {k: dict(v) for k, v in _native._C.layouts().items()}
