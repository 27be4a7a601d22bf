"""The kfac op: in-place accumulation of a KFAC Kronecker factor (math in csrc/common/kfac.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.kfac import check_kfac_factor_
from ._dispatch import select

__all__ = ["kfac_factor_"]


def kfac_factor_(factor: Tensor, x: Tensor, scale: float = 1.0, bias: bool = False, *,
                 backend: str | None = None) -> Tensor:
    """Add ``scale * A^T A`` to a Kronecker factor in place, with A = [x, 1] (``bias``) or x,
    without building the augmented matrix.

    x: [M, d] activations (or output gradients), float64, float32, float16 or bfloat16, any
    strides, M >= 0, d >= 1. factor: [D, D] with D = d + 1 (``bias``: the last row and column
    belong to the bias's ones column) or D = d, contiguous, float32 or float64, on x's device,
    sharing no memory with x, and not less precise than x (float64 x needs a float64 factor).
    scale: finite, >= 0 (e.g. 1 / N to average over N data points).

    factor[:d, :d] += scale * (x^T x + (x^T x)^T) / 2; with the bias, factor[d, :d] and
    factor[:d, d] += scale * x.sum(0) and factor[d, d] += scale * M. The math runs in factor's
    dtype (x converted in row chunks of at most 64 MiB), x^T x by the BLAS / cuBLAS GEMM. A
    symmetric factor stays exactly symmetric. Calling it batch after batch accumulates the
    factor of all the rows (up to rounding); M = 0 changes nothing. Checks happen before any
    write: a refused call leaves factor unchanged. Returns ``factor``. Not differentiable.
    """
    select("kfac_factor_", factor.device, backend)(factor, x, float(scale), bool(bias))
    return factor


if _native.available():

    @torch.library.register_fake("pyfastbayes::kfac_factor_")
    def _(factor, x, scale, bias):
        check_kfac_factor_(factor, x, scale, bias, fake=True)
        return None
