"""Spectral density of a curvature operator by stochastic Lanczos quadrature (SLQ), and its plot.

Ubaru, Chen & Saad, "Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature" (SIAM J.
Matrix Anal. Appl., 2017); the Hessian spectra of Ghorbani, Krishnan & Xiao (2019) and PyHessian
(Yao et al., 2020) are drawn this way. For each probe v = z / ||z|| (z Rademacher), m Lanczos steps
from v give a tridiagonal T_m whose eigenpairs (theta_i, s_i) are an m-point Gauss quadrature of the
spectral measure of A seen from v: v^T f(A) v ~ sum_i s_i[0]^2 f(theta_i), exact for polynomials of
degree <= 2m - 1. Averaged over the probes, the nodes theta_i with weights s_i[0]^2 / n_probes
approximate the eigenvalue density of A: sum_i w_i f(theta_i) ~ tr(f(A)) / P (the weights sum to 1).

Probes run together: ``block`` independent Lanczos recurrences share each product ``op @ V``
(V [P, block]), so n_steps data passes serve a whole block of probes. Every recurrence keeps its
basis ([n_steps, P, block] numbers) and is reorthogonalised against it in full, twice per step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from ..calibration._checks import check_int
from .._warnings import warn_user
from ..optim._checks import Interval, check_number
from .operator import LinearOperator, rademacher, shared_generator
from .spectral import (BREAKDOWN, _apply, _as_operator, _check_progress, _not_finite, _progress,
                       _work_dtype)

__all__ = ["spectral_density", "SpectralDensity", "plot_spectral_density"]


@dataclasses.dataclass
class SpectralDensity:
    """The result of :func:`spectral_density`: SLQ nodes and weights (float64, CPU).

    nodes [M]: Ritz values of all probes (M <= n_probes * n_steps: a probe whose Krylov space closes
    early has fewer). weights [M]: first components squared of the Ritz vectors / n_probes (sum 1).
    probe [M]: the probe each node comes from. P: the operator's size.
    """
    nodes: Tensor
    weights: Tensor
    probe: Tensor
    P: int
    n_probes: int
    n_steps: int

    def integrate(self, f: Callable[[Tensor], Tensor]) -> float:
        """sum_i w_i f(lambda_i), the estimate of tr(f(A)) / P (f maps a float64 tensor elementwise);
        e.g. ``P * d.integrate(lambda x: x)`` estimates the trace."""
        if not callable(f):
            raise TypeError(f"f must be a function of a tensor (e.g. lambda x: x ** 2), got {type(f).__name__}")
        values = f(self.nodes)
        if not torch.is_tensor(values) or values.shape != self.nodes.shape:
            raise ValueError(f"f must map the nodes [M] elementwise to a tensor [M] (e.g. lambda x: x ** 2), got "
                             f"{tuple(values.shape) if torch.is_tensor(values) else type(values).__name__}")
        return float((self.weights * values).sum())

    def default_sigma(self) -> float:
        """The default kernel width: 1% of the spread of the nodes (of max(|node|, 1) when they coincide)."""
        spread = float(self.nodes.max() - self.nodes.min())
        return 0.01 * (spread if spread > 0 else max(float(self.nodes.abs().max()), 1.0))

    def density(self, grid: Tensor | None = None, sigma: float | None = None,
                n_grid: int = 1000) -> tuple[Tensor, Tensor]:
        """The smoothed density phi(t) = sum_i w_i N(t; lambda_i, sigma^2) on a grid.

        grid: points t [G] (default: ``n_grid`` points from min(nodes) - 5 sigma to max(nodes) + 5 sigma).
        sigma: the Gaussian kernel's standard deviation (> 0; default :meth:`default_sigma`).
        Returns (grid [G], density [G]), float64 on the CPU; the density integrates to 1 on a grid
        whose spacing is below sigma (the default grid warns, RuntimeWarning, when a small sigma
        makes its spacing exceed sigma / 2: the curve would alias the kernels).
        """
        sigma = self.default_sigma() if sigma is None else _check_sigma(sigma)
        if grid is None:
            n_grid = check_int(n_grid, "n_grid", 2)
            lo, hi = float(self.nodes.min()) - 5 * sigma, float(self.nodes.max()) + 5 * sigma
            if (hi - lo) / (n_grid - 1) > sigma / 2:
                need = math.ceil(2 * (hi - lo) / sigma) + 1
                warn_user(f"density: the grid's spacing {(hi - lo) / (n_grid - 1):.3g} exceeds sigma / 2 = {sigma / 2:.3g}, "
                          f"so the curve aliases the kernels (its peaks and its integral are off); pass "
                          f"n_grid >= {need} or a larger sigma", RuntimeWarning)
            grid = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
        elif not torch.is_tensor(grid) or grid.dim() != 1:
            raise ValueError(f"grid must be a 1-d tensor of points, got "
                             f"{tuple(grid.shape) if torch.is_tensor(grid) else type(grid).__name__}")
        else:
            grid = grid.to("cpu", torch.float64)
        values = torch.zeros_like(grid)
        for j in range(0, grid.numel(), 4096):  # [4096, M] kernel values at a time
            t = grid[j:j + 4096, None]
            values[j:j + 4096] = (self.weights * torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2)).sum(1)
        return grid, values / (sigma * math.sqrt(2 * math.pi))


def _check_sigma(sigma) -> float:
    """The kernel width as a float > 0 (Python or NumPy real), else TypeError / ValueError."""
    return check_number("sigma (the kernel width, in eigenvalue units)", sigma, Interval())


def _lanczos_probes(op: LinearOperator, V: Tensor, m: int, work: torch.dtype, bar) -> list[tuple[Tensor, Tensor]]:
    """m Lanczos steps from each unit column of V [P, n] at once (independent recurrences, one
    ``op @ [P, n]`` per step), each fully reorthogonalised (two passes) against its own basis.

    Returns, per column, (alpha [L], beta [L - 1]) of its tridiagonal T (float64, CPU); L < m when
    the recurrence found an invariant subspace (then the quadrature of that probe is exact).
    """
    P, n = V.shape
    eps = torch.finfo(work).eps
    basis = torch.empty(m, P, n, dtype=work, device=V.device)
    alphas = torch.zeros(m, n, dtype=torch.float64)
    betas = torch.zeros(m, n, dtype=torch.float64)
    length = [m] * n
    active = torch.ones(n, dtype=torch.bool, device=V.device)
    anorm = torch.zeros(n, dtype=work, device=V.device)
    q, q_prev, beta_prev = V, torch.zeros_like(V), torch.zeros(n, dtype=work, device=V.device)
    for j in range(m):
        basis[j] = q
        w = _apply(op, q, work)
        bar.update(1)
        anorm = torch.maximum(anorm, w.norm(dim=0))
        a = (q * w).sum(0)
        alphas[j] = a.to("cpu", torch.float64)
        if not bool(torch.isfinite(alphas[j]).all()):  # on the host already: no extra sync
            raise _not_finite("spectral_density", j + 1)  # (eigh of a NaN T fails with an obscure error)
        if j == m - 1:
            break
        w = w - q * a - q_prev * beta_prev
        Bj = basis[:j + 1]  # [j+1, P, n]: each column against its own basis
        for _ in range(2):
            w = w - torch.einsum("jpi,ji->pi", Bj, torch.einsum("jpi,pi->ji", Bj, w))
        b = w.norm(dim=0)
        broke = active & (b <= BREAKDOWN * eps * anorm)
        for i in torch.nonzero(broke.cpu()).flatten().tolist():
            length[i] = j + 1
        active = active & ~broke
        b = torch.where(active, b, torch.zeros_like(b))
        betas[j] = b.to("cpu", torch.float64)
        q_prev, beta_prev = q, b
        q = torch.where(active, w / torch.where(active, b, torch.ones_like(b)), torch.zeros_like(w))
        if not bool(active.any()):
            bar.update(m - 1 - j)
            break
    return [(alphas[:length[i], i], betas[:length[i] - 1, i]) for i in range(n)]


def spectral_density(op, n_probes: int = 10, n_steps: int = 50, generator: torch.Generator | None = None,
                     block: int | None = None, progress: bool | None = False) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator A [P, P] by stochastic Lanczos quadrature.

    Args:
        op: a :class:`LinearOperator` or a symmetric floating-point tensor [P, P].
        n_probes: the number of Rademacher start vectors (>= 1).
        n_steps: Lanczos steps (products) per probe (>= 1; capped at P, where the quadrature of each
            probe is exact).
        generator: the probes are drawn from it, on its device (CPU without one).
        block: probes run together, sharing each ``op @ V`` (default: all n_probes); memory
            block * n_steps * P numbers for the bases.
        progress: a tqdm bar over the products (None: tqdm's choice).

    Returns:
        :class:`SpectralDensity` with nodes [M], weights [M] (sum 1), probe [M] (float64/int64, CPU);
        ``.density(sigma=...)`` smooths it on a grid, ``.integrate(f)`` estimates tr(f(A)) / P, and
        :func:`plot_spectral_density` draws it.
    """
    op = _as_operator(op)
    n = check_int(n_probes, "n_probes", 1)
    steps = check_int(n_steps, "n_steps", 1)
    block = n if block is None else check_int(block, "block", 1)
    generator = shared_generator(op, generator)
    _check_progress(progress)
    P = op.shape[0]
    m = min(steps, P)
    work = _work_dtype(op.dtype)
    nodes, weights, probe = [], [], []
    n_blocks = -(-n // block)
    with _progress(progress, m * n_blocks, "SLQ") as bar:
        for j0 in range(0, n, block):
            V = rademacher(P, min(block, n - j0), work, op.device, generator) / math.sqrt(P)
            for i, (alpha, beta) in enumerate(_lanczos_probes(op, V, m, work, bar)):
                theta, S = torch.linalg.eigh(torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1))
                nodes.append(theta)
                weights.append(S[0] ** 2 / n)
                probe.append(torch.full_like(theta, j0 + i, dtype=torch.int64))
    return SpectralDensity(torch.cat(nodes), torch.cat(weights), torch.cat(probe), P, n, m)


def plot_spectral_density(result: SpectralDensity, ax=None, log: bool = True, sigma: float | None = None,
                          n_grid: int = 1000, **line_kwargs):
    """Plot the smoothed spectral density of a :func:`spectral_density` result (PyHessian style).

    ax: a matplotlib Axes (default: a new figure). log: logarithmic density axis (values below
    1e-12 of the peak are drawn at that floor so the curve stays connected). sigma, n_grid: as in
    :meth:`SpectralDensity.density`. line_kwargs go to ``ax.plot``. Returns the Axes (its figure
    is ``ax.figure``); never calls ``show()``.
    """
    if not isinstance(result, SpectralDensity):
        raise TypeError(f"result must be the SpectralDensity that spectral_density() returns, got "
                        f"{type(result).__name__}")
    if not isinstance(log, bool):
        raise TypeError(f"log must be True or False, got {log!r}")
    import matplotlib.pyplot as plt

    grid, values = result.density(sigma=sigma, n_grid=n_grid)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    if log:
        floor = 1e-12 * float(values.max()) if float(values.max()) > 0 else 1e-300
        values = values.clamp_min(floor)
        ax.set_yscale("log")
    ax.plot(grid.numpy(), values.numpy(), **line_kwargs)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"spectral density (SLQ, {result.n_probes} probes x {result.n_steps} steps)")
    return ax
