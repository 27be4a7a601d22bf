"""Walking a loader without its per-row cost, batch for batch what the loader itself yields.

A ``DataLoader`` over a ``TensorDataset`` with the default collation fetches every row on its own
(``TensorDataset.__getitem__``: one indexing per tensor per row) and stacks the rows again: on
the digits Laplace benchmark (1 437 rows in batches of 128) that was 0.8 ms per batch, a tenth of
a KFAC fit of a small CNN. :func:`batches` yields the same batches from the dataset's tensors
directly: a contiguous run of indices (the sequential sampler) as a slice, any other batch of
indices (a shuffled sampler, a custom batch sampler) by one ``index_select`` per tensor.

Same batches, same randomness: the loader's own (batch) sampler is walked, so a shuffling
sampler draws exactly what the loader would, and the one seed the loader's iterator draws from
its generator (``loader.generator`` or the global one) at ``iter()`` is drawn here too, so the
random state afterwards is the loader's (tests/test_loaders.py checks both against the installed
torch). Batches are lists ``[x, y, ...]``, as the default collation makes of a TensorDataset's
tuples. A sequential batch is a slice: a view of the dataset's tensor, not a copy (consumers
here never write into their inputs).

Anything else (another dataset or loader class, a custom ``collate_fn``, worker processes,
``batch_size=None``) is walked by the loader itself.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["batches"]


def _direct(loader) -> bool:
    """True when ``loader``'s batches can be taken from its TensorDataset's tensors directly."""
    return (type(loader) is DataLoader and type(loader.dataset) is TensorDataset
            and loader.collate_fn is default_collate and loader.batch_sampler is not None
            and loader.num_workers == 0)


def batches(data: Iterable) -> Iterator:
    """``iter(data)``, or for a plain ``DataLoader`` over a ``TensorDataset`` (module docstring) the
    same batches (lists of tensors [B, ...], one per dataset tensor) without the per-row fetch."""
    if not _direct(data):
        return iter(data)
    # what DataLoader's iterator draws at construction (its workers' base seed): drawn here too
    torch.empty((), dtype=torch.int64).random_(generator=data.generator)
    return _walk(data.dataset.tensors, data.batch_sampler)


def _walk(tensors: tuple, batch_sampler) -> Iterator[list]:
    n = tensors[0].shape[0]
    for idx in batch_sampler:
        idx = list(idx)
        if not idx:
            yield [t[:0] for t in tensors]
            continue
        start = int(idx[0])
        if 0 <= start and start + len(idx) <= n and idx == list(range(start, start + len(idx))):
            yield [t[start:start + len(idx)] for t in tensors]
        else:  # out-of-range indices raise here, as in the loader
            index = torch.as_tensor(idx, dtype=torch.long)
            yield [t.index_select(0, index.to(t.device)) for t in tensors]
