"""Spectral tools on LinearOperators: eigenvalues (Lanczos, block Lanczos), trace (Hutchinson,
Hutch++), spectral_density (stochastic Lanczos quadrature) and its plot.

Everything runs on DenseOperators of random symmetric float64 matrices with known spectra
(A = U diag(lambda) U^T, U a random orthogonal matrix), so every answer has an exact reference.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from pyfastbayes.curvature import (DenseOperator, LinearOperator, SpectralDensity, TraceEstimate, eigenvalues,
                                   plot_spectral_density, spectral_density, trace)
from pyfastbayes.curvature.operator import rademacher

from _helpers import needs_cuda, require

F64 = torch.float64
NEG = torch.tensor([-7.0, -3.0, -1.0, -0.3, -0.1], dtype=F64)


def spectrum_matrix(P: int, seed: int = 0, lam: torch.Tensor | None = None):
    """(A [P, P], its eigenvalues sorted descending): by default a decaying positive spectrum
    10 * 0.8^i (neighbours 20% apart: well separated at the top) and five negative eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    if lam is None:
        lam = torch.cat([10 * 0.8 ** torch.arange(P - 5, dtype=F64), NEG])
    U, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    A = (U * lam) @ U.mT
    return (A + A.mT) / 2, lam.sort(descending=True).values


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingOperator(LinearOperator):
    """A DenseOperator that records the width of every block it is applied to."""

    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.calls = A, []

    def _matmat(self, V):
        self.calls.append(V.shape[1])
        return self.A @ V


# ---- eigenvalues -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [50, 300])
@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_top_eigenpairs_match_eigvalsh(P, method):
    A, _ = spectrum_matrix(P)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        vals, vecs = eigenvalues(DenseOperator(A), k=5, method=method, generator=gen(1))
    assert vals.shape == (5,) and vecs.shape == (P, 5) and vals.dtype == F64 and vecs.dtype == F64
    torch.testing.assert_close(vals, ref, rtol=1e-8, atol=0)
    assert torch.all(vals[:-1] >= vals[1:])
    # A v = lambda v and orthonormal columns (default tol: residual <= sqrt(eps) * ||A|| = 1.5e-7)
    assert float((A @ vecs - vecs * vals).norm(dim=0).max()) < 1e-6
    torch.testing.assert_close(vecs.mT @ vecs, torch.eye(5, dtype=F64), rtol=0, atol=1e-10)


def test_block_and_single_vector_lanczos_agree():
    A, _ = spectrum_matrix(200, seed=3)
    v1, V1 = eigenvalues(A, k=6, method="lanczos", generator=gen(0))
    v2, V2 = eigenvalues(A, k=6, method="block_lanczos", block=3, generator=gen(0))
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=0)
    # the same eigenvectors up to sign
    assert float(((V1 * V2).sum(0).abs() - 1).abs().max()) < 1e-8


def test_block_lanczos_applies_whole_blocks():
    A, _ = spectrum_matrix(120)
    op = CountingOperator(A)
    eigenvalues(op, k=4, method="block_lanczos", block=4, generator=gen(0))
    assert op.calls and all(c == 4 for c in op.calls)
    op = CountingOperator(A)
    eigenvalues(op, k=4, method="lanczos", generator=gen(0), n_iter=30, tol=0.0)
    assert op.calls == [1] * 30  # tol = 0: exactly n_iter products


@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_smallest_and_magnitude(method):
    A, lam = spectrum_matrix(150, seed=2)
    vals, vecs = eigenvalues(A, k=3, which="smallest", method=method, generator=gen(4))
    torch.testing.assert_close(vals, torch.tensor([-1.0, -3.0, -7.0], dtype=F64), rtol=1e-8, atol=0)
    assert float((A @ vecs - vecs * vals).norm(dim=0).max()) < 1e-6
    vals, vecs = eigenvalues(A, k=4, which="magnitude", method=method, generator=gen(4))
    # |lambda| largest: 10, 8, -7, 6.4; returned by descending value
    torch.testing.assert_close(vals, torch.tensor([10.0, 8.0, 6.4, -7.0], dtype=F64), rtol=1e-8, atol=0)
    assert float((A @ vecs - vecs * vals).norm(dim=0).max()) < 1e-6


@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_small_P_is_exact(method):
    # n_iter > P: the Krylov basis spans the whole space, every eigenpair is exact
    A, lam = spectrum_matrix(20, seed=5)
    vals, vecs = eigenvalues(A, k=20, method=method, n_iter=100, generator=gen(0))
    torch.testing.assert_close(vals, lam, rtol=0, atol=1e-12)
    torch.testing.assert_close(vecs.mT @ A @ vecs, torch.diag(vals), rtol=0, atol=1e-12)
    # a plain tensor works as the operator
    vals2, _ = eigenvalues(A.clone(), k=3, which="smallest", method=method, generator=gen(0))
    torch.testing.assert_close(vals2, lam[-3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_breakdown_low_rank(method):
    # rank 3: the Krylov space of one start vector closes after 4 steps (invariant subspace); the
    # run restarts in the rest of the space and still returns exact pairs, zeros included
    lam = torch.cat([torch.tensor([4.0, 2.0, -1.0], dtype=F64), torch.zeros(57, dtype=F64)])
    A, _ = spectrum_matrix(60, seed=6, lam=lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals, vecs = eigenvalues(A, k=5, method=method, generator=gen(0))
    torch.testing.assert_close(vals[:2], torch.tensor([4.0, 2.0], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(vals[2:], torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    assert float((A @ vecs - vecs * vals).norm(dim=0).max()) < 1e-10
    torch.testing.assert_close(vecs.mT @ vecs, torch.eye(5, dtype=F64), rtol=0, atol=1e-10)
    # the zero operator: every product breaks down
    vals, vecs = eigenvalues(torch.zeros(10, 10, dtype=F64), k=3, method=method)
    assert torch.equal(vals, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(vecs.norm(dim=0), torch.ones(3, dtype=F64))


def test_block_lanczos_finds_a_repeated_eigenvalue():
    lam = torch.cat([torch.full((3,), 5.0, dtype=F64), 1.0 / torch.arange(1, 98, dtype=F64)])
    A, _ = spectrum_matrix(100, seed=7, lam=lam)
    vals, vecs = eigenvalues(A, k=4, method="block_lanczos", block=4, generator=gen(0))
    torch.testing.assert_close(vals, torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=F64), rtol=1e-10, atol=0)
    assert float((A @ vecs - vecs * vals).norm(dim=0).max()) < 1e-6


def test_float32_operator():
    A, lam = spectrum_matrix(100, seed=8)
    vals, vecs = eigenvalues(DenseOperator(A.float()), k=3, generator=gen(0))
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
    torch.testing.assert_close(vals.double(), lam[:3], rtol=1e-4, atol=0)


def test_not_converged_warns():
    # 12 products cannot resolve the 10 largest of a slowly decaying spectrum
    lam = 1.0 / torch.arange(1, 201, dtype=F64)
    A, _ = spectrum_matrix(200, seed=9, lam=lam)
    with pytest.warns(RuntimeWarning, match="not converged"):
        eigenvalues(A, k=10, n_iter=12, generator=gen(0))


def test_eigenvalues_reproducible_with_generator():
    A, _ = spectrum_matrix(80, seed=10)
    for method in ("lanczos", "block_lanczos"):
        a = eigenvalues(A, k=3, method=method, generator=gen(11), n_iter=12, tol=0.0)
        b = eigenvalues(A, k=3, method=method, generator=gen(11), n_iter=12, tol=0.0)
        c = eigenvalues(A, k=3, method=method, generator=gen(12), n_iter=12, tol=0.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])  # 12 products: not converged, so the start shows


def test_eigenvalues_progress_bar_runs():
    A, lam = spectrum_matrix(40)
    vals, _ = eigenvalues(A, k=2, progress=True, generator=gen(0))
    torch.testing.assert_close(vals, lam[:2], rtol=1e-8, atol=0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=0), ValueError, "k must be an int >= 1"),
    (dict(k=2.0), TypeError, "k must be an int, got float"),
    (dict(k=31), ValueError, "k must be <= P"),
    (dict(which="top"), ValueError, "which must be one of"),
    (dict(method="arnoldi"), ValueError, "method must be one of"),
    (dict(k=5, n_iter=4), ValueError, "n_iter = 4 is smaller than k = 5"),
    (dict(n_iter=0), ValueError, "n_iter must be an int >= 1"),
    (dict(block=4), ValueError, "block = 4 is for method='block_lanczos'"),
    (dict(method="block_lanczos", block=0), ValueError, "block must be an int >= 1"),
    (dict(tol=-1.0), ValueError, "tol must be finite and >= 0, got -1.0"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(progress="yes"), TypeError, "progress must be True, False or None"),
])
def test_eigenvalues_bad_arguments(kwargs, exc, match):
    A, _ = spectrum_matrix(30)
    with pytest.raises(exc, match=match):
        eigenvalues(A, **kwargs)


@pytest.mark.parametrize("fn", [eigenvalues, trace, spectral_density])
def test_bad_operators(fn):
    with pytest.raises(TypeError, match="op must be a pyfastbayes.curvature.LinearOperator or a square tensor"):
        fn([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"square matrix \[P, P\].*got shape \(3, 4\)"):
        fn(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="op must be symmetric"):
        fn(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.eye(3, dtype=torch.int64))


# ---- trace ---------------------------------------------------------------------------------------------------
def low_rank_dominated(P: int = 100, seed: int = 0):
    """A spectrum with 10 large eigenvalues 100 * 0.5^i over a small bulk U(0, 0.1): Hutch++'s
    sketch captures the large ones exactly, Hutchinson's variance is dominated by them."""
    g = torch.Generator().manual_seed(seed + 100)
    lam = torch.cat([100 * 0.5 ** torch.arange(10, dtype=F64), 0.1 * torch.rand(P - 10, generator=g, dtype=F64)])
    return spectrum_matrix(P, seed, lam)


def test_hutchinson_exact_on_a_diagonal_matrix():
    # z^T D z = sum_i D_ii z_i^2 = tr(D) for every Rademacher z
    D = torch.diag(torch.linspace(-2, 5, 40, dtype=F64))
    est = trace(D, n_probes=7, block=3, generator=gen(0))
    assert isinstance(est, TraceEstimate)
    assert est.estimate == pytest.approx(float(D.trace()), rel=1e-13)
    assert est.std_error == pytest.approx(0.0, abs=1e-12)
    value, error = est  # unpacks as (estimate, std_error)
    assert value == est.estimate and error == est.std_error


def test_hutchinson_single_probe_has_no_error_estimate():
    A, _ = spectrum_matrix(30)
    assert math.isnan(trace(A, n_probes=1, generator=gen(0)).std_error)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimators_unbiased(method):
    # 300 independent estimates: their mean is within 4 standard errors (std / sqrt(300)) of tr(A)
    A, lam = low_rank_dominated()
    op = DenseOperator(A)
    est = [trace(op, n_probes=30, method=method, block=8, generator=gen(s)) for s in range(300)]
    values = torch.tensor([e.estimate for e in est], dtype=F64)
    se = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - float(lam.sum())) < 4 * se
    # the reported standard error estimates the spread of one estimate (within 25% on average;
    # for Hutch++ the deflated part carries all the variance given the sketch, and the sketch
    # itself varies too, so only a loose bound there)
    reported = torch.tensor([e.std_error for e in est], dtype=F64).mean()
    ratio = float(reported) / float(values.std())
    assert 0.75 < ratio < 1.25 if method == "hutchinson" else 0.2 < ratio < 1.5


def test_hutchpp_lower_variance_than_hutchinson():
    # same budget of 30 products; 100 seeds each: Hutch++'s sketch removes the 10 large
    # eigenvalues that dominate Hutchinson's variance (about 100 times smaller here)
    A, _ = low_rank_dominated(seed=1)
    var = {}
    for method in ("hutchinson", "hutch++"):
        values = torch.tensor([trace(A, 30, method, generator=gen(s)).estimate for s in range(100)], dtype=F64)
        var[method] = float(values.var())
    assert var["hutch++"] < var["hutchinson"] / 10


def test_hutchpp_exact_when_the_sketch_spans_the_space():
    A, lam = spectrum_matrix(20, seed=4)
    op = CountingOperator(A)
    est = trace(op, n_probes=63, method="hutch++", block=16, generator=gen(0))  # sketch of 21 >= P columns
    assert est.estimate == pytest.approx(float(lam.sum()), rel=1e-10, abs=1e-10)
    assert est.std_error < 1e-10
    assert max(op.calls) <= 16


def test_trace_reproducible_and_float32():
    A, lam = low_rank_dominated()
    for method in ("hutchinson", "hutch++"):
        assert trace(A, 20, method, generator=gen(3)) == trace(A, 20, method, generator=gen(3))
        e32 = trace(DenseOperator(A.float()), 20, method, generator=gen(3))
        e64 = trace(A, 20, method, generator=gen(3))
        assert e32.estimate == pytest.approx(e64.estimate, rel=1e-4)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n_probes=0), ValueError, "n_probes must be an int >= 1"),
    (dict(method="hutch"), ValueError, "method must be one of"),
    (dict(method="hutch++", n_probes=2), ValueError, "needs n_probes >= 3"),
    (dict(block=0), ValueError, "block must be an int >= 1"),
    (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
])
def test_trace_bad_arguments(kwargs, exc, match):
    A, _ = spectrum_matrix(30)
    with pytest.raises(exc, match=match):
        trace(A, **kwargs)


# ---- spectral density (SLQ) -----------------------------------------------------------------------------
def probes(P: int, n: int, block: int, seed: int) -> torch.Tensor:
    """The Rademacher probes spectral_density draws for these arguments (same generator calls)."""
    g = gen(seed)
    return torch.cat([rademacher(P, min(block, n - j), F64, "cpu", g) for j in range(0, n, block)], 1)


@pytest.mark.parametrize("block", [None, 3])
def test_slq_is_gauss_quadrature_of_the_probes(block):
    # m Lanczos steps integrate polynomials of degree <= 2m - 1 exactly against each probe's
    # spectral measure: sum_i w_i lambda_i^j == mean over probes of z^T A^j z / P
    P, n, m = 120, 8, 20
    A, _ = spectrum_matrix(P, seed=11)
    d = spectral_density(DenseOperator(A), n_probes=n, n_steps=m, generator=gen(5), block=block)
    assert isinstance(d, SpectralDensity) and d.nodes.shape == d.weights.shape == d.probe.shape == (n * m,)
    assert d.integrate(lambda x: torch.ones_like(x)) == pytest.approx(1.0, abs=1e-13)  # j = 0: exact
    Z = probes(P, n, block or n, 5)
    for j in range(1, 6):
        direct = float((Z * (torch.linalg.matrix_power(A, j) @ Z)).sum(0).mean()) / P
        assert d.integrate(lambda x: x ** j) == pytest.approx(direct, rel=1e-10)


def test_slq_moments_estimate_normalised_traces():
    # E[z^T A^j z] / P = tr(A^j) / P: the mean over 200 probes is within 4 standard errors
    # (per-probe sums' std / sqrt(200)) for j = 1, 2
    P, n = 150, 200
    A, lam = spectrum_matrix(P, seed=12)
    d = spectral_density(A, n_probes=n, n_steps=10, generator=gen(6), block=50)
    for j in (1, 2):
        per_probe = torch.zeros(n, dtype=F64).index_add_(0, d.probe, d.weights * n * d.nodes ** j)
        se = float(per_probe.std()) / math.sqrt(n)
        assert abs(d.integrate(lambda x: x ** j) - float((lam ** j).mean())) < 4 * se


def test_slq_full_steps_recover_the_spectrum():
    A, lam = spectrum_matrix(60, seed=13)
    d = spectral_density(A, n_probes=1, n_steps=500, generator=gen(0))  # capped at P = 60 steps
    assert d.n_steps == 60
    torch.testing.assert_close(d.nodes.sort(descending=True).values, lam, rtol=0, atol=1e-10)


def test_slq_breakdown_identity():
    # every probe is an eigenvector of 2 I: one Lanczos step, one node at 2 with weight 1 / n
    d = spectral_density(2 * torch.eye(30, dtype=F64), n_probes=3, n_steps=10, generator=gen(0))
    torch.testing.assert_close(d.nodes, torch.full((3,), 2.0, dtype=F64))
    torch.testing.assert_close(d.weights, torch.full((3,), 1 / 3, dtype=F64))
    assert d.probe.tolist() == [0, 1, 2]


def test_slq_shares_products_across_probes():
    A, _ = spectrum_matrix(50)
    op = CountingOperator(A)
    spectral_density(op, n_probes=10, n_steps=7, block=4, generator=gen(0))
    assert op.calls == [4] * 7 + [4] * 7 + [2] * 7


def test_slq_reproducible_and_float32():
    A, _ = spectrum_matrix(70, seed=14)
    a = spectral_density(A, 4, 12, generator=gen(9))
    b = spectral_density(A, 4, 12, generator=gen(9))
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    c = spectral_density(DenseOperator(A.float()), 4, 12, generator=gen(9))
    assert c.nodes.dtype == F64  # results in float64 on the CPU whatever the operator
    assert c.integrate(lambda x: x) == pytest.approx(a.integrate(lambda x: x), rel=1e-4)


def test_density_integrates_to_one_and_peaks_at_nodes():
    d = SpectralDensity(torch.tensor([-1.0, 2.0], dtype=F64), torch.tensor([0.25, 0.75], dtype=F64),
                        torch.tensor([0, 0]), P=2, n_probes=1, n_steps=2)
    grid, values = d.density(sigma=0.1, n_grid=4001)
    assert float(values.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, rel=1e-6)
    t = torch.tensor([-1.0, 2.0], dtype=F64)
    _, at = d.density(grid=t, sigma=0.1)
    torch.testing.assert_close(at, torch.tensor([0.25, 0.75], dtype=F64) / (0.1 * math.sqrt(2 * math.pi)))
    assert d.default_sigma() == pytest.approx(0.03)


def test_plot_spectral_density():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, _ = spectrum_matrix(80)
    d = spectral_density(A, 5, 20, generator=gen(0))
    ax = plot_spectral_density(d)
    assert isinstance(ax, matplotlib.axes.Axes) and len(ax.lines) == 1 and ax.get_yscale() == "log"
    y = ax.lines[0].get_ydata()
    assert (y > 0).all() and len(y) == 1000
    _, ax2 = plt.subplots()
    assert plot_spectral_density(d, ax=ax2, log=False, sigma=0.5, n_grid=50, color="k") is ax2
    assert ax2.get_yscale() == "linear" and len(ax2.lines[0].get_ydata()) == 50
    plt.close("all")


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_probes=0), "n_probes must be an int >= 1"),
    (dict(n_steps=0), "n_steps must be an int >= 1"),
    (dict(block=0), "block must be an int >= 1"),
])
def test_spectral_density_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_density(spectrum_matrix(20)[0], **kwargs)


def test_density_and_plot_bad_arguments():
    d = spectral_density(spectrum_matrix(20)[0], 2, 5, generator=gen(0))
    with pytest.raises(ValueError, match=r"sigma \(the kernel width, in eigenvalue units\) must be finite and > 0"):
        d.density(sigma=0.0)
    for n in (0, 1):  # one message for both (0 said ">= 1" before)
        with pytest.raises(ValueError, match=f"n_grid must be an int >= 2, got {n}"):
            d.density(n_grid=n)
    with pytest.raises(TypeError, match="f must be a function"):
        d.integrate(2.0)
    with pytest.raises(TypeError, match="result must be the SpectralDensity"):
        plot_spectral_density((d.nodes, d.weights))


# ---- CUDA: the same numbers as on the CPU (probes and start vectors come from a CPU generator) --------
@needs_cuda
def test_spectral_tools_on_cuda_match_cpu():
    A, lam = spectrum_matrix(100, seed=15)
    cpu, cuda = DenseOperator(A), DenseOperator(A.cuda())
    for method in ("lanczos", "block_lanczos"):
        v_cpu, V_cpu = eigenvalues(cpu, k=4, method=method, generator=gen(0))
        v_gpu, V_gpu = eigenvalues(cuda, k=4, method=method, generator=gen(0))
        assert v_gpu.device.type == "cuda" and V_gpu.device.type == "cuda"
        torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-10, atol=0)
        assert float(((V_gpu.cpu() * V_cpu).sum(0).abs() - 1).abs().max()) < 1e-8
    for method in ("hutchinson", "hutch++"):
        e_cpu = trace(cpu, 30, method, generator=gen(1), block=7)
        e_gpu = trace(cuda, 30, method, generator=gen(1), block=7)
        assert e_gpu.estimate == pytest.approx(e_cpu.estimate, rel=1e-10)
    d_cpu = spectral_density(cpu, 6, 15, generator=gen(2), block=4)
    d_gpu = spectral_density(cuda, 6, 15, generator=gen(2), block=4)
    torch.testing.assert_close(d_gpu.nodes, d_cpu.nodes, rtol=0, atol=1e-9)
    torch.testing.assert_close(d_gpu.weights, d_cpu.weights, rtol=0, atol=1e-8)
    # a generator on the device works too, and float32 operators stay float32 there
    v32, V32 = eigenvalues(DenseOperator(A.float().cuda()), k=2, generator=torch.Generator("cuda").manual_seed(0))
    assert v32.dtype == torch.float32 and V32.is_cuda
    torch.testing.assert_close(v32.double().cpu(), lam[:2], rtol=1e-4, atol=0)


# twelfth-session review: a near-breakdown (a coupling at the products' rounding level) ended the
# run on the invariant part's exact pairs, missing the other copies of a repeated eigenvalue
def test_lanczos_finds_the_null_space_copies_of_a_low_rank_ggn():
    from torch import nn
    from pyfastbayes.curvature import ggn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    x, y = torch.randn(8, 10, dtype=F64), torch.randint(0, 3, (8,))
    G = ggn(m, nn.CrossEntropyLoss(), (x, y))  # P = 283, rank 16: 267 zero eigenvalues
    for kw in ({}, {"tol": 0}, {"n_iter": 283}):
        vals, _ = eigenvalues(G, k=3, which="smallest", generator=gen(0), **kw)
        assert float(vals.abs().max()) < 1e-12, (kw, vals)


def test_lanczos_repeated_eigenvalue_after_a_breakdown():
    # 6, 4, 4 and six distinct others: the start vector's space closes after 8 products with one
    # copy of 4; the restart finds the second before the run may stop
    lam = torch.tensor([6.0, 4.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=F64)
    A, _ = spectrum_matrix(10, seed=3, lam=lam)
    big = torch.zeros(40, 40, dtype=F64)
    big[:10, :10] = A  # and 30 zeros
    vals, _ = eigenvalues(big, k=3, generator=gen(0))
    torch.testing.assert_close(vals, torch.tensor([6.0, 4.0, 4.0], dtype=F64), rtol=1e-10, atol=0)
