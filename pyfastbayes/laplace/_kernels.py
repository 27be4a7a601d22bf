"""Kernel algebra on the per-example Jacobian parts of Laplace's GLM predictive (a block's Jacobian
of example n, output c: 'factored' U[c, n] (x) V[n], 'matrix' M[c, n] or 'rows' R[c, n]), shared by
the linearised-network GPs (:mod:`.functional`'s FunctionalLaplace, :mod:`.ella`'s ELLA): kernels
J_a J_b^T, J d and J^T w without forming a Jacobian tensor."""
from __future__ import annotations

import torch
from torch import Tensor


def gp_pred_type(pred_type, nn_too: bool) -> str:
    """pred_type checked: 'gp' or 'glm' (the same GP predictive), and 'nn' where ``nn_too``."""
    allowed = ("gp", "glm", "nn") if nn_too else ("gp", "glm")
    if pred_type not in allowed:
        hint = "" if nn_too else " (the network averaged over weight draws: predict(x))"
        raise ValueError(f"pred_type must be one of {allowed} for the functional (GP) Laplace, got {pred_type!r}{hint}")
    return pred_type


def part_bytes(chunks: list) -> int:
    """The bytes of the Jacobian parts of chunks (each a list of (sel, part))."""
    return sum(t.numel() * t.element_size() for parts in chunks for _, part in parts for t in part[1:])


def cast(part, dtype):
    """A part with its tensors in ``dtype`` (the part itself when None or already so)."""
    if dtype is None or part[1].dtype == dtype:
        return part
    return (part[0],) + tuple(t.to(dtype) if torch.is_tensor(t) else t for t in part[1:])


def dense(part) -> Tensor:
    """A part's Jacobian rows [C, n, k] (k = the block's entries in its flat order)."""
    if part[0] == "factored":
        U, V = part[1], part[2]
        return (U[..., :, None] * V[None, :, None, :]).reshape(U.shape[0], U.shape[1], -1)
    return part[1].reshape(part[1].shape[0], part[1].shape[1], -1)


def kernel(pa: list, pb: list, dtype=None) -> Tensor:
    """J_a J_b^T [n C, m C] (rows n * C + c) summed over the blocks (in ``dtype``, default the
    parts'). Accumulated in the layout [C, n, C', m] (a factored block's U_a U_b^T is one GEMM there,
    times V_a V_b^T in place) and permuted once at the end."""
    acc = None
    for (_, a), (_, b) in zip(pa, pb):
        a, b = cast(a, dtype), cast(b, dtype)
        if a[0] == b[0] == "factored":
            C, n, m = a[1].shape[0], a[1].shape[1], b[1].shape[1]
            t = (a[1].reshape(C * n, -1) @ b[1].reshape(b[1].shape[0] * m, -1).t()).view(C, n, -1, m)
            t.mul_((a[2] @ b[2].t())[None, :, None, :])
        else:
            t = torch.einsum("cnk,dmk->cndm", dense(a), dense(b))
        acc = t if acc is None else acc.add_(t)
    C, n, D, m = acc.shape
    return acc.permute(1, 0, 3, 2).reshape(n * C, m * D)


def gram(chunks, n: int, C: int, dtype, device) -> Tensor:
    """J J^T [n C, n C] of n rows in ``dtype``: ``chunks()`` yields (rows slice, parts) over them
    (called again for every outer chunk, so parts may be recomputed); each pair once, mirrored."""
    K = torch.zeros(n * C, n * C, dtype=dtype, device=device)
    for ri, pi in chunks():
        for rj, pj in chunks():
            if rj.start < ri.start:
                continue
            blk = kernel(pi, pj, dtype)
            K[ri.start * C:ri.stop * C, rj.start * C:rj.stop * C] = blk
            K[rj.start * C:rj.stop * C, ri.start * C:ri.stop * C] = blk.t()
    return K


def kernel_same(pa: list, pb: list, dtype=None) -> Tensor:
    """<J_a[c, n], J_b[c, m]> [C, n, m] summed over the blocks: each output's own kernel (the
    independent outputs' GPs), without the cross-output entries (in ``dtype``)."""
    def one(a, b):
        a, b = cast(a, dtype), cast(b, dtype)
        if a[0] == b[0] == "factored":
            return torch.einsum("cnp,cmp->cnm", a[1], b[1]) * (a[2] @ b[2].t())
        return torch.einsum("cnk,cmk->cnm", dense(a), dense(b))
    return sum(one(a, b) for (_, a), (_, b) in zip(pa, pb))


def self_same(parts: list, dtype=None) -> Tensor:
    """Each row's own kernel per output |J_c(x_n)|^2 [n, C] (in ``dtype``)."""
    def one(p):
        p = cast(p, dtype)
        if p[0] == "factored":
            return torch.einsum("cnp,cnp->nc", p[1], p[1]) * p[2].square().sum(1)[:, None]
        return dense(p).square().sum(-1).t()
    return sum(one(p) for _, p in parts)


def self_kernel(parts: list, dtype=None) -> Tensor:
    """Each row's own C x C kernel J_n J_n^T [n, C, C] (in ``dtype``)."""
    def one(p):
        p = cast(p, dtype)
        if p[0] == "factored":
            return torch.einsum("cnp,dnp->ncd", p[1], p[1]) * p[2].square().sum(1)[:, None, None]
        Jd = dense(p)
        return torch.einsum("cnk,dnk->ncd", Jd, Jd)
    return sum(one(p) for _, p in parts)


def jvp(parts: list, d: Tensor, cols: dict | None = None) -> Tensor:
    """J d [k, n, C] for k flat parameter vectors d [k, P] (positions: each block's ``sel``), in
    d's dtype. ``cols``: a dict the caller keeps with d (and drops with it), where each block's
    columns of d, gathered once, are kept for the next calls (keyed by the block's ``sel`` tensor
    itself: a tensor hashes by identity, and the key keeps it alive)."""
    def one(sel, p):
        p = cast(p, d.dtype)
        ds = None if cols is None else cols.get(sel)
        if ds is None:
            ds = d[:, sel]  # [k, p, q] or [k, numel]
            if cols is not None:
                cols[sel] = ds
        if p[0] == "factored":  # (D_k V^T first: k p q n + C n p k multiply-adds, never [C, n, k, q])
            return torch.einsum("cnp,kpn->knc", p[1], ds @ p[2].t())
        return torch.einsum("cnj,kj->knc", dense(p), ds.reshape(ds.shape[0], -1))
    return sum(one(sel, p) for sel, p in parts)


def vjp_(parts: list, w: Tensor, out: Tensor) -> None:
    """out [k, P] += J^T w for weights w [k, n, C] of the rows' outputs (in w's dtype)."""
    for sel, p in parts:
        p = cast(p, w.dtype)
        if p[0] == "factored":  # (U^T w first: [k, p, n], then times V)
            t = torch.einsum("cnp,knc->kpn", p[1], w) @ p[2]
        else:
            t = torch.einsum("cnj,knc->kj", dense(p), w)
        out[:, sel.reshape(-1)] += t.reshape(t.shape[0], -1).to(out.dtype)
