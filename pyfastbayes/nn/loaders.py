"""Walking a loader without its per-row cost, batch for batch what the loader itself yields.

A ``DataLoader`` over a ``TensorDataset`` with the default collation fetches every row on its own
(``TensorDataset.__getitem__``: one indexing per tensor per row) and stacks the rows again: on
the digits Laplace benchmark (1 437 rows in batches of 128) that was ~0.4 ms per batch, 5 % of a
KFAC fit of a small CNN. :func:`batches` yields the same batches from the dataset's tensors
directly, one copy per tensor and batch.

Same batches, same randomness: the loader's own (batch) sampler is walked, so a shuffling
sampler draws exactly what the loader would, and the one seed the loader's iterator draws from
its generator (``loader.generator`` or the global one) at ``iter()`` is drawn here too, so the
random state afterwards is the loader's (tests/test_loaders.py checks both against the installed
torch). Batches are lists ``[x, y, ...]``, as the default collation makes of a TensorDataset's
tuples. Every batch is a new tensor, as the loader's: a model that writes into its input must not
change the dataset (a run of rows is one copy of a slice, other batches one ``index_select``).

Anything else (another dataset or loader class, a custom ``collate_fn``, worker processes,
``batch_size=None``) is walked by the loader itself.
"""
from __future__ import annotations

import operator
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
    same batches (lists of new tensors [B, ...], one per dataset tensor) without the per-row fetch."""
    if not _direct(data):
        return iter(data)
    order = iter(data.batch_sampler)  # in the loader's order: its sampler first, then the seed
    # what DataLoader's iterator draws at construction (its workers' base seed): drawn here too
    torch.empty((), dtype=torch.int64).random_(generator=data.generator)
    return _walk(data.dataset.tensors, order)


def _indices(idx, n: int) -> list[int]:
    """The batch's row indices as ints in [0, n), negative ones counted from the end as the
    dataset's indexing counts them; anything the loader would refuse raises IndexError too."""
    if not idx:
        raise IndexError("the batch sampler yielded an empty batch (the DataLoader refuses it too)")
    out = []
    for i in idx:
        try:
            k = operator.index(i)
        except TypeError:
            raise IndexError(f"the batch sampler yielded a non-integer index {i!r}: only integers index rows") from None
        if not -n <= k < n:
            raise IndexError(f"index {k} is out of bounds for dimension 0 with size {n}")
        out.append(k + n if k < 0 else k)
    return out


def _walk(tensors: tuple, order) -> Iterator[list]:
    n = tensors[0].shape[0]
    for idx in order:
        idx = _indices(list(idx), n)
        start, m = idx[0], len(idx)
        if idx == list(range(start, start + m)):  # a run: one copy of the slice (the batch owns its memory)
            yield [t[start:start + m].clone() for t in tensors]
        else:
            index = torch.tensor(idx, dtype=torch.long)
            yield [t.index_select(0, index.to(t.device)) for t in tensors]
