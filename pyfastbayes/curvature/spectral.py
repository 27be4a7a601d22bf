"""Extreme eigenpairs of a curvature operator by Lanczos with full reorthogonalisation.

:func:`eigenvalues` works on any :class:`~pyfastbayes.curvature.operator.LinearOperator` (or a
square symmetric tensor) and only applies it: ``op @ Q_j`` for one vector per step
(``method='lanczos'``) or for a block of b vectors per step (``method='block_lanczos'``: one pass
over the data per block for the model operators, and eigenvalues of multiplicity up to b).

The algorithm (Golub & Van Loan, "Matrix Computations", 4th ed., sections 10.1 and 10.3):
an orthonormal Krylov basis Q is built block by block from a random start block; every new block
is orthogonalised against the whole basis twice (classical Gram-Schmidt, "twice is enough"), so
the projected matrix T = Q^T A Q is block tridiagonal to working precision and its eigenpairs
(``torch.linalg.eigh`` of the small T) give the Ritz pairs. A Ritz pair (theta, y = Q s) has the
residual ||A y - theta y|| = ||B s_last|| (B: the coupling of the last block to the next one,
s_last: the last block's rows of s), which is the convergence test. When a new vector falls into
the span of the basis (an invariant subspace: breakdown) it is replaced by a random vector
orthogonal to the basis, so the run continues in the rest of the space (and finds repeated
eigenvalues); once the basis spans all P dimensions the Ritz pairs are the exact eigenpairs.

The private helpers here (operator coercion, argument checks, random starts, progress bars) are
shared by :mod:`.trace` and :mod:`.density`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..calibration._checks import check_int
from ..optim._checks import Interval, check_number
from .._warnings import warn_user
from .operator import DenseOperator, LinearOperator, _check_generator, shared_generator  # noqa: F401 (_check_generator re-exported)

__all__ = ["eigenvalues"]

WHICH = ("largest", "smallest", "magnitude")
METHODS = ("lanczos", "block_lanczos")
# A new basis vector whose norm after reorthogonalisation is below BREAKDOWN * eps * ||A|| lies in
# the span of the basis to working precision (an invariant subspace was found).
BREAKDOWN = 100.0


# ---- shared helpers (also used by trace.py and density.py) -------------------------------------------
def _as_operator(op, name: str = "op") -> LinearOperator:
    """``op`` as a LinearOperator: itself, or a square symmetric floating-point tensor [P, P] wrapped
    in a DenseOperator."""
    if isinstance(op, LinearOperator):
        return op
    if torch.is_tensor(op):
        if not op.is_floating_point():
            raise TypeError(f"{name} must be a LinearOperator or a floating-point matrix [P, P], got a {op.dtype} "
                            f"tensor; convert it with {name}.double()")
        if op.dim() != 2 or op.shape[0] != op.shape[1] or op.shape[0] == 0:
            raise ValueError(f"{name} must be a LinearOperator or a square matrix [P, P] with P >= 1, got shape "
                             f"{tuple(op.shape)}")
        return DenseOperator(op, name)  # which checks that the matrix is finite and symmetric
    raise TypeError(f"{name} must be a pyfastbayes.curvature.LinearOperator or a square tensor [P, P], "
                    f"got {type(op).__name__}")


def _check_progress(progress) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (tqdm's automatic choice), got {progress!r}")


def _progress(progress: bool | None, total: int, desc: str):
    """A tqdm bar: shown for True, hidden for False, tqdm's choice (shown on a terminal) for None."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None if progress is None else not progress)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the bookkeeping (basis, projections): float64 for float64 operators, float32
    otherwise (half-precision Lanczos vectors lose orthogonality at once)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply(op: LinearOperator, X: Tensor, work: torch.dtype) -> Tensor:
    """op @ X for X [P, k] in the working dtype: the product in the operator's dtype, back in ``work``."""
    return (op @ X.to(op.dtype)).to(work)


def _randn(P: int, k: int, dtype: torch.dtype, device, generator: torch.Generator | None) -> Tensor:
    """[P, k] standard normals, drawn on the generator's device (CPU without one, as
    :func:`~pyfastbayes.curvature.operator.rademacher`) so a seed gives the same numbers everywhere."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(k, P, generator=generator, device=gen_device, dtype=dtype).mT  # column by column
    return z.to(device=device, memory_format=torch.contiguous_format)


def _cgs2(B: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """W [P, c] minus its projection on the orthonormal columns of B [P, n], done twice (classical
    Gram-Schmidt, "twice is enough"); returns (W orthogonalised, the coefficients B^T W [n, c])."""
    H = B.mT @ W
    W = W - B @ H
    H2 = B.mT @ W
    return W - B @ H2, H + H2


# ---- block Lanczos ---------------------------------------------------------------------------------------
def _extend(Q: Tensor, n: int, W: Tensor, thr: float, generator, restart: bool) -> tuple[int, Tensor, bool]:
    """Orthonormalise the columns of W [P, c] against the basis Q[:, :n] and each other, writing the
    new basis vectors to Q[:, n:n_new].

    Returns (n_new, R [n_new - n, c], restarted) with W = Q[:, :n] H + Q[:, n:n_new] R (+ dropped
    parts of norm <= thr): R is the coupling block of the block tridiagonal T. A column that falls into the span
    (norm <= thr after orthogonalisation: breakdown) is replaced, when ``restart`` and the basis
    does not span the space yet, by a random unit vector orthogonal to the basis (its row of R is
    zero); else it adds nothing. Q has room for all c new columns (the caller sizes it).
    """
    P, cap = Q.shape
    W, _ = _cgs2(Q[:, :n], W)  # against the old basis, as a block: two passes over Q
    c = W.shape[1]
    R = torch.zeros(c, c, dtype=W.dtype, device=W.device)
    m = n
    restarted = False
    for i in range(c):
        w = W[:, i:i + 1]
        norm_in = float(torch.linalg.vector_norm(w))
        if m > n:  # against the new columns of this block
            w, h = _cgs2(Q[:, n:m], w)
            R[:m - n, i] = h[:, 0]
        r = float(torch.linalg.vector_norm(w))
        if m > n and r < 0.5 * norm_in:
            # cancellation inside the block: what is left may have lost orthogonality to the old
            # basis (errors of size eps * norm_in), so one more two-pass sweep against all of it
            w, h = _cgs2(Q[:, :m], w)
            R[:m - n, i] += h[n:m, 0]
            r = float(torch.linalg.vector_norm(w))
        if m >= cap:
            continue  # the basis spans the whole space: nothing can be added
        if r > thr:
            Q[:, m] = w[:, 0] / r
            R[m - n, i] = r
            m += 1
        elif restart and m < P:
            Q[:, m] = _random_orthogonal(Q[:, :m], generator)
            m += 1
            restarted = True
    return m, R[:m - n], restarted


def _extremeness(theta: Tensor, which: str) -> Tensor:
    """How far along the wanted end of the spectrum each value lies (larger: wanted sooner)."""
    return theta if which == "largest" else -theta if which == "smallest" else theta.abs()


def _random_orthogonal(B: Tensor, generator) -> Tensor:
    """A random unit vector [P] orthogonal to the orthonormal columns of B [P, n] (n < P)."""
    P, n = B.shape
    for _ in range(3):
        z = _randn(P, 1, B.dtype, B.device, generator)
        z, _ = _cgs2(B, z)
        z, _ = _cgs2(B, z)  # z's norm may have dropped a lot: sweep again to keep it orthogonal
        r = float(torch.linalg.vector_norm(z))
        if r > 0:
            return z[:, 0] / r
    raise RuntimeError(f"could not draw a vector orthogonal to a basis of {n} vectors in dimension {P}")


def _not_finite(what: str, n_products: int) -> RuntimeError:
    """The error for an operator product with NaN or inf entries (the model operators give them for
    NaN/inf weights or data, or a loss that overflows)."""
    return RuntimeError(f"{what}: a product of the operator with a finite vector is not finite (NaN or inf) after "
                        f"{n_products} products; check the model's parameters and the data for NaN/inf (e.g. "
                        "all(p.isfinite().all() for p in model.parameters())) and that the loss is finite there")


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted values among the ascending Ritz values ``theta``."""
    e = theta.shape[0]
    if which == "largest":
        return torch.arange(e - k, e)
    if which == "smallest":
        return torch.arange(0, k)
    return torch.topk(theta.abs(), k).indices


def eigenvalues(op, k: int = 10, which: str = "largest", method: str = "lanczos", n_iter: int | None = None,
                tol: float | None = None, block: int | None = None, generator: torch.Generator | None = None,
                progress: bool | None = False) -> tuple[Tensor, Tensor]:
    """The k extreme eigenpairs of a symmetric operator A [P, P] by Lanczos with full
    reorthogonalisation.

    Args:
        op: a :class:`LinearOperator` or a symmetric floating-point tensor [P, P].
        k: how many eigenpairs, 1 <= k <= P.
        which: 'largest' (algebraically largest), 'smallest' (algebraically smallest, e.g. the most
            negative Hessian directions) or 'magnitude' (largest |lambda|).
        method: 'lanczos' (one product ``op @ v`` per step) or 'block_lanczos' (``op @ V`` on a
            block of ``block`` vectors per step: one data pass per block for the model operators;
            finds eigenvalues of multiplicity up to ``block``).
        n_iter: the largest Krylov dimension (number of operator-vector products), k <= n_iter;
            default min(P, max(2k + 20, 50)) for 'lanczos', min(P, max(2k + 20, 50, 20 * block))
            for 'block_lanczos' (rounded up to whole blocks). A given n_iter >= P runs P products
            and is exact (the Krylov space is the whole space; no early stop).
        tol: stop once every wanted Ritz pair has ||A y - theta y|| <= tol * max |theta| (tested
            from min(n_iter, 2k) products on; after a breakdown also no further copy of a value
            may be able to enter the wanted ones, see below); default sqrt(eps) of the working
            dtype (1.5e-8 in float64, 3.5e-4 otherwise); 0 runs all n_iter products without a
            warning.
        block: the block size b of 'block_lanczos' (default min(k, 8)); only for that method.
        generator: the random start vectors (and the restarts after a breakdown) come from it.
        progress: a tqdm bar over the products (None: tqdm's choice).

    Returns:
        (eigenvalues [k], eigenvectors [P, k]) sorted by descending eigenvalue, in the operator's
        dtype and on its device; column i is the unit eigenvector of eigenvalue i. The bookkeeping
        runs in float64 for float64 operators, float32 otherwise. Warns (RuntimeWarning) when the
        wanted pairs have not converged after n_iter products (tol > 0).

    Like every Krylov method it can miss an eigenvalue whose eigenvector is (numerically)
    orthogonal to the Krylov space. A repeated eigenvalue makes the space invariant (a
    breakdown) before its other copies are reached; the run then restarts in the rest of the space
    and does not stop until no further copy could change the wanted values (or warns when n_iter
    runs out first). Without a breakdown (many distinct eigenvalues beside the repeated one) the
    copies stay unseen: 'block_lanczos' with block >= the multiplicity finds them.
    """
    op = _as_operator(op)
    P = op.shape[0]
    k = check_int(k, "k", 1)
    if k > P:
        raise ValueError(f"k = {k} eigenpairs asked of a {P} x {P} operator; k must be <= P")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lanczos":
        if block not in (None, 1):
            raise ValueError(f"block = {block!r} is for method='block_lanczos'; method='lanczos' uses one vector")
        b = 1
    else:
        b = min(k, 8) if block is None else check_int(block, "block", 1)
    b = min(b, P)
    if n_iter is None:
        m = min(P, max(2 * k + 20, 50, 20 * b if method == "block_lanczos" else 0))
    else:
        m = check_int(n_iter, "n_iter", 1)
        if m < k:
            raise ValueError(f"n_iter = {m} is smaller than k = {k}: Lanczos needs at least k products")
        m = min(m, P)
    work = _work_dtype(op.dtype)
    if tol is None:
        tol = math.sqrt(torch.finfo(work).eps)
    else:
        tol = check_number("tol", tol, Interval(0.0, math.inf, True))
    generator = shared_generator(op, generator)
    _check_progress(progress)

    eps = torch.finfo(work).eps
    device = op.device
    cap = min(P, m + b)  # the last step may add one block past m
    Q = torch.zeros(P, cap, dtype=work, device=device)
    T = torch.zeros(cap, cap, dtype=torch.float64)  # the block tridiagonal Q^T A Q, small: on the CPU
    X0 = _randn(P, b, work, device, generator)
    e, _, _ = _extend(Q, 0, X0, BREAKDOWN * eps * float(X0.norm(dim=0).max()), generator, restart=True)
    s, ps, anorm = 0, 0, 0.0
    R_prev = None  # coupling block of the previous block to the current one (device, work dtype)
    n_steps = -(-m // b)
    check_every = max(1, n_steps // 50)  # the small eigh per check stays negligible
    min_dim = min(m, 2 * k)
    # early stops only below P products with tol > 0 (n_iter >= P is exact, tol = 0 runs them all)
    early = tol > 0 and not (n_iter is not None and m >= P)
    seg = 0  # where the current Krylov segment (from the start block or the latest restart) begins
    closed_top = None  # most extreme Ritz value (for `which`) of the last segment that closed
    step = 0
    with _progress(progress, m, f"{method} ({which} {k})") as bar:
        while True:
            Qj = Q[:, s:e]
            W = _apply(op, Qj, work)
            bar.update(min(e, m) - min(s, m))
            wnorm = float(W.norm(dim=0).max())  # the one host read per step the recurrence needs anyway
            if not math.isfinite(wnorm):  # NaN would come back as the eigenvalue, or break eigh of T
                raise _not_finite("eigenvalues", e)
            anorm = max(anorm, wnorm)
            Aj = Qj.mT @ W
            Aj = (Aj + Aj.mT) / 2
            T[s:e, s:e] = Aj.to("cpu", torch.float64)
            W = W - Qj @ Aj  # the three-term recurrence; _extend's full sweep cleans up the rest
            if R_prev is not None:
                W = W - Q[:, ps:s] @ R_prev.mT
            e_new, R, restarted = _extend(Q, e, W, BREAKDOWN * eps * anorm, generator, restart=True)
            Rc = R.to("cpu", torch.float64)
            if (restarted and not bool(Rc.any())) or float(Rc.norm()) <= tol * anorm:
                # the segment closed (breakdown, or a coupling at the level of the products'
                # rounding, below the convergence test's): it spans an invariant subspace (to within
                # tol), its Ritz pairs are
                # exact (residual 0), and the rest of the space, explored from a random restart,
                # holds no eigenvalue other than the segment's (its random start saw every distinct
                # one of that part of the space), only further copies of them (e.g. of a repeated
                # eigenvalue). Those could still displace a wanted pair unless every wanted value
                # is at least as extreme as the segment's most extreme one: tested below.
                closed_top = float(_extremeness(torch.linalg.eigvalsh(T[seg:e, seg:e]), which).max())
                seg = e
            step += 1
            exhausted = e_new == e  # the basis spans all P dimensions
            done = e >= m or exhausted
            # convergence is tested from 2k basis vectors on: with e == k every Ritz value is
            # "wanted", and exact pairs of an invariant subspace would end the run before the
            # wanted part of the spectrum is reached (e.g. 4, 2, -1 of a rank-3 A before its zeros)
            if done or (early and e >= min_dim and step % check_every == 0):
                theta, S = torch.linalg.eigh(T[:e, :e])
                idx = _select(theta, k, which)
                residuals = (Rc @ S[s:e][:, idx]).norm(dim=0) if Rc.shape[0] else torch.zeros(k, dtype=torch.float64)
                atol = tol * float(theta.abs().max())
                copies_missing = closed_top is not None and e < P and not (
                    float(_extremeness(theta[idx], which).min()) >= closed_top - atol)
                converged = bool((residuals <= atol).all()) and not copies_missing
                if done or converged:
                    break
            T[e:e_new, s:e] = Rc
            T[s:e, e:e_new] = Rc.mT
            ps, s, e, R_prev = s, e, e_new, R
    if copies_missing and tol > 0:
        warn_user(f"eigenvalues: the Krylov space became invariant (a breakdown: a repeated eigenvalue or a "
                  f"low-rank operator) and the {e} products ran out before the rest of the space was explored: "
                  f"further copies of an eigenvalue among the {k} {which} may be missing; raise n_iter (n_iter "
                  f">= P is exact) or use method='block_lanczos' with block >= the multiplicity", RuntimeWarning)
    elif not converged and tol > 0 and early:
        warn_user(f"eigenvalues: the {k} {which} Ritz pairs have not converged after {e} products "
                  f"(largest residual {float(residuals.max()):.3g}, tol * max|theta| = "
                  f"{tol * float(theta.abs().max()):.3g}); raise n_iter", RuntimeWarning)
    order = torch.argsort(theta[idx], descending=True)
    idx = idx[order]
    vecs = Q[:, :e] @ S[:, idx].to(device=device, dtype=work)
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    return theta[idx].to(device=device, dtype=op.dtype), vecs.to(op.dtype)
