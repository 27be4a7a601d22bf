"""Eigendecomposition of many symmetric factors at once.

KFAC gives one or two small symmetric factors per layer: many matrices of a few sizes. Calling
``torch.linalg.eigh`` once per factor pays a launch and a synchronisation each (and on CUDA a
batched ``eigh`` of matrices above 32 x 32 runs them one after another), so :func:`eigh_many`
groups factors by (size, dtype, device) and decomposes each group with one batched call, or on
the CPU (``method='cpu'``), where LAPACK's divide and conquer runs the batch in parallel threads.
bench/bench_laplace.py measures the methods side by side (16 factors of 512 x 512 and a
realistic mix).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

METHODS = ("auto", "batched", "loop", "cpu")


def eigh_many(mats: list[Tensor], method: str = "auto") -> list[tuple[Tensor, Tensor]]:
    """Eigendecompositions (eigenvalues [n] ascending, eigenvectors [n, n] in columns) of the
    symmetric matrices ``mats`` (each [n_i, n_i], any sizes, dtypes and devices), in their order;
    eigenvalues of these positive semi-definite factors are clamped at 0 (rounding).

    method: 'batched' -> one ``torch.linalg.eigh`` per group of equal (size, dtype, device);
    'loop' -> one call per matrix; 'cpu' -> the groups decomposed on the CPU and the results moved
    back; 'auto' -> 'batched'.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for i, m in enumerate(mats):
        if not torch.is_tensor(m) or m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"mats[{i}] must be a square matrix [n, n], got "
                             f"{tuple(m.shape) if torch.is_tensor(m) else type(m).__name__}")
    out: list = [None] * len(mats)
    if method == "loop":
        for i, m in enumerate(mats):
            out[i] = _eigh(m.unsqueeze(0), m.device)
            out[i] = (out[i][0][0], out[i][1][0])
        return out
    groups: dict = defaultdict(list)
    for i, m in enumerate(mats):
        groups[(m.shape[0], m.dtype, m.device)].append(i)
    for (_, _, device), idx in groups.items():
        stack = torch.stack([mats[i] for i in idx])
        vals, vecs = _eigh(stack.cpu() if method == "cpu" else stack, device)
        for j, i in enumerate(idx):
            out[i] = (vals[j], vecs[j])
    return out


def _eigh(stack: Tensor, device) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(stack)
    return vals.clamp_min(0).to(device), vecs.to(device)
