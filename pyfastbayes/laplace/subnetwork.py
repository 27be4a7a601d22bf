"""Subnetwork Laplace (Daxberger et al. 2021, laplace-torch's ``SubnetLaplace``): the posterior
over a chosen subset S of the weights, the others held at the MAP. Its precision is the
curvature's [S, S] submatrix plus the prior, so it is computed from the covered layers'
per-example Jacobian columns of S only: :class:`SubsetLayer` wraps a layer of
:mod:`._layers` and hands on, per block that holds some of S, a diagonal-kind block of just
those entries and the Jacobian part restricted to their columns ('rows' [m, N, k]). The full
and diagonal structures, the GLM and 'nn' predictives, sampling and the marginal likelihood then
work unchanged on the restricted blocks. A Kronecker factorisation of part of a matrix does not
exist, hence 'full' and 'diag' only (as in laplace-torch).

``subnetwork_indices`` index the flat vector of the model's trainable parameters
(:class:`pyfastbayes.nn.ParamLayout`; ``parameters_to_vector`` of the parameters with
``requires_grad``), as laplace-torch's do; :mod:`.subnetmask` chooses them.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .._warnings import warn_user
from ._layers import Block, Layer


def check_indices(indices, n_params: int, name: str = "subnetwork_indices") -> Tensor:
    """The subnetwork's flat positions as a sorted int64 CPU tensor [k]: ``indices`` must be a
    1-D integer tensor (or a list of ints), non-empty, without duplicates, within [0, P)."""
    if isinstance(indices, (list, tuple, range)):
        try:  # (Python or numpy integers; not bools, floats or strings)
            if any(isinstance(i, bool) for i in indices):
                raise TypeError
            indices = torch.tensor([operator.index(i) for i in indices], dtype=torch.long)
        except TypeError:
            raise TypeError(f"{name} must hold integers (flat positions in the trainable parameters)") from None
    if not torch.is_tensor(indices):
        raise TypeError(f"{name} must be a 1-D integer tensor of flat parameter positions (e.g. from "
                        f"pyfastbayes.laplace.subnetmask), got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        hint = " (a boolean mask: pass mask.nonzero().flatten())" if indices.dtype == torch.bool else ""
        raise TypeError(f"{name} must be an integer tensor, got {indices.dtype}{hint}")
    if indices.dim() != 1 or indices.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
    idx = indices.detach().to("cpu", torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n_params:
        raise ValueError(f"{name} must lie in [0, {n_params}) (the model's {n_params} trainable parameters), "
                         f"got values from {lo} to {hi}")
    ordered = idx.sort().values
    if idx.numel() > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        raise ValueError(f"{name} must not contain duplicate entries")
    if not torch.equal(ordered, idx):
        warn_user(f"{name} are used sorted (Laplace.positions): a per-weight prior_precision or prior_mean [k], and "
                  "the covered entries of posterior_variance and of the draws, follow the sorted order, not the "
                  "order given (pass sorted indices, e.g. idx.sort().values, to silence this)")
    return ordered


def covered_names(layout, positions: Tensor) -> list[str]:
    """The names (layout order) of the parameter tensors holding at least one of ``positions``
    (sorted, on the CPU)."""
    starts = torch.tensor(layout.offsets, dtype=torch.long)
    sizes = torch.tensor([max(1, int(torch.Size(s).numel())) for s in layout.shapes], dtype=torch.long)
    hits = torch.searchsorted(positions, starts + sizes) - torch.searchsorted(positions, starts)
    return [n for n, h in zip(layout.names, hits.tolist()) if h > 0]


def covered_columns(layout, names: list[str], positions: Tensor) -> Tensor:
    """Where ``positions`` (sorted) sit among the flat entries of the parameters ``names``
    (layout order) laid end to end: the columns of their Jacobian [.., sum numel] to keep."""
    wanted = set(names)
    whole = torch.cat([torch.arange(o, o + int(torch.Size(s).numel()))
                       for n, o, s in zip(layout.names, layout.offsets, layout.shapes) if n in wanted])
    return torch.searchsorted(whole, positions)


class SubsetLayer:
    """A covered layer restricted to the subnetwork: ``blocks`` are diagonal-kind blocks of the
    selected entries of the inner layer's blocks (blocks without any are dropped), and
    :meth:`jacobians` gives their Jacobian columns; everything else (recording, the forward's
    bookkeeping, memory estimates) is the inner layer's."""

    inner_bytes = 0  # the temporaries of the last jacobians() call (the GLM predictive's chunk budget)

    def __init__(self, inner: Layer, positions: Tensor):
        self.inner = inner
        self.blocks, self._takes = [], []  # (the inner block's number, its selected entries) per block
        for j, b in enumerate(inner.blocks):
            flat = b.index.reshape(-1)
            take = torch.isin(flat, positions).nonzero().flatten()
            if take.numel():
                self.blocks.append(Block(b.name, "diag", flat[take]))
                self._takes.append((j, take))
        self._k = sum(take.numel() for _, take in self._takes)  # the layer's chosen entries

    def __getattr__(self, name):  # (only reached for what SubsetLayer itself lacks)
        inner = self.__dict__.get("inner")  # (absent while copy / pickle rebuild the object)
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _entrywise(self) -> bool:
        """Whether the chosen entries' columns are built alone (Linear over positions, convolutions,
        Embedding: m N T k numbers) rather than cut from the layer's whole Jacobian parts: when they
        are at most half of those parts (few entries of a wide layer; on the CPU the gathers are
        faster than the parts' batched GEMM up to about there). An unshared Linear's
        parts are factored, U (x) V: its columns are cut from them without the whole rows."""
        if not hasattr(self.inner, "entry_jacobians"):
            return False
        whole = self.inner.jacobian_numel()
        return whole > 0 and 2 * self.inner.entry_numel(self._k) <= whole

    def jacobians(self, gs: list[Tensor]) -> list:
        takes = [(j, take.to(gs[0].device)) for j, take in self._takes]
        if self._entrywise():
            rows = self.inner.entry_jacobians(gs, takes)
            self.inner_bytes = self.inner.entry_bytes  # (its temporaries, for the GLM chunk budget)
            return [("rows", r) for r in rows]
        parts = self.inner.jacobians(gs)
        # the inner layer's whole parts exist while the columns are taken: the GLM predictive's
        # chunk budget (Laplace._glm_rows) counts them too
        self.inner_bytes = sum(t.numel() * t.element_size() for part in parts for t in part[1:] if torch.is_tensor(t))
        return [("rows", _columns(parts[j], take)) for j, take in takes]

    def jacobian_numel(self) -> int:
        """Numbers per direction :meth:`jacobians` builds (fit's memory budget): the entries'
        columns where the inner layer takes them alone, its whole parts otherwise."""
        if self._entrywise():
            return self.inner.entry_numel(self._k)
        return self.inner.jacobian_numel()


def _columns(part, take: Tensor) -> Tensor:
    """A Jacobian part's columns ``take`` (entries in the block's flat index order) as rows
    [m, N, k], without the part's full rows: U (x) V gives U[.., i] V[.., j] for its entries (i, j)."""
    kind, *t = part
    if kind == "factored":
        U, V = t
        q = V.shape[-1]
        return U.index_select(-1, take // q) * V.index_select(-1, take % q).unsqueeze(0)
    M = t[0]
    return M.reshape(M.shape[0], M.shape[1], -1).index_select(-1, take)


def restrict(layers: list[Layer], positions: Tensor) -> list[SubsetLayer]:
    """The layers restricted to ``positions`` (sorted flat positions); a layer left without any
    selected entry is dropped (its parameters are not covered)."""
    out = [SubsetLayer(layer, positions) for layer in layers]
    return [s for s in out if s.blocks]
