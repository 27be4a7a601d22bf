"""A batch of model inputs as rows: a tensor [N, ...] or a mapping of them (a HuggingFace-style
``{'input_ids': [N, T], 'attention_mask': [N, T], 'labels': [N]}`` batch, passed to the model
whole, as laplace-torch does). Every tensor value of a mapping holds the batch's N rows in its
first dimension; other values (None, flags, strings) go along unchanged with every part.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["is_rows", "row_count", "take_rows", "split_rows", "cat_rows", "same_row_shapes", "rows_to", "row_tensors"]


def is_rows(x) -> bool:
    """Whether ``x`` is one batch of rows (a tensor or a mapping), not an iterable of batches."""
    return torch.is_tensor(x) or isinstance(x, Mapping)


def row_tensors(x) -> list[Tensor]:
    """The tensors of a batch: ``[x]`` or the mapping's tensor values."""
    return [x] if torch.is_tensor(x) else [v for v in x.values() if torch.is_tensor(v)]


def row_count(x, name: str = "x") -> int:
    """N, the rows of a batch: ``x.shape[0]``, or the first dimension every tensor of a mapping
    shares (ValueError naming the keys that disagree, a mapping without tensors, a 0-dim tensor)."""
    if torch.is_tensor(x):
        if x.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension: a tensor [N, ...], got a 0-dim tensor")
        return x.shape[0]
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in x.items() if torch.is_tensor(v)}
    if not sizes:
        raise ValueError(f"{name} is a mapping without tensors (keys {list(x)[:5]}): a batch needs tensors [N, ...]")
    if len(set(sizes.values())) > 1 or None in sizes.values():
        shown = ", ".join(f"{k!r}: {tuple(x[k].shape)}" for k in sizes)
        raise ValueError(f"{name}: every tensor of a dict batch must hold the batch's rows in its first dimension; "
                         f"got {shown}")
    return next(iter(sizes.values()))


def take_rows(x, index):
    """Rows ``index`` (a slice or index tensor) of every tensor of the batch (a mapping comes back
    as a dict)."""
    if torch.is_tensor(x):
        return x[index]
    return {k: v[index] if torch.is_tensor(v) else v for k, v in x.items()}


def split_rows(x, size: int, name: str = "x") -> list:
    """The batch in ceil(N / ``size``) consecutive parts of near-equal rows, at most ``size`` each
    (one empty part when N = 0), the parts ``Tensor.tensor_split`` makes of a tensor."""
    n = row_count(x, name)
    k = max(1, -(-n // size))
    if torch.is_tensor(x):
        return list(x.tensor_split(k))
    q, r = divmod(n, k)  # tensor_split's sizes: the first r parts one row longer
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + q + (i < r))
    return [take_rows(x, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def cat_rows(batches: list, name: str = "x"):
    """The batches' rows joined: ``torch.cat`` of tensors, or per key of mappings (which must have
    the same keys; a non-tensor value is taken from the first batch)."""
    first = batches[0]
    if torch.is_tensor(first):
        return torch.cat(batches)
    keys = list(first)
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or list(b) != keys:
            raise ValueError(f"{name}: batch {i} has other keys than batch 0 ({keys}); dict batches must agree")
    return {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(first[k]) else first[k] for k in keys}


def same_row_shapes(batches: list) -> bool:
    """Whether :func:`cat_rows` can join the batches: all tensors, or all mappings with the same
    keys, whose tensors agree beyond the rows (shape[1:]) and in dtype (dict batches padded per
    batch to their longest sequence do not)."""
    def sig(b):
        if torch.is_tensor(b):
            return (tuple(b.shape[1:]), b.dtype)
        if isinstance(b, Mapping):
            return tuple((k, tuple(v.shape[1:]), v.dtype) if torch.is_tensor(v) else (k,) for k, v in b.items())
        return None
    first = sig(batches[0])
    return first is not None and all(sig(b) == first for b in batches[1:])


def rows_to(x, device):
    """The batch with its tensors on ``device``."""
    if torch.is_tensor(x):
        return x.to(device)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}
