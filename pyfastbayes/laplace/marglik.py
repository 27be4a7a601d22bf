"""The Laplace approximation to the log marginal likelihood and prior-precision tuning.

log p(D) ~= log p(D | theta_MAP) - 1/2 [log det P - log det P_0 + (theta_MAP - mu_0)^T P_0 (theta_MAP - mu_0)]

with P = s H + P_0 the posterior precision (s = 1 / (sigma^2 T)) and P_0 = diag(delta) the prior
precision (MacKay 1992; Immer et al. 2021; laplace-torch's convention term by term).

Prior structures: 'scalar' (one delta), 'layerwise' (one per block: a layer's weight and bias
together when ``bias_block='joint'``, every parameter tensor with 'separate'), 'diag' (one per
parameter; not for the Kronecker structure, whose exact damping needs one delta per block).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._warnings import warn_user

PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")
TUNING = ("marglik", "gridsearch")


def expand_prior(prior: Tensor, blocks, P: int) -> Tensor:
    """A prior precision of shape [] (scalar), [n_blocks] (layerwise) or [P] (diag) as [P] in
    selection order (differentiable)."""
    if prior.dim() == 0 or prior.numel() == 1:
        return prior.reshape(()).expand(P)
    if prior.numel() == len(blocks) and prior.numel() != P:
        out = prior.new_empty(P)
        parts = [prior[i].expand(b.numel) for i, b in enumerate(blocks)]
        index = torch.cat([b.sel.reshape(-1) for b in blocks])
        return out.index_copy(0, index, torch.cat(parts))
    return prior


def check_prior(value, blocks, P: int | None, structure: str, dtype, device, name: str = "prior_precision") -> Tensor:
    """``value`` (a positive float or tensor of shape [], [1], [n_blocks] or [P]) as a tensor, checked.

    ``blocks=None, P=None``: the covered layers are not known yet (a last-layer Laplace before
    fit finds them): everything but the length of a 1-D tensor is checked now, that at fit."""
    known = blocks is not None
    shapes = f"[], [1], [n_blocks] = [{len(blocks)}] or [P] = [{P}]" if known else "[], [1], [n_blocks] or [P]"
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":  # laplace-torch takes numpy values too
        value = torch.from_numpy(np.asarray(value, dtype=np.float64))
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Real) or torch.is_tensor(value)):
        raise TypeError(f"{name} must be a positive float or a tensor ({shapes}), got {type(value).__name__}")
    if isinstance(value, numbers.Real) and not torch.is_tensor(value):
        value = float(value)  # numpy scalars (np.float32(0.5), np.int64(2)) as Python floats
    if torch.is_tensor(value) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real tensor (a prior precision > 0), got {value.dtype}")
    # a copy (differentiable, for the marginal likelihood's tuning): the Laplace owns what it stores
    t = torch.as_tensor(value, dtype=dtype, device=device) if not torch.is_tensor(value) else \
        value.to(dtype=dtype, device=device, copy=True)
    if t.dim() > 1 or (t.dim() == 1 and (not t.numel() or (known and t.numel() not in (1, len(blocks), P)))):
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()) or not bool((t.detach() > 0).all()):
        raise ValueError(f"{name} must be finite and > 0 (a prior precision), got "
                         f"{t.detach().min().item() if t.numel() else t}")
    if structure == "lowrank" and t.numel() != 1:
        raise ValueError(f"hessian_structure='lowrank' takes one scalar {name} (the low-rank complement is exact "
                         "only for delta I)")
    if known and structure == "kron" and t.dim() == 1 and t.numel() == P and t.numel() not in (1, len(blocks)):
        raise ValueError(f"hessian_structure='kron' takes a scalar or a per-block (layerwise, {len(blocks)}) "
                         f"{name}: the prior is added exactly in each block's Kronecker eigenbasis, which needs "
                         "one value per block; for a per-parameter prior use hessian_structure='diag' or 'full'")
    return t


def initial(structure: str, init: Tensor, n_blocks: int, P: int) -> Tensor:
    """The starting log prior precision of a ``prior_structure`` from ``init`` ([] or that shape)."""
    size = {"scalar": 1, "layerwise": n_blocks, "diag": P}[structure]
    init = init.detach().reshape(-1)
    if init.numel() == 1:
        init = init.expand(size)
    elif init.numel() != size:
        raise ValueError(f"init_prior_prec has {init.numel()} values; prior_structure={structure!r} needs 1 or {size}")
    return init.log().clone().reshape(() if structure == "scalar" else (size,))


def adam(objective, tensors: list[Tensor], n_steps: int, lr: float, progress: bool, desc: str) -> float:
    """Minimise ``objective()`` over ``tensors`` (requires_grad set here) with Adam; returns the
    last value. Non-finite objectives stop the run with a RuntimeError naming the step. A
    RuntimeWarning when the run ends still marching (the last :data:`_MARCH` steps of some value
    all in one direction, each above lr / 20; near an optimum they shrink and change sign), e.g. from
    a start far from it: the result is then where the steps ran out, not the optimum."""
    for t in tensors:
        t.requires_grad_(True)
    opt = torch.optim.Adam(tensors, lr=lr)
    value = math.nan
    moves = []  # the changes of the last _MARCH steps, flattened
    for step in tqdm(range(n_steps), desc=desc, leave=False, disable=not progress):
        opt.zero_grad()
        loss = objective()
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"the negative log marginal likelihood became {loss.item()} at step {step}: lower lr "
                               "or start from another init_prior_prec")
        loss.backward()
        last = step >= n_steps - _MARCH  # (the convergence check looks at these steps only)
        before = torch.cat([t.detach().reshape(-1) for t in tensors]) if last else None
        opt.step()
        if last:
            moves.append(torch.cat([t.detach().reshape(-1) for t in tensors]) - before)
        value = float(loss.detach())
    for t in tensors:
        t.requires_grad_(False)
    if n_steps >= _MARCH:
        m = torch.stack(moves)  # [_MARCH, values]
        marching = ((m > 0.05 * lr).all(0) | (m < -0.05 * lr).all(0)).any()
        if bool(marching):
            warn_user(f"{desc}: still moving one way (by more than lr / 20 a step) when the {n_steps} steps ran "
                      "out (a start far from the optimum, e.g. a prior left at a grid's end): the result is not the "
                      "optimum; raise n_steps or lr, or start init_prior_prec nearer", RuntimeWarning)
    return value


_MARCH = 10  # adam's convergence check: the last steps looked at
