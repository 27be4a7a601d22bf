"""SWA / SWAG ops: the fused moment update and the batched sampler (math in csrc/common/swag.h)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _native
from .._reference.swag import check_swag_collect, check_swag_sample
from ._dispatch import select

__all__ = ["swag_collect_", "swag_sample"]


def swag_collect_(params: Sequence[Tensor], mean: Tensor, sq_mean: Tensor | None = None,
                  deviation: Tensor | None = None, n: int = 0, *, backend: str | None = None) -> None:
    """One fused SWA/SWAG collect over the parameter tensors (flat list order, P elements).

    mean, sq_mean: float32/float64 [P] running moments, updated in place with weight 1 / (n + 1)
    (n = models averaged before this call); deviation: a [P] row of D (float64/32/16, bfloat16)
    written with theta - mean (updated mean). sq_mean = deviation = None gives SWA.
    """
    select("swag_collect_", mean.device, backend)(list(params), mean, sq_mean, deviation, int(n))


def swag_sample(mean: Tensor, sq_mean: Tensor, D: Tensor | None, n_draws: int, scale: float, eps: float,
                seed: int, step: int = 0, offset: int = 0, *, backend: str | None = None) -> Tensor:
    """S = n_draws SWAG draws [S, P'] (mean's dtype) from mean, sq_mean [P'] and D [K, P'] (or None:
    diagonal covariance); D is read once for all S draws and the noise comes from the Philox
    stream (seed, step); ``offset`` (any int >= 0) is the global index of column 0: the draws of
    columns [a, b) of a vector with ``offset=a`` are columns a:b of the whole vector's draws.

    With sigma^2 = max(sq_mean - mean^2, eps), ``scale`` multiplies the covariance
    diag(sigma^2) + D^T D / (K - 1) (or diag(sigma^2) without D; swa_gaussian's convention):
    theta_s = mean + sqrt(scale) sigma z1_s + sqrt(scale / (K - 1)) (z2 @ D)_s.
    """
    fn = select("swag_sample", mean.device, backend)
    return fn(mean, sq_mean, D, int(n_draws), float(scale), float(eps), int(seed), int(step), int(offset))


if _native.available():

    @torch.library.register_fake("pyfastbayes::swag_collect_")
    def _(params, mean, sq_mean, deviation, n):
        check_swag_collect(params, mean, sq_mean, deviation, n, fake=True)
        return None

    @torch.library.register_fake("pyfastbayes::swag_sample")
    def _(mean, sq_mean, D, n_draws, scale, eps, seed, step=0, offset=0):
        check_swag_sample(mean, sq_mean, D, n_draws, scale, eps, offset, fake=True)
        return mean.new_empty((n_draws, mean.shape[0]))
