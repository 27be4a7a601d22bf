"""Loading of the compiled extension ``pyfastbayes._C``.

``import pyfastbayes`` never fails because of the native build: when ``_C`` cannot be loaded,
every public function runs its pure-PyTorch reference (same random stream, same numbers, slower)
and one warning says why.
"""
from __future__ import annotations

import warnings

import torch

_C = None
LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F811  (registers torch.ops.pyfastbayes.*)
except ImportError as exc:  # pragma: no cover - exercised in the fallback test via a subprocess
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "pyfastbayes: the compiled extension could not be loaded "
        f"({LOAD_ERROR}); using the pure-PyTorch fallbacks. Rebuild with "
        "`pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=3,
    )


def available() -> bool:
    """True when the native extension is loaded and its ops are registered."""
    return _C is not None


# device types with native kernels, fixed at load time (asked on every op call: keep it a lookup)
_KERNEL_DEVICES = frozenset() if _C is None else frozenset({"cpu"} | ({"cuda"} if _C.build_info()["cuda"] else set()))


def has_kernel(device: torch.device | str) -> bool:
    """True when the native extension has kernels for ``device`` ('cpu' or 'cuda')."""
    return (device.type if isinstance(device, torch.device) else torch.device(device).type) in _KERNEL_DEVICES


def build_info() -> dict:
    """What the native build contains: dict(version, torch, cuda, cuda_archs, openmp, native,
    cpu_philox), ``cpu_philox`` being the CPU Philox version this process draws noise with
    ('avx512', 'avx2' or 'scalar': the widest the CPU runs, capped by PYFASTBAYES_PHILOX_ISA).

    Without the extension: ``cuda`` and ``openmp`` are False, ``cpu_philox`` is None (the
    pure-PyTorch reference draws the noise) and ``error`` says why it did not load.
    """
    if _C is None:
        from . import __version__

        return {"version": __version__, "torch": torch.__version__, "cuda": False, "cuda_archs": "",
                "openmp": False, "native": False, "cpu_philox": None, "error": LOAD_ERROR}
    info = dict(_C.build_info())
    info["native"] = True
    info["cpu_philox"] = _C.philox_tile_isa()
    return info
