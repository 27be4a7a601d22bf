"""RNG ops: raw Philox4x32-10 blocks and the normal stream every noisy kernel draws."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.random import check_philox4x32, check_philox_normal_
from ._dispatch import select

__all__ = ["philox4x32", "philox_normal_", "rng_snapshot"]


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


@torch.library.custom_op("pyfastbayes_py::rng_snapshot", mutates_args=())
def _rng_snapshot(position: Tensor) -> Tensor:
    return position.clone()


@_rng_snapshot.register_fake
def _(position):
    return torch.empty_like(position)


def rng_snapshot(position: Tensor) -> Tensor:
    """A copy of an RNG position (int64 [2]: seed, step) that ``torch.compile`` keeps apart from the
    buffer it copies: the layer draws from the copy and then advances its buffer in place, and
    inductor turned ``position.clone()`` into the buffer itself, so a backward that regenerates the
    noise read the advanced position (wrong d/d rho, no error). Inside a compiled region this is an
    opaque op (``pyfastbayes_py::rng_snapshot``, Python, any device); in eager mode a plain clone
    (no dispatch of a custom op on the per-forward path)."""
    if torch.compiler.is_compiling():
        return _rng_snapshot(position)
    return position.clone()
