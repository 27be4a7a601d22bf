"""Reference of the RNG ops: Philox4x32-10 in int64 tensor arithmetic and the normal stream."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import OverlapCheck, check, check_dense, check_meta_mix, scalar_type, sizes

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors a < 2^32 and a 32-bit constant m."""
    lo_part = a * (m & 0xFFFF)  # < 2^48
    hi_part = a * (m >> 16)  # < 2^48
    s = lo_part + ((hi_part & 0xFFFF) << 16)
    return ((s >> 32) + (hi_part >> 16)) & _MASK, s & _MASK


def check_philox4x32(counters: Tensor, *, fake: bool = False) -> None:
    """The checks of ``philox4x32`` (csrc/checks/random.h)."""
    check_meta_mix("philox4x32", counters=counters)
    check_dense("philox4x32", counters=counters)
    check(counters.dtype == torch.int64 and counters.dim() == 2 and counters.shape[1] == 4,
          "philox4x32: counters must be int64 [N, 4], got ", scalar_type(counters.dtype), " ", sizes(counters))


def check_philox_normal_(out: Tensor, *, fake: bool = False) -> None:
    """The checks of ``philox_normal_`` (csrc/checks/random.h): a floating ``out`` with memory of its own."""
    check_meta_mix("philox_normal_", out=out)
    check_dense("philox_normal_", out=out)
    check(out.is_floating_point(), "philox_normal_: out must be floating point, got ", scalar_type(out.dtype))
    OverlapCheck("philox_normal_", fake).add(out, "out", True).run()


def philox4x32(counters: Tensor, key0: int, key1: int) -> Tensor:
    """Philox4x32-10 of int64 counters [N, 4] (uint32 words) under key (key0, key1) -> int64 [N, 4]."""
    check_philox4x32(counters)
    c0, c1, c2, c3 = (counters[:, i] & _MASK for i in range(4))
    k0, k1 = key0 & _MASK, key1 & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack([c0, c1, c2, c3], dim=1)


def philox_normal_(out: Tensor, seed: int, stream: int, step: int) -> Tensor:
    """Fill ``out`` (any shape, floating dtype) with the normal stream, in logical element order."""
    check_philox_normal_(out)
    out.copy_(philox_normal(out.numel(), seed, stream, step, out.device).view(out.shape))
    return out


def philox_normal_range(start: int, numel: int, seed: int, stream: int, step: int, device=None) -> Tensor:
    """Elements [start, start + numel) of the float32 normal stream of :func:`philox_normal`."""
    first = start // 4
    nblocks = (start + numel + 3) // 4 - first
    block = torch.arange(first, first + nblocks, dtype=torch.int64, device=device)
    ctr = torch.stack([block & _MASK, block >> 32, torch.full_like(block, stream & _MASK),
                       torch.full_like(block, step & _MASK)], dim=1)
    seed &= (1 << 64) - 1
    r = philox4x32(ctr, seed & _MASK, seed >> 32)
    u1 = ((r[:, 0::2] >> 8) + 1).double() * 2.0**-24
    u2 = (r[:, 1::2] >> 8).double() * 2.0**-24
    rad = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([rad * torch.cos(2 * math.pi * u2), rad * torch.sin(2 * math.pi * u2)], dim=2).reshape(-1)
    return z[start - 4 * first: start - 4 * first + numel].float()


def philox_normal(numel: int, seed: int, stream: int, step: int, device=None) -> Tensor:
    """The float32 normal stream [numel]: element i is lane i % 4 of Philox block i // 4 with
    counter (block lo, block hi, stream, step) and key = the 64-bit seed; Box-Muller in float64."""
    return philox_normal_range(0, numel, seed, stream, step, device)
