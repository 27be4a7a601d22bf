"""Flatness of a minimum, as the seed lecture measures it: the largest Hessian eigenvalue and the
Hessian trace of the training loss."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .models import hessian
from ..calibration._checks import check_int
from .operator import _check_generator
from .spectral import _check_progress, eigenvalues
from .trace import trace

__all__ = ["Sharpness", "sharpness"]


class Sharpness(NamedTuple):
    """top_eigenvalue: lambda_max of the Hessian; trace: its Hutchinson estimate, with std_error."""

    top_eigenvalue: float
    trace: float
    trace_std_error: float


def sharpness(model: nn.Module, loss_fn, data, *, n_probes: int = 100, params=None,
              generator: torch.Generator | None = None, progress: bool | None = False,
              n_iter: int | None = None, tol: float | None = None) -> Sharpness:
    """lambda_max and tr of the Hessian of the mean loss over ``data`` (see :func:`hessian` for
    ``data``, ``params`` and the weighting of batches).

    lambda_max by Lanczos with full reorthogonalisation (:func:`eigenvalues`, k = 1); the trace by
    Hutchinson with ``n_probes`` Rademacher probes in blocks of 32 (:func:`trace`). ``generator``
    draws the start vector and the probes; ``n_iter`` and ``tol`` are those of the Lanczos run
    (:func:`eigenvalues`). Larger values mean a sharper minimum.
    """
    # checked before the Lanczos run, not after it (trace() would refuse them only then)
    check_int(n_probes, "n_probes", 1)
    _check_generator(generator)
    _check_progress(progress)
    H = hessian(model, loss_fn, data, params=params)
    top, _ = eigenvalues(H, k=1, n_iter=n_iter, tol=tol, generator=generator, progress=progress)
    tr = trace(H, n_probes=n_probes, generator=generator, progress=progress)
    return Sharpness(float(top[0]), float(tr.estimate), float(tr.std_error))
