"""RNG ops: raw Philox4x32-10 blocks and the normal stream every noisy kernel draws."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.random import check_philox4x32, check_philox_normal_
from ._dispatch import select

__all__ = ["philox4x32", "philox_normal_"]


def philox4x32(counters: Tensor, key0: int, key1: int, *, backend: str | None = None) -> Tensor:
    """Philox4x32-10 blocks: ``counters`` int64 [N, 4] of uint32 words -> int64 [N, 4].

    backend: None (native kernel when available), 'native' or 'reference' (see :func:`select`).
    """
    return select("philox4x32", counters.device, backend)(counters, key0, key1)


def philox_normal_(out: Tensor, seed: int, stream: int, step: int, *, backend: str | None = None) -> Tensor:
    """Fill ``out`` [any shape] with the standard-normal stream (seed, stream, step) in place.

    Element i (logical order) is lane i % 4 of Philox4x32-10 block i // 4 with counter
    (block, stream, step) and key ``seed``; this is the noise the fused optimizers add.
    """
    select("philox_normal_", out.device, backend)(out, seed, stream, step)
    return out


if _native.available():

    @torch.library.register_fake("pyfastbayes::philox4x32")
    def _(counters, key0, key1):
        check_philox4x32(counters, fake=True)
        return torch.empty_like(counters)

    @torch.library.register_fake("pyfastbayes::philox_normal_")
    def _(out, seed, stream, step):
        check_philox_normal_(out, fake=True)
        return None
