"""Posterior precisions P = s H + diag(delta) of the three structures, with what Laplace needs from
them: log-determinant, draws N(0, P^-1), quadratic forms d^T P d (``quad``: the posterior's log
density), J P^-1 J^T of explicit rows (``inv_quad``: the joint GLM predictive) and the GLM
functional variance J P^-1 J^T from factored Jacobian parts.

``s`` = 1 / (sigma^2 T) scales the likelihood curvature H; ``delta`` [P] is the prior precision
per covered parameter in selection order (``block.sel``), constant within a Kronecker block.
``logdet`` also takes the prior as given, [] (one value) or [n_blocks] (one per block): the
marginal-likelihood tuning evaluates it at every step, and a [P] vector built from a few values
(and its backward) cost it more than the log det itself. Everything is differentiable in s and
delta (marginal-likelihood tuning).

- :class:`KronPrecision`: per Kronecker block L (x) R = (Q_L diag(l) Q_L^T) (x) (Q_R diag(r) Q_R^T),
  the prior added exactly in the eigenbasis: eigenvalues s l_i r_j + delta (Immer et al. 2021), so
  log det, draws and inverse quadratic forms cost two small rotations per block.
- :class:`DiagPrecision`: s h + delta elementwise.
- :class:`FullPrecision`: Cholesky of s H + diag(delta).

GLM functional variance from Jacobian parts (see :meth:`pyfastbayes.laplace._layers.Layer.jacobians`):
for an unshared layer the Jacobian of output c is the rank-one U_c V^T, so
J_c Sigma J_d^T = sum_{i,j} (Q_L^T U_c)_i (Q_L^T U_d)_i (Q_R^T V)_j^2 / (s l_i r_j + delta): a
product of [N, q] by [q, p] and a C x C contraction per input, no [N, C, P] Jacobian.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .eigenbasis import eigh_many, psd_eigh
from .factors import KronCurvature, grads_shape, jacobian_rows
from .marglik import expand_prior

_CHUNK_ELEMENTS = 1 << 24


def _block_delta(delta: Tensor, b) -> Tensor:
    return delta[b.sel.reshape(-1)[0]]


def _per_parameter(delta: Tensor, blocks) -> Tensor:
    """A prior of shape [], [n_blocks] or [P] as what broadcasts against [P] (a [] stays [])."""
    P = sum(b.numel for b in blocks)
    return delta if delta.dim() == 0 or delta.numel() == P else expand_prior(delta, blocks, P)


class KronPrecision:
    """Eigenbasis of every Kronecker block of a :class:`KronCurvature` (module docstring)."""

    def __init__(self, curv: KronCurvature, eigh_method: str = "auto"):
        self.blocks = curv.blocks
        mats, where = [], []
        self.left, self.right, self.h = {}, {}, {}
        for i, b in enumerate(self.blocks):
            if b.kind == "diag":
                self.h[i] = curv.h[i]
                continue
            L, R = curv.factors(i)
            if b.left_diag:
                self.left[i] = (L.clamp_min(0), None)
            else:
                mats.append(L), where.append((i, "left"))
            mats.append(R), where.append((i, "right"))
        for (i, side), ev in zip(where, eigh_many(mats, eigh_method)):
            (self.left if side == "left" else self.right)[i] = ev
        self._flat: tuple[Tensor, Tensor, Tensor] | None = None

    def eigenvalues(self, i: int) -> Tensor:
        """l r^T [p, q] of Kronecker block i (the likelihood curvature's eigenvalues)."""
        return self.left[i][0].unsqueeze(1) * self.right[i][0].unsqueeze(0)

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """(every block's curvature eigenvalues l r^T (or diagonal h) flattened and concatenated
        [P] in float64, each entry's block [P], each entry's position in [P] whose prior it takes:
        a Kronecker block's first), computed once: log det P is then one expression for any prior.
        float64 because the gradient of a block's prior sums its entries' 1 / (s l r + delta) one
        after another in the backward of the gather (thousands of terms; fp32 lost 1e-3 of the
        tuned priors)."""
        if self._flat is None:
            ev, blk, pos = [], [], []
            for i, b in enumerate(self.blocks):
                e = (self.h[i] if b.kind == "diag" else self.eigenvalues(i)).reshape(-1)
                sel = b.sel.reshape(-1).to(e.device)
                ev.append(e)
                blk.append(torch.full_like(sel, i))
                pos.append(sel if b.kind == "diag" else sel[:1].expand(e.numel()))
            self._flat = (torch.cat(ev).double(), torch.cat(blk), torch.cat(pos))
        return self._flat

    def logdet(self, s: Tensor, delta: Tensor) -> Tensor:
        """log det P for delta [] (one prior), [n_blocks] (per block) or [P] (per parameter)."""
        ev, blk, pos = self.flat()
        d = delta.double()
        if d.numel() == 1:
            d = d.reshape(())
        elif d.numel() == len(self.blocks) and d.numel() != ev.numel():
            d = d.index_select(0, blk)
        else:
            d = d.index_select(0, pos)
        return torch.log(s * ev + d).sum().to(delta.dtype)

    def sample(self, n: int, s: Tensor, delta: Tensor, generator=None) -> Tensor:
        P = sum(b.numel for b in self.blocks)
        out = delta.new_zeros(n, P)
        for i, b in enumerate(self.blocks):
            if b.kind == "diag":
                z = torch.randn(n, b.numel, dtype=out.dtype, device=out.device, generator=generator)
                out[:, b.sel] = z / torch.sqrt(s * self.h[i] + delta[b.sel])
                continue
            z = torch.randn(n, b.p, b.q, dtype=out.dtype, device=out.device, generator=generator)
            z = z / torch.sqrt(s * self.eigenvalues(i) + _block_delta(delta, b))
            QL, QR = self.left[i][1], self.right[i][1]
            if QL is not None:
                z = QL @ z
            out[:, b.sel.reshape(-1)] = (z @ QR.t()).reshape(n, -1)
        return out

    def _eigen_rows(self, d: Tensor, s: Tensor, delta: Tensor):
        """Per block, rows d [n, P] in the block's eigenbasis (Q_L^T D Q_R; a diagonal block's own
        entries) [n, numel] and the eigenvalues of P there (s l_i r_j + delta; s h + delta) [numel]."""
        for i, b in enumerate(self.blocks):
            sel = b.sel.reshape(-1)
            if b.kind == "diag":
                yield d[:, sel], s * self.h[i] + delta[sel]
                continue
            z = d[:, sel].reshape(-1, b.p, b.q) @ self.right[i][1]
            QL = self.left[i][1]
            if QL is not None:
                z = QL.t() @ z
            yield z.reshape(d.shape[0], -1), (s * self.eigenvalues(i) + _block_delta(delta, b)).reshape(-1)

    def quad(self, d: Tensor, s: Tensor, delta: Tensor) -> Tensor:
        """d^T P d [n] for rows d [n, P]: the rows' squares in each block's eigenbasis weighted by
        its eigenvalues."""
        out = d.new_zeros(d.shape[0])
        for z, e in self._eigen_rows(d, s, delta):
            out += (z.square() * e).sum(1)
        return out

    def inv_quad(self, J: Tensor, s: Tensor, delta: Tensor) -> Tensor:
        """J P^-1 J^T [R, R] for explicit rows J [R, P] (the joint GLM predictive): per block the
        rows in its eigenbasis scaled by 1 / sqrt(eigenvalue), their Gram matrix."""
        out = J.new_zeros(J.shape[0], J.shape[0])
        for z, e in self._eigen_rows(J, s, delta):
            W = z / torch.sqrt(e)
            out.addmm_(W, W.t())
        return out

    def variance(self, s: Tensor, delta: Tensor) -> Tensor:
        """The marginal posterior variances diag(P^-1) [P]: per Kronecker block
        (Q_L o Q_L) diag-scaled (Q_R o Q_R)^T with the eigenvalues 1 / (s l_i r_j + delta)."""
        P = sum(b.numel for b in self.blocks)
        out = delta.new_zeros(P)
        for i, b in enumerate(self.blocks):
            if b.kind == "diag":
                out[b.sel.reshape(-1)] = 1.0 / (s * self.h[i] + delta[b.sel.reshape(-1)])
                continue
            var = 1.0 / (s * self.eigenvalues(i) + _block_delta(delta, b))  # [p, q]
            QL, QR = self.left[i][1], self.right[i][1]
            v = var @ QR.square().t()
            if QL is not None:
                v = QL.square() @ v
            out[b.sel.reshape(-1)] = v.reshape(-1).to(out.dtype)
        return out

    def functional_variance(self, parts, s: Tensor, delta: Tensor) -> Tensor:
        fvar = None
        for i, (b, part) in enumerate(parts):
            kind, *t = part
            if b.kind == "diag":
                term = _diag_term(part, 1.0 / (s * self.h[i] + delta[b.sel]))
            else:
                var = 1.0 / (s * self.eigenvalues(i) + _block_delta(delta, b))
                QL, QR = self.left[i][1], self.right[i][1]
                if kind == "factored":
                    U, V = t
                    Ut = U if QL is None else U @ QL
                    term = _factored_term(Ut, (V @ QR).square(), var)
                else:
                    M = t[0] @ QR
                    if QL is not None:
                        M = QL.t() @ M
                    term = torch.einsum("cnpq,dnpq,pq->ncd", M, M, var)
            fvar = term if fvar is None else fvar + term
        return fvar


def _factored_term(U: Tensor, V2: Tensor, var: Tensor) -> Tensor:
    """sum_{p,q} U[c,n,p] U[d,n,p] V2[n,q] var[p,q] -> [N, C, C] (U [C, N, p], V2 [N, q])."""
    w = V2 @ var.t()  # [N, p]
    return torch.einsum("cnp,dnp,np->ncd", U, U, w)


def _diag_term(part, var_flat: Tensor) -> Tensor:
    kind, *t = part
    if kind == "factored":
        U, V = t
        return _factored_term(U, V.square(), var_flat.view(U.shape[-1], V.shape[-1]))
    if kind == "matrix":
        M = t[0]
        return torch.einsum("cnpq,dnpq,pq->ncd", M, M, var_flat.view(M.shape[2], M.shape[3]))
    R = t[0]
    return torch.einsum("cnp,dnp,p->ncd", R, R, var_flat)


class DiagPrecision:
    """s h + delta elementwise, h the exact diagonal per block."""

    def __init__(self, curv):
        self.blocks = curv.blocks
        P = sum(b.numel for b in self.blocks)
        first = next(iter(curv.h.values()))
        self.h = first.new_zeros(P)
        for i, b in enumerate(self.blocks):
            self.h[b.sel.reshape(-1)] = curv.h[i]

    def logdet(self, s, delta):
        return torch.log(s * self.h + _per_parameter(delta, self.blocks)).sum()

    def sample(self, n, s, delta, generator=None):
        z = torch.randn(n, self.h.numel(), dtype=delta.dtype, device=delta.device, generator=generator)
        return z / torch.sqrt(s * self.h + delta)

    def variance(self, s, delta):
        return 1.0 / (s * self.h + delta)

    def quad(self, d, s, delta):
        return (d.square() * (s * self.h + delta)).sum(1)

    def inv_quad(self, J, s, delta):
        W = J / torch.sqrt(s * self.h + delta)
        return W @ W.t()

    def functional_variance(self, parts, s, delta):
        var = 1.0 / (s * self.h + delta)
        fvar = None
        for b, part in parts:
            term = _diag_term(part, var[b.sel.reshape(-1)])
            fvar = term if fvar is None else fvar + term
        return fvar


class FullPrecision:
    """Cholesky factor of s H + diag(delta); H's eigendecomposition where that fails (module docstring)."""

    def __init__(self, curv):
        self.blocks = curv.blocks
        self.H = curv.H
        self._eig: Tensor | None = None
        self._eigh: tuple[Tensor, Tensor] | None = None

    def _eigh_psd(self) -> tuple[Tensor, Tensor]:
        """H's eigenvalues clamped at 0 and eigenvectors (decomposed once)."""
        if self._eigh is None:
            lam, V = psd_eigh(self.H)
            self._eigh = (lam.clamp_min(0), V)
        return self._eigh

    def _chol(self, s, delta) -> Tensor:
        """Cholesky factor of s H + diag(delta). H (a GGN or Fisher) is positive semi-definite, but
        rounding can leave it eigenvalues just below 0 (float32: -1e-6 against a tiny prior): then
        s H + diag(delta) is rebuilt from H's eigenvalues clamped at 0, as :meth:`logdet` takes them."""
        L, info = torch.linalg.cholesky_ex(s * self.H + torch.diag(delta))
        return L if int(info) == 0 else self._clamped_chol(s, delta)

    def _clamped_chol(self, s, delta) -> Tensor:
        lam, V = self._eigh_psd()
        Pm = (V * (s * lam)) @ V.mT + torch.diag(delta)
        L, info = torch.linalg.cholesky_ex((Pm + Pm.mT) / 2)
        if int(info) != 0:
            raise RuntimeError(f"the posterior precision s H + diag(prior precision) is singular in {self.H.dtype} "
                               "(a prior precision too small against the curvature's scale): raise "
                               "prior_precision, or fit in float64")
        return L

    def _inverse_root(self, s, delta) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(L, None, None) with P = L L^T, or, where that Cholesky fails and the prior is one value,
        (None, V, d) with P^-1 = V diag(d) V^T from H's clamped eigenvalues: exact however badly
        P is conditioned (float32 with a tiny prior: condition numbers beyond 1e7)."""
        L, info = torch.linalg.cholesky_ex(s * self.H + torch.diag(delta))
        if int(info) == 0:
            return L, None, None
        if not delta.requires_grad and bool((delta == delta[0]).all()):
            lam, V = self._eigh_psd()
            return None, V, 1.0 / (s * lam + delta[0])
        return self._clamped_chol(s, delta), None, None

    def logdet(self, s, delta):
        if delta.numel() == 1 or (not delta.requires_grad
                                  and bool((delta == delta.reshape(-1)[0]).all())):
            # one prior precision: log det (s H + delta I) = sum log(s lambda_i + delta) from H's
            # eigenvalues, decomposed once (a Cholesky and its backward per tuning step otherwise).
            # Not for a per-block / per-weight prior being differentiated, even with equal values:
            # each entry's gradient is its own diagonal of the covariance, not the sum of them all
            if self._eig is None:
                self._eig = psd_eigh(self.H, eigenvectors=False).clamp_min(0)
            return torch.log(s * self._eig + delta.reshape(-1)[0]).sum()
        return 2 * torch.log(torch.diagonal(self._chol(s, _per_parameter(delta, self.blocks)))).sum()

    def sample(self, n, s, delta, generator=None):
        L, V, d = self._inverse_root(s, delta)
        z = torch.randn(self.H.shape[0], n, dtype=delta.dtype, device=delta.device, generator=generator)
        if L is None:
            return (V @ (d.sqrt()[:, None] * (V.mT @ z))).t()
        return torch.linalg.solve_triangular(L.t(), z, upper=True).t()

    def quad(self, d, s, delta):
        return s * ((d @ self.H) * d).sum(1) + (d.square() * delta).sum(1)

    def inv_quad(self, J, s, delta):
        L, V, d = self._inverse_root(s, delta)
        # J P^-1 J^T = W^T W with W = L^-1 J^T (or (J V diag(d)^(1/2))^T): a sum of squares
        W = torch.linalg.solve_triangular(L, J.t(), upper=False) if L is not None else (J @ V * d.sqrt()).t()
        return W.t() @ W

    def covariance(self, s, delta) -> Tensor:
        L, V, d = self._inverse_root(s, delta)
        return torch.cholesky_inverse(L) if L is not None else (V * d) @ V.mT

    def variance(self, s, delta):
        L, V, d = self._inverse_root(s, delta)
        if L is None:
            return V.square() @ d
        # diag(P^-1) = the squared column norms of L^-1 (rows of L^-T): no [P, P] inverse product
        Li = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
        return Li.square().sum(0)

    def functional_variance(self, parts, s, delta):
        L, V, d = self._inverse_root(s, delta)
        # Cholesky: J Sigma J^T with Sigma = P^-1; eigendecomposition: (J W)(J W)^T with W = V diag(d)^(1/2),
        # a sum of squares (J Sigma J^T would cancel to negative variances in float32 when cond(P) ~ 1e11)
        M = torch.cholesky_inverse(L) if L is not None else V * d.sqrt()
        m, N = grads_shape(parts)
        P = M.shape[0]
        step = max(1, _CHUNK_ELEMENTS // max(1, m * P))
        out = []
        for n0 in range(0, N, step):
            J = jacobian_rows(parts, P, M.dtype, slice(n0, n0 + step))  # [C, n, P]
            if L is not None:
                out.append(torch.einsum("cnp,pq,dnq->ncd", J, M, J))
            else:
                JW = torch.einsum("cnp,pk->cnk", J, M)
                out.append(torch.einsum("cnk,dnk->ncd", JW, JW))
        return torch.cat(out)


PRECISIONS = {"kron": KronPrecision, "diag": DiagPrecision, "full": FullPrecision}
