"""eigh_many (pyfastbayes.laplace.eigenbasis): every method decomposes mixed sizes like float64
LAPACK, on every device, and a Laplace fit gives the same posterior whichever method it uses."""
import pytest
import torch
from torch import nn

from _helpers import DEVICES, needs_cuda
from pyfastbayes.laplace import Laplace, eigh_many
from pyfastbayes.laplace.eigenbasis import METHODS

SIZES = (1, 5, 40, 40, 7, 129)


def _spd(sizes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = []
    for n in sizes:
        a = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
        mats.append((a @ a.T / n).to(device=device, dtype=dtype))
    return mats


def _check(got, mats, tol):
    assert len(got) == len(mats)
    for (vals, vecs), m in zip(got, mats):
        n = m.shape[0]
        assert vals.shape == (n,) and vecs.shape == (n, n)
        assert vals.device == m.device and vals.dtype == vecs.dtype == m.dtype
        want = torch.linalg.eigvalsh(m.double().cpu()).clamp_min(0)
        scale = float(want.abs().max())
        assert float((vals.double().cpu() - want).abs().max()) <= tol * scale
        assert bool((vals >= 0).all()) and bool((vals[1:] >= vals[:-1]).all())  # clamped, ascending
        rebuilt = (vecs * vals) @ vecs.T
        assert float((rebuilt - m).abs().max()) <= tol * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_float64_lapack(method, dtype, tol, device):
    mats = _spd(SIZES, device, dtype)
    _check(eigh_many(mats, method), mats, tol)


@needs_cuda
def test_streams_from_a_side_stream_with_one_worker_and_many():
    mats = _spd(SIZES * 3, "cuda", torch.float32, seed=1)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller's own stream: the workers wait for it, it waits for them
        scaled = [m * 2 for m in mats]
        for threads in (1, 3, None):
            got = eigh_many(scaled, "streams", threads=threads)
            doubled = [(2 * v, q) for v, q in got]  # used at once on the caller's stream
            _check([(v / 2, q) for v, q in doubled], mats, 1e-4)
    torch.cuda.synchronize()


def test_mixed_devices_and_empty_input():
    mats = _spd((4, 6), "cpu", torch.float64)
    for method in METHODS:
        assert eigh_many([], method) == []
        _check(eigh_many(mats, method, threads=1), mats, 1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        eigh_many([torch.eye(2)], "jacobi")
    with pytest.raises(ValueError, match=r"mats\[1\] must be a square matrix"):
        eigh_many([torch.eye(2), torch.ones(2, 3)], "streams")


@pytest.mark.parametrize("device", DEVICES)
def test_laplace_is_the_same_whichever_method(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double().to(device)
    x = torch.randn(40, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (40,), device=device)
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    fits = {m: Laplace(model, "classification", hessian_structure="kron", eigh_method=m).fit(loader, progress=False)
            for m in ("batched", "loop", "cpu", "streams")}
    ref = fits["batched"]
    for m, la in fits.items():
        assert torch.allclose(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10), m
        assert torch.allclose(la(x[:5]), ref(x[:5]), rtol=1e-8, atol=1e-12), m


def test_host_pool_splits_torch_threads_and_puts_them_back():
    """'cpu' runs each worker's LAPACK call on its share of torch's threads (all threads each
    oversubscribed the cores) and restores the caller's setting, also when a decomposition fails."""
    seen = []
    real = torch.linalg.eigh

    def spy(m):
        seen.append(torch.get_num_threads())
        return real(m)

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        mats = _spd((5, 6, 7, 8), "cpu", torch.float64)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.linalg, "eigh", spy)
            _check(eigh_many(mats, "cpu", threads=2), mats, 1e-10)
        assert seen == [2] * 4 and torch.get_num_threads() == 4
        with pytest.raises(RuntimeError, match="failed to converge"):
            eigh_many([torch.eye(3), torch.full((3, 3), float("nan"))], "cpu", threads=2)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_auto_takes_the_host_pool_for_several_large_cpu_matrices(monkeypatch):
    from pyfastbayes.laplace import eigenbasis

    seen = []
    real = eigenbasis._eigh_host
    monkeypatch.setattr(eigenbasis, "_eigh_host", lambda mats, threads: seen.append(len(mats)) or real(mats, threads))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        big = _spd((256, 256, 8), "cpu", torch.float64)
        _check(eigh_many(big, "auto"), big, 1e-10)
        assert seen == [3]
        eigh_many(_spd((256, 8, 8), "cpu", torch.float64), "auto")  # one large matrix: batched
        torch.set_num_threads(1)
        eigh_many(big, "auto")  # one thread: nothing to split
        assert seen == [3]
    finally:
        torch.set_num_threads(before)


def _tiny_sparse_ggn(n=500, k=131, r=115, scale=1e-8, seed=0):
    """A float32 curvature like a subnetwork's of the largest-variance weights of an overfit ReLU
    MLP (the demo's MAP): most rows and columns zero (dead units), the rest ~1e-8 down to ~1e-38.
    torch 2.13's CPU float32 eigvalsh fails to converge on this one."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(r, k, generator=g) * torch.rand(k, generator=g) ** 4
    H = torch.zeros(n, n)
    idx = torch.randperm(n, generator=g)[:k]
    H[idx[:, None], idx[None]] = (J.t() @ J) * scale
    return H


def test_psd_eigh_decomposes_tiny_curvatures_lapack_gives_up_on():
    from pyfastbayes.laplace.eigenbasis import psd_eigh

    H = _tiny_sparse_ggn()
    exact = torch.linalg.eigvalsh(H.double())
    vals = psd_eigh(H, eigenvectors=False)
    assert (vals.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    lam, V = psd_eigh(H)
    assert (lam.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    back = (V.double() * lam.double()) @ V.double().t()
    assert (back - H.double()).abs().max() <= 1e-5 * H.abs().max()
    # a matrix LAPACK handles gets torch's own result, bit for bit
    A = torch.randn(40, 40, generator=torch.Generator().manual_seed(1))
    A = A @ A.t()
    assert torch.equal(psd_eigh(A)[0], torch.linalg.eigh(A)[0]) and torch.equal(psd_eigh(A)[1], torch.linalg.eigh(A)[1])
    # through eigh_many and a full posterior's log determinant
    from types import SimpleNamespace
    from pyfastbayes.laplace.eigenbasis import eigh_many
    from pyfastbayes.laplace.precision import FullPrecision

    for method in ("batched", "loop", "cpu"):
        (lam2, _), = eigh_many([H], method=method)
        assert (lam2.double() - exact.clamp_min(0)).abs().max() <= 1e-5 * exact.abs().max()
    prec = FullPrecision(SimpleNamespace(blocks=[], H=H))
    s, delta = torch.tensor(3e7), torch.tensor([0.5])
    want = torch.log(3e7 * exact.clamp_min(0) + 0.5).sum()
    torch.testing.assert_close(prec.logdet(s, delta).double(), want, rtol=1e-5, atol=1e-4)
