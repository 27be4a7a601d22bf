"""bench/bench_laplace.py: its reference is never dropped silently, its CPU peak memory is the
tensor bytes alive at once, and a disagreement with laplace-torch stops the timing (issue 13)."""
import pathlib
import sys

import pytest
import torch

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root (`bench`), AFTER
# site-packages: first, it would make processes spawned later import the uncompiled source tree

from bench import bench_laplace  # noqa: E402


@pytest.fixture
def no_laplace_torch(monkeypatch):
    """``import laplace`` raises ImportError inside the test (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "laplace", None)


def test_full_run_fails_loudly_without_laplace_torch(no_laplace_torch, capsys):
    with pytest.raises(RuntimeError, match=r"laplace-torch cannot be imported \(.*\); fix: pip install laplace-torch"):
        bench_laplace.run("cpu", quick=False)
    assert capsys.readouterr().out == ""  # nothing was trained or timed


def test_quick_run_prints_why_the_peer_is_left_out(no_laplace_torch, capsys):
    assert bench_laplace._peer(quick=True) == (None, {})
    out = capsys.readouterr().out
    assert "laplace-torch rows left out" in out and "ModuleNotFoundError" in out and "pip install laplace-torch" in out


def test_cpu_peak_memory_is_the_largest_live_set():
    mib = 2**20 // 4  # float32 elements per MiB

    def work():
        a = torch.ones(64 * mib)
        b = torch.ones(32 * mib)  # 96 MiB alive here
        del a
        c = torch.ones(16 * mib)  # 48 MiB
        return b.sum() + c.sum()

    from bench.common import peak_mb_any
    peak = peak_mb_any(work, "cpu")
    if peak is None:
        pytest.skip("this torch's profiler does not expose its memory events")
    assert 96 <= peak < 97


def test_a_disagreement_stops_the_timing():
    assert bench_laplace._agree("lml", 3e-5, 1e-4) == "rel 3e-05"
    with pytest.raises(RuntimeError, match="lml: pyfastbayes and laplace-torch differ"):
        bench_laplace._agree("lml", 2e-4, 1e-4)
    with pytest.raises(RuntimeError):
        bench_laplace._agree("lml", float("nan"), 1e-4)
