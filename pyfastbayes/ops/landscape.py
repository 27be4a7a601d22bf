"""The landscape ops: the parameter vectors of a loss-landscape grid and the grid engine's fused
elementwise passes over a chunk's activations (math in csrc/common/landscape.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.landscape import check_landscape_bias_act_, check_landscape_combine, check_landscape_points_
from ._dispatch import select

__all__ = ["landscape_points_", "landscape_combine", "landscape_bias_act_"]


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


def landscape_combine(parts: Tensor, mix: Tensor, act: str = "none", *, backend: str | None = None) -> Tensor:
    """The first-layer outputs of c grid points combined from the layer's products, with the
    activation that follows it fused in: one pass that writes each output once.

    parts: [R, k, F] float64, float32, float16 or bfloat16, 1 <= k <= 9 (row r's k products, e.g.
    W0 x_r, D_1 x_r, D_2 x_r of a Linear layer: F = out_features); mix: [c, k] of the same dtype and
    device (per point (1, a_1, ..., a_m)); act: 'none' or 'relu'. Returns a new contiguous
    [c, R, F] tensor, ``out[p, r] = act(sum_j mix[p, j] * parts[r, j])``, accumulated in float32
    (float64 for float64) from j = 0 in the order of j, every product and sum rounded on its own
    (CPU, CUDA and the reference agree bit for bit). Empty sizes are allowed. Not differentiable.
    """
    return select("landscape_combine", parts.device, backend)(parts, mix, act)


def landscape_bias_act_(x: Tensor, bias: Tensor | None, act: str = "none", *,
                        backend: str | None = None) -> Tensor:
    """A per-point bias and an activation applied in place in one pass: the epilogue of the grid
    engine's batched Linear layers.

    x: [c, R, F] contiguous float64, float32, float16 or bfloat16 (c points, R rows, F features),
    written in place: ``x[p, r, f] = act(x[p, r, f] + bias[p, f])``; bias: [c, F] of x's dtype and
    device, any strides, sharing no memory with x, or None (no bias); act: 'none' or 'relu'
    (relu maps negative values to +0 and keeps -0 and NaN). Math in float32 (float64 for float64),
    one rounding to x's dtype. Returns ``x``. Not differentiable.
    """
    select("landscape_bias_act_", x.device, backend)(x, bias, act)
    return x


if _native.available():

    @torch.library.register_fake("pyfastbayes::landscape_combine")
    def _(parts, mix, act):
        check_landscape_combine(parts, mix, act, fake=True)
        return parts.new_empty((mix.shape[0], parts.shape[0], parts.shape[2]))

    @torch.library.register_fake("pyfastbayes::landscape_bias_act_")
    def _(x, bias, act):
        check_landscape_bias_act_(x, bias, act, fake=True)
        return None

    @torch.library.register_fake("pyfastbayes::landscape_points_")
    def _(theta0, directions, coords, out):
        check_landscape_points_(theta0, directions, coords, out, fake=True)
        return None
