"""bench/bench_sgmcmc.py: a peer that cannot be imported is never silently dropped (issue 8, item 16)."""
import pathlib
import sys

import pytest

from _helpers import require

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root (`bench`), AFTER
# site-packages: first, it would make processes spawned later import the uncompiled source tree

from bench import bench_sgmcmc  # noqa: E402


@pytest.fixture
def no_posteriors(monkeypatch):
    """``import posteriors`` raises ImportError inside the test (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "posteriors", None)


# item 16: a full run raises with the import error and the fix, before it times anything
def test_full_run_fails_loudly_without_a_peer(no_posteriors, capsys):
    fix = r"posteriors cannot be imported \(ModuleNotFoundError: .*\); fix: .*requirements-peers.txt.*--quick"
    with pytest.raises(RuntimeError, match=fix):
        bench_sgmcmc.run("cpu", quick=False)
    assert capsys.readouterr().out == ""  # nothing was timed


# item 16: a --quick run keeps going but prints the reason
def test_quick_run_prints_why_a_peer_is_left_out(no_posteriors, capsys):
    assert bench_sgmcmc.import_peer("posteriors", quick=True) is None
    out = capsys.readouterr().out
    assert "posteriors row is left out" in out and "ModuleNotFoundError" in out and "requirements-peers.txt" in out


def test_importable_peer_is_returned():
    require("posteriors")
    assert bench_sgmcmc.import_peer("posteriors", quick=False).__name__ == "posteriors"
