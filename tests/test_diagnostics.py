"""pyfastbayes.diagnostics: R-hat and ESS against ArviZ 0.23.4 (rel 1e-8, float64), their
statistical behaviour on draws with known properties, input handling and the summary table."""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from _helpers import DEVICES, require
from pyfastbayes import diagnostics
from pyfastbayes.diagnostics import convergence

az = require("arviz", "the reference for rhat / ess")
from arviz.stats import diagnostics as az_diag  # noqa: E402  (private pieces, for one chain)

logging.getLogger("arviz").setLevel(logging.ERROR)  # its shape warnings for the NaN cases
REL = 1e-8
RHAT = ("rank", "split", "folded")
ESS = ("bulk", "tail", "mean")


def ar1(rng, chains, draws, k, rho):
    """AR(1) chains x_t = rho x_{t-1} + e_t, started in the stationary N(0, 1 / (1 - rho^2))."""
    e = rng.normal(size=(chains, draws, k))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0] / math.sqrt(1 - rho ** 2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def reference(x: np.ndarray, what: str, method: str) -> np.ndarray:
    """ArviZ's value for every trailing element of x [chains, draws, ...] (it takes 2-d arrays)."""
    fn = az.rhat if what == "rhat" else az.ess
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 of constant draws
        vals = [float(fn(flat[..., i], method=method)) for i in range(flat.shape[-1])]
    return np.array(vals).reshape(x.shape[2:])


def ours(x, what: str, method: str) -> torch.Tensor:
    return (diagnostics.rhat if what == "rhat" else diagnostics.ess)(x, method=method)


def assert_matches(x: np.ndarray, what: str, method: str):
    got = ours(torch.from_numpy(x), what, method)
    assert got.dtype == torch.float64 and tuple(got.shape) == x.shape[2:]
    want = torch.from_numpy(reference(x, what, method))
    torch.testing.assert_close(got, want, rtol=REL, atol=0, equal_nan=True)
    return got


def cases():
    rng = np.random.default_rng(0)
    sticky = rng.standard_cauchy(size=(4, 300, 3))
    sticky[:, 1::2] = sticky[:, ::2]  # every draw repeated: half the ESS
    return {
        "iid": rng.normal(size=(4, 200, 5)),
        "ar1_odd_draws": ar1(rng, 3, 301, 4, 0.8),
        "antithetic": ar1(rng, 4, 150, 3, -0.7),
        "shifted_means": rng.normal(size=(4, 100, 3)) + np.arange(4.0)[:, None, None],
        "random_walk": np.cumsum(rng.normal(size=(2, 80, 3)), axis=1),
        "cauchy": rng.standard_cauchy(size=(4, 500, 3)),
        "sticky_cauchy": sticky,
        "ties": rng.integers(0, 3, size=(3, 40, 4)).astype(np.float64),
        "periodic": np.sin(0.9 * np.arange(60.0))[None, :, None] + 1e-3 * rng.normal(size=(2, 60, 3)),
        "four_draws": rng.normal(size=(2, 4, 3)),
        "five_draws": rng.normal(size=(3, 5, 3)),
        "constant": np.concatenate([np.full((3, 10, 1), 2.5), rng.normal(size=(3, 10, 1))], axis=-1),
    }


CASES = cases()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", RHAT)
def test_rhat_matches_arviz(name, method):
    assert_matches(CASES[name], "rhat", method)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", ESS)
def test_ess_matches_arviz(name, method):
    assert_matches(CASES[name], "ess", method)


def test_random_shapes_match_arviz():
    """1 to 5 chains, 4 to 60 draws, five kinds of draws: every method within REL of ArviZ
    (ArviZ's R-hat needs 2 chains; one chain is checked in test_one_chain)."""
    rng = np.random.default_rng(1)
    for trial in range(20):
        c, n = int(rng.integers(1, 6)), int(rng.integers(4, 61))
        kind = trial % 5
        x = [rng.normal(size=(c, n, 2)), ar1(rng, c, n, 2, float(rng.uniform(-0.95, 0.95))),
             rng.integers(0, 4, size=(c, n, 2)).astype(float), np.cumsum(rng.normal(size=(c, n, 2)), 1),
             rng.standard_cauchy(size=(c, n, 2))][kind]
        for method in ESS:
            assert_matches(x, "ess", method)
        if c > 1:
            for method in RHAT:
                assert_matches(x, "rhat", method)


def test_one_chain():
    """ESS of one chain is ArviZ's; R-hat of one chain compares its two halves (ArviZ returns
    NaN there): ArviZ's own pieces applied to the split chain give the reference."""
    x = ar1(np.random.default_rng(2), 1, 101, 3, 0.3)
    for method in ESS:
        assert_matches(x, "ess", method)
    for i in range(3):
        s = az_diag._split_chains(x[..., i])
        want = {"split": az_diag._rhat(s), "folded": az_diag._rhat(az_diag._z_fold(s)),
                "rank": max(az_diag._rhat(az_diag._z_scale(s)), az_diag._rhat(az_diag._z_fold(s)))}
        for method in RHAT:
            assert math.isclose(float(diagnostics.rhat(x, method)[i]), want[method], rel_tol=REL)
    # a trend within the chain shows as R-hat > 1 even with one chain
    trend = np.linspace(0, 3, 200)[None, :, None] + np.random.default_rng(3).normal(size=(1, 200, 1))
    assert float(diagnostics.rhat(trend)) > 1.1


def test_multiple_trailing_dims():
    x = np.random.default_rng(4).normal(size=(3, 40, 2, 3, 4))
    x[:, :, 1, 2] += np.arange(3.0)[:, None, None]  # four elements with shifted chains
    for method in RHAT:
        r = assert_matches(x, "rhat", method)
        assert r.shape == (2, 3, 4)
    for method in ESS:
        assert assert_matches(x, "ess", method).shape == (2, 3, 4)
    r = diagnostics.rhat(x)
    assert bool((r[1, 2] > 1.1).all()) and float(r[0].max()) < 1.1
    assert diagnostics.rhat(np.zeros((2, 5, 0, 3))).shape == (0, 3)  # no elements: empty result


def test_chunks_give_the_same_values(monkeypatch):
    """The elements are processed in blocks of ~_CHUNK_VALUES values: blocks of 1 or 2 elements
    give the same numbers as one block."""
    x = torch.from_numpy(ar1(np.random.default_rng(5), 3, 50, 7, 0.6))
    whole = {(w, m): ours(x, w, m) for w in ("rhat", "ess") for m in (RHAT if w == "rhat" else ESS)}
    for chunk in (150, 300):  # 3 * 50 values = one element per block; then two
        monkeypatch.setattr(convergence, "_CHUNK_VALUES", chunk)
        for (w, m), v in whole.items():
            torch.testing.assert_close(ours(x, w, m), v, rtol=1e-14, atol=0)


def test_torch_and_numpy_inputs_agree():
    x = np.random.default_rng(6).normal(size=(3, 30, 4)).astype(np.float32)
    for w, methods in (("rhat", RHAT), ("ess", ESS)):
        for m in methods:
            a = ours(x, w, m)  # numpy float32
            b = ours(torch.from_numpy(x), w, m)  # torch float32
            c = ours(torch.from_numpy(x).double().transpose(0, 1).contiguous().transpose(0, 1), w, m)
            assert a.dtype == b.dtype == torch.float64 and a.device.type == "cpu"
            assert torch.equal(a, b) and torch.equal(a, c)  # the same float64 values in every form
            torch.testing.assert_close(a, torch.from_numpy(reference(x.astype(np.float64), w, m)),
                                       rtol=REL, atol=0)
    ints = np.random.default_rng(7).integers(0, 5, size=(2, 20, 3))
    assert torch.equal(diagnostics.ess(ints), diagnostics.ess(ints.astype(np.float64)))
    g = torch.randn(2, 20, 3, requires_grad=True)
    assert not diagnostics.rhat(g).requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_device(device):
    """On the draws' device, equal to the CPU values (cuFFT and CUDA's ndtri round differently)."""
    x = torch.from_numpy(ar1(np.random.default_rng(8), 4, 120, 5, 0.5)).float()
    for w, methods in (("rhat", RHAT), ("ess", ESS)):
        for m in methods:
            got = ours(x.to(device), w, m)
            assert got.device.type == device and got.dtype == torch.float64
            torch.testing.assert_close(got.cpu(), ours(x, w, m), rtol=1e-10, atol=0)


# ---- statistical behaviour ----------------------------------------------------------------------
def ess_tolerance(n_total: int, tau: float, k: int) -> float:
    """4 standard errors of the mean of k independent ESS / expected ratios. Sokal's estimate of
    the relative variance of a windowed tau estimate is 2 (2 W + 1) / N; Geyer's sequence stops
    within a few tau, W = max(10, 5 tau) bounds it (the measured spread is about half of this)."""
    window = max(10.0, 5.0 * tau)
    return 4.0 * math.sqrt(2.0 * (2.0 * window + 1.0) / n_total) / math.sqrt(k)


@pytest.mark.parametrize("rho", [0.0, 0.5, -0.3, 0.9])
def test_ar1_ess_matches_theory(rho):
    """AR(1): tau = (1 + rho) / (1 - rho), ESS = N / tau; bulk (rank-normalised, monotone
    transform of Gaussian draws) and mean ESS both, averaged over 128 independent elements."""
    chains, draws, k = 4, 1000, 128
    x = ar1(np.random.default_rng(9), chains, draws, k, rho)
    tau = (1 + rho) / (1 - rho)
    tol = ess_tolerance(chains * draws, tau, k)
    for method in ("mean", "bulk"):
        ratio = diagnostics.ess(x, method) / (chains * draws / tau)
        assert abs(float(ratio.mean()) - 1) < tol, (method, float(ratio.mean()), tol)
    # R-hat - 1 ~ (tau F - 1) / (2 n) for split chains of n draws (the chain means' variance is
    # tau / n of the draws'), F ~ F(7, .) for 8 split chains: P(F > 6) < 1e-6, so below
    # 3 tau / n; max(tau, 1) for the folded part (|x| keeps an autocorrelation ~ rho^2 when rho < 0)
    assert float(diagnostics.rhat(x).max()) - 1 < 3 * max(tau, 1.0) / (draws // 2)


def test_iid_normal_rhat_near_one():
    """iid draws: B / W ~ F(7, 7 * 499) for 8 split chains, R-hat - 1 ~ (B / W - 1) / (2 n);
    B / W > 4 has p ~ 2e-4, so every one of 64 elements is below 1 + 3 / 1000."""
    x = torch.from_numpy(np.random.default_rng(10).normal(size=(4, 1000, 64)))
    for method in RHAT:
        r = diagnostics.rhat(x, method)
        assert float((r - 1).abs().max()) < 3e-3, method


def test_shifted_means_and_scales():
    """Chains shifted by 0..3 sd: rank and split R-hat > 1.1 (the folded one looks at spread
    about the median and is not meant for this). Chains with equal means but one with 3x the
    scale: the classic split R-hat misses it (< 1.01), the folded and rank R-hat catch it (> 1.05)."""
    rng = np.random.default_rng(11)
    shifted = rng.normal(size=(4, 500, 8)) + np.arange(4.0)[:, None, None]
    for method in ("rank", "split"):
        assert float(diagnostics.rhat(shifted, method).min()) > 1.1, method
    scaled = rng.normal(size=(4, 1000, 8)) * np.array([1.0, 1.0, 1.0, 3.0])[:, None, None]
    assert float((diagnostics.rhat(scaled, "split") - 1).abs().max()) < 0.01
    assert float(diagnostics.rhat(scaled, "folded").min()) > 1.05
    assert float(diagnostics.rhat(scaled, "rank").min()) > 1.05


def test_cauchy_bulk_and_tail():
    """iid Cauchy: bulk and tail ESS, built on ranks and quantile indicators, are near N as for
    any iid draws (the variance the mean ESS assumes does not exist). Cauchy draws z_t / |w_t|
    (z iid N(0, 1), w an AR(1) with rho = 0.99): uncorrelated signs keep every odd function of
    the draws uncorrelated, so the bulk ESS stays near N, but the slowly mixing scale |w| makes
    the tail indicators sticky: the tail ESS falls far below the bulk ESS."""
    rng = np.random.default_rng(12)
    tol = ess_tolerance(4000, 1.0, 32) * math.sqrt(32)  # one element: 4 standard errors
    iid = rng.standard_cauchy(size=(4, 1000, 32))
    for method in ("bulk", "tail"):
        assert float((diagnostics.ess(iid, method) / 4000 - 1).abs().max()) < tol, method
    x = rng.normal(size=(4, 1000, 32)) / np.abs(ar1(rng, 4, 1000, 32, 0.99))
    bulk, tail = diagnostics.ess(x, "bulk"), diagnostics.ess(x, "tail")
    assert float((bulk / 4000 - 1).abs().max()) < tol
    assert float((tail / bulk).max()) < 0.5
    for method in ESS:
        assert_matches(x[..., :4], "ess", method)


def test_constant_elements():
    """Constant draws: R-hat NaN (nothing to compare), ESS the number of split draws, as ArviZ."""
    x = np.full((3, 9, 2), 1.5)
    assert torch.isnan(diagnostics.rhat(x)).all()
    for method in ESS:
        assert diagnostics.ess(x, method).tolist() == [24.0, 24.0]  # 3 chains * 2 halves * 4


# ---- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [diagnostics.rhat, diagnostics.ess])
def test_bad_inputs(fn):
    good = torch.randn(2, 10, 3)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor or numpy.ndarray .*list"):
        fn(good.tolist())
    with pytest.raises(ValueError, match=r"x must have shape \[chains, draws, ...\], got shape \(10,\); "
                                         r"for the draws of one chain pass x\[None\]"):
        fn(torch.randn(10))
    with pytest.raises(ValueError, match=r"x has 3 draws per chain .*at least 4"):
        fn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="x has no chains"):
        fn(torch.randn(0, 10))
    for value, count in ((math.nan, 1), (math.inf, 2)):
        bad = good.clone()
        bad[1, 4, :count] = value
        with pytest.raises(ValueError, match=rf"x holds {count} non-finite value\(s\).*drop the diverged"):
            fn(bad)
    with pytest.raises(TypeError, match="dense real tensor, got dtype torch.complex64"):
        fn(torch.randn(2, 10, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real numeric array, got numpy dtype <U1"):
        fn(np.array([["a"] * 5] * 2))
    with pytest.raises(ValueError, match="meta tensor"):
        fn(torch.empty(2, 10, device="meta"))
    with pytest.raises(ValueError, match=r"unknown .* method 'median'; choose one of"):
        fn(good, method="median")
    with pytest.raises(TypeError, match="method must be a str"):
        fn(good, method=1)


# ---- summary ------------------------------------------------------------------------------------
def test_summary():
    rng = np.random.default_rng(13)
    samples = {"w": torch.from_numpy(rng.normal(size=(4, 400, 2, 3))),
               "shifted": rng.normal(size=(4, 400)) + np.arange(4.0)[:, None],
               "one_chain": torch.randn(1, 50, 2, generator=torch.Generator().manual_seed(0))}
    s = diagnostics.summary(samples)
    assert list(s) == ["w", "shifted", "one_chain"]
    for name, x in samples.items():
        d = s[name]
        assert isinstance(d, diagnostics.Diagnostics)
        assert torch.equal(d.rhat, diagnostics.rhat(x)) and torch.equal(d.ess_bulk, diagnostics.ess(x))
        assert torch.equal(d.ess_tail, diagnostics.ess(x, "tail"))
    assert s["w"].rhat.shape == (2, 3) and s["shifted"].rhat.shape == ()
    lines = str(s).splitlines()
    assert lines[0].split() == ["name", "shape", "max", "rhat", "min", "ess_bulk", "min", "ess_tail"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert not rows["w"].endswith("check") and rows["shifted"].endswith("check")
    assert rows["one_chain"].endswith("check")  # 50 draws cannot reach an ESS of 100 per chain
    assert f"{float(s['w'].rhat.max()):.3f}" in rows["w"]


def test_summary_bad_inputs():
    with pytest.raises(TypeError, match="samples must be a dict"):
        diagnostics.summary([torch.randn(2, 10)])
    with pytest.raises(ValueError, match="samples is empty"):
        diagnostics.summary({})
    with pytest.raises(TypeError, match="keys must be str"):
        diagnostics.summary({1: torch.randn(2, 10)})
    with pytest.raises(ValueError, match=r"samples\['b'\] has 2 draws per chain"):
        diagnostics.summary({"a": torch.randn(2, 10), "b": torch.randn(2, 2)})


def test_lazy_import():
    import pyfastbayes

    assert pyfastbayes.diagnostics is diagnostics
