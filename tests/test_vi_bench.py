"""bench/bench_vi.py (issue 12): its reference bayesian-torch is never dropped silently, every
implementation is checked to compute the same thing before it is timed (a wrong one stops the
run), and a --quick case produces the ratio columns."""
import pathlib
import sys

import pytest
import torch

from _helpers import require

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root (`bench`), AFTER
# site-packages: first, it would make processes spawned later import the uncompiled source tree

from bench import bench_vi  # noqa: E402

TINY = bench_vi._mlp_spec(16)  # 784-16-16-10: the checks in well under a second


@pytest.fixture
def no_bayesian_torch(monkeypatch):
    """``import bayesian_torch`` raises ImportError inside the test (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "bayesian_torch", None)


def _impls(btl):
    return [bench_vi.HAND, *bench_vi.OURS] + ([bench_vi.BT["reparam"], bench_vi.BT["flipout"]] if btl else [])


def _check(spec, btl, batch=8):
    canon = bench_vi._canonical(spec)
    x, y = bench_vi._data(spec, batch, "cpu")
    return bench_vi._check("tiny", _impls(btl), spec, canon, x, y, "cpu", btl)


def test_full_run_fails_loudly_without_bayesian_torch(no_bayesian_torch, capsys):
    with pytest.raises(RuntimeError, match=r"bayesian-torch cannot be imported \(.*\); fix: pip install bayesian-torch"):
        bench_vi.run("cpu", quick=False)
    assert capsys.readouterr().out == ""  # nothing was checked or timed


def test_quick_run_prints_why_the_peer_is_left_out(no_bayesian_torch, capsys):
    assert bench_vi._peer(quick=True) is None
    out = capsys.readouterr().out
    assert "bayesian-torch rows left out" in out and "ModuleNotFoundError" in out and "pip install bayesian-torch" in out


@pytest.mark.parametrize("spec", [TINY, bench_vi.CNN_SPEC], ids=["mlp", "cnn"])
def test_every_implementation_passes_the_checks(spec):
    require("bayesian_torch.layers", "bayesian-torch is the benchmark's reference")
    note = _check(spec, bench_vi._peer(quick=False), batch=4)
    assert note.startswith("out ") and "KL" in note


def test_a_wrong_kl_stops_the_run(monkeypatch):
    # the hand-written layer's KL off by a factor: ours and it disagree, so nothing is timed
    real = bench_vi._gauss_kl
    monkeypatch.setattr(bench_vi, "_gauss_kl", lambda mu, sigma, s: 0.5 * real(mu, sigma, s))
    with pytest.raises(RuntimeError, match="KL of hand-written eager BBB vs reparam: differs"):
        _check(TINY, None)


def test_a_wrong_forward_stops_the_run(monkeypatch):
    # a layer that drops its bias computes another network: caught at sigma -> 0
    real = bench_vi.HandBayes.forward

    def no_bias(self, x):
        out = real(self, x)
        return out - self.bias_mu
    monkeypatch.setattr(bench_vi.HandBayes, "forward", no_bias)
    with pytest.raises(RuntimeError, match="hand-written eager BBB: output at sigma -> 0: differs"):
        _check(TINY, None)


def test_a_cut_noise_path_stops_the_run(monkeypatch):
    # sigma detached from the sample only: outputs and the KL (value and gradients) are right, but
    # rho would learn from the KL alone
    real = bench_vi.HandBayes.forward

    def detached(self, x):
        out = real(self, x)  # sets self.kl with the live sigma
        w = self.weight_mu + torch.nn.functional.softplus(self.weight_rho).detach() * torch.randn_like(self.weight_mu)
        return torch.nn.functional.linear(x, w, self.bias_mu) + 0 * out
    monkeypatch.setattr(bench_vi.HandBayes, "forward", detached)
    with pytest.raises(RuntimeError, match="hand-written eager BBB: layer 0's rho gets no finite NLL gradient"):
        _check(TINY, None)


def test_quick_case_rows_have_the_ratios():
    btl = require("bayesian_torch.layers", "bayesian-torch is the benchmark's reference") and bench_vi._peer(quick=False)
    rows = bench_vi._case_rows("tiny", TINY, 8, "cpu", True, btl)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {bench_vi.HAND, *(f"pyfastbayes {e}" for e in bench_vi.OURS), *bench_vi.BT.values()}
    for est in bench_vi.OURS:
        r = by[f"pyfastbayes {est}"]
        assert r["ms"] > 0 and r["vs_peer"] > 0 and r["speedup"] > 0
        assert r["state_MB"] < by[bench_vi.BT["reparam"]]["state_MB"]  # bayesian-torch holds eps / prior buffers
        if r["peak_MB"] != "":  # the CPU profiler's memory events are available
            assert r["mem_vs_peer"] > 0
