"""Memory helpers.

Which tensors share memory: the Python twin of ``OverlapCheck`` (csrc/checks/common.h), used by
the references (the same refusals as the native ops, so a reference call is checked like a
native one) and by the optimizers (across parameter groups, and at construction). Shapes,
strides and data pointers only: nothing here reads tensor values.

:func:`allocation_cache`: a scope in which freed CPU tensor memory is kept and reused
(csrc/cpu/allocation_cache.cpp), for loops of large, repeated temporaries.
"""
from __future__ import annotations

import contextlib
import operator
from itertools import compress
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["non_overlapping_and_dense", "overlaps_itself", "share_memory", "memory_overlaps", "allocation_cache"]


@contextlib.contextmanager
def allocation_cache(enabled: bool = True):
    """Context: CPU tensor memory freed inside it is kept in exact-size free lists and handed out
    again (up to 1 GiB), instead of going back to glibc, which returns blocks above its mmap
    threshold to the kernel, so the next allocation of the same size page-faults on every 4 KiB
    page again. For loops that allocate the same large temporaries over and over (the grid
    engine's activations under vmap; a CPU training loop: ``with pyfastbayes.allocation_cache():
    for x, y in loader: ...``). Nested scopes are fine; the outermost one releases the cached
    blocks and restores the CPU allocator on exit, also on error. A no-op when ``enabled`` is
    False or the native extension is not loaded. CUDA memory is not affected (torch caches it)."""
    from ._native import _C

    if not enabled or _C is None:
        yield
        return
    _C.allocation_cache_enter()
    try:
        yield
    finally:
        _C.allocation_cache_exit()


def non_overlapping_and_dense(t: Tensor) -> bool:
    """``t.is_non_overlapping_and_dense()`` of c10: some permutation of t's dims is contiguous."""
    dims = sorted(range(t.dim()), key=lambda d: (t.shape[d] < 2, t.stride(d)))
    expect = 1
    for d in dims:
        if t.shape[d] < 2:
            return True
        if t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def overlaps_itself(t: Tensor) -> bool:
    """``OverlapCheck::overlaps_itself`` (csrc/checks/common.h): two elements of ``t`` share memory.

    Stride 0 on a dimension of size > 1 does; a dense tensor does not; otherwise the dims of size
    > 1 sorted by stride, each reaching past the offsets the smaller ones cover, do not; else the
    element offsets are compared exactly (shapes and strides only: works on fake tensors too).
    """
    if t.layout != torch.strided or non_overlapping_and_dense(t):
        return False
    dims = sorted((int(st), int(sz)) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    span, separated = 1, True
    for st, sz in dims:
        separated = separated and st >= span
        span += st * (sz - 1)
    if separated:
        return False
    offsets = np.zeros(1, dtype=np.int64)
    for st, sz in dims:
        offsets = (offsets[:, None] + np.arange(sz, dtype=np.int64) * st).reshape(-1)
    return len(np.unique(offsets)) < len(offsets)


def _element_starts(t: Tensor) -> Tensor:
    """Byte address of every element of t (int64 [numel], sorted)."""
    off = torch.zeros((), dtype=torch.int64)
    for d, (s, st) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[d] = s
        off = off + (torch.arange(s, dtype=torch.int64) * st).view(shape)
    return (off.reshape(-1) * t.element_size() + t.data_ptr()).sort().values


_MAX_SPANS = 1 << 20  # the C++ check's kMaxSpans (csrc/checks/common.h): more elements in the window count as shared


def share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors whose byte ranges intersect share a byte. As the C++ check: two strided
    tensors with more than 2^20 elements between them inside the common byte window are taken to
    share one (the C++ sweep would hold a span per element), so both backends refuse alike."""
    dense_a, dense_b = non_overlapping_and_dense(a), non_overlapping_and_dense(b)
    if dense_a and dense_b:
        return True
    sa, sb = _element_starts(a), _element_starts(b)
    ia, ib = a.element_size(), b.element_size()
    if not dense_a and not dense_b:
        lo, hi = max(int(sa[0]), int(sb[0])), min(int(sa[-1]) + ia, int(sb[-1]) + ib)  # the common window
        inside = int(((sa < hi) & (sa + ia > lo)).sum()) + int(((sb < hi) & (sb + ib > lo)).sum())
        if inside > _MAX_SPANS:
            return True
    # element [s, s + ia) of a meets [u, u + ib) of b iff u in (s - ib, s + ia): the first u > s - ib
    k = torch.searchsorted(sb, sa - ib, right=True)
    hit = k < sb.numel()
    return bool((sb[k[hit]] < sa[hit] + ia).any()) if bool(hit.any()) else False


_NBYTES = operator.attrgetter("nbytes")


def _all_disjoint_fast(tensors: Sequence[Tensor]) -> bool:
    """True when every tensor is contiguous, all are on one device and their address ranges
    [data_ptr, data_ptr + nbytes) are pairwise disjoint: the usual case, decided with C-level
    maps instead of a Python loop over the tensors (this runs at every step). False: look closer.

    Non-empty ranges are pairwise disjoint iff, with starts and ends sorted separately, the i-th
    smallest end is <= the (i+1)-th smallest start (disjoint ranges are ordered by both at once;
    an overlap leaves fewer than i+1 ranges ending by the (i+1)-th start)."""
    if not all(map(Tensor.is_contiguous, tensors)) or len(set(map(Tensor.get_device, tensors))) > 1:
        return False
    sizes = list(map(_NBYTES, tensors))
    starts = list(compress(map(Tensor.data_ptr, tensors), sizes))
    sizes = list(filter(None, sizes))
    if 0 in starts:  # data_ptr 0: no memory (a meta tensor)
        starts, sizes = [a for a in starts if a], [z for a, z in zip(starts, sizes) if a]
    ends = sorted(map(operator.add, starts, sizes))
    starts.sort()
    return all(map(operator.le, ends, starts[1:]))


def _spans(tensors: Sequence[Tensor]) -> list[tuple[int, int, int, bool, int]]:
    """(device index, first byte, one past the last byte, dense, position) of every tensor that
    holds memory; dense: every byte of the range belongs to the tensor."""
    out = []
    for i, t in enumerate(tensors):
        start = t.data_ptr()
        if start == 0:  # no memory: empty, or a meta tensor
            continue
        if t.is_contiguous():
            nbytes, dense = t.nbytes, True
        else:
            size = t.element_size()
            nbytes = size * (1 + sum((sz - 1) * st for sz, st in zip(t.shape, t.stride())))
            dense = nbytes == size * t.numel()
        if nbytes:
            out.append((t.get_device(), start, start + nbytes, dense, i))
    return out


def memory_overlaps(tensors: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Pairs (i, j), i != j, of ``tensors`` (each [any shape], any dtype and device) that share at
    least one byte of memory.

    Sorts the tensors' address ranges per device (O(n log n)); ranges that intersect are then
    compared exactly unless the answer follows from density, so disjoint views of one storage
    (interleaved columns) are not reported. No tensor may overlap itself (:func:`overlaps_itself`).
    """
    if _all_disjoint_fast(tensors):
        return []
    found, active = [], []
    for s in sorted(_spans(tensors)):
        device, start, end, dense, index = s
        active = [a for a in active if a[0] == device and a[2] > start]
        for a in active:  # a starts at or before s and ends after s starts
            certain = a[3] or (dense and a[2] <= end)  # s's first or a's last byte is shared
            if certain or share_memory(tensors[a[4]], tensors[index]):
                found.append((a[4], index))
        active.append(s)
    return found
