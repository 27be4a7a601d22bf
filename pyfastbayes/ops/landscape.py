"""The landscape op: the parameter vectors of a loss-landscape grid (math in csrc/common/landscape.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.landscape import check_landscape_points_
from ._dispatch import select

__all__ = ["landscape_points_"]


def landscape_points_(theta0: Tensor, directions: Tensor, coords: Tensor, out: Tensor, *,
                      backend: str | None = None) -> Tensor:
    """Write the parameter vectors of n points of a line / plane / subspace around theta0 into ``out``.

    theta0: [P] centre, float64, float32, float16 or bfloat16; directions: [m, P] of the same
    dtype and device, 1 <= m <= 8 (1: a line, 2: a plane); coords: [n, m] float64 (recommended:
    offsets like 0.05 stay exact) or theta0's dtype, same device; out: [n, P] contiguous, theta0's
    dtype and device, sharing no memory with the inputs. Row i of ``out`` becomes
    ``theta0 + sum_j coords[i, j] * directions[j]``, accumulated in float32 (float64 for float64
    tensors) in the order j = 0..m-1 from theta0, every product and sum rounded on its own, so the
    CPU kernel, the CUDA kernel and the reference agree bit for bit. n = 0 and P = 0 are allowed.
    Returns ``out``. Not differentiable (writes in place).
    """
    select("landscape_points_", theta0.device, backend)(theta0, directions, coords, out)
    return out


if _native.available():

    @torch.library.register_fake("pyfastbayes::landscape_points_")
    def _(theta0, directions, coords, out):
        check_landscape_points_(theta0, directions, coords, out, fake=True)
        return None
