"""The main job, `python -m pyfastbayes demo`: the quick run as a smoke test with sanity checks, the
full run (seed 0, the README table) for issue 14's goal on every Bayesian row."""
import json
import subprocess
import sys

import pytest

from _helpers import require

require("sklearn")
require("matplotlib")


@pytest.mark.slow
def test_quick_demo_runs_and_reports(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pyfastbayes", "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["regression_predictive.png", "reliability.png", "sweep.png", "mode_connectivity.png", "swa_plane.png",
                 "residual_slices.png", "results.json", "results.md"]:
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["classification"]}
    _check_rows_and_sweep(res, out)
    _check_landscape(res["landscape"], proc.stdout, out)
    for name, r in rows.items():
        assert r["acc"] > 0.8, (name, r)  # 8 classes: chance is 0.125
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["brier"] <= 2
        assert r["ood_auroc"] > 0.6, (name, r)  # held-out digits look more uncertain than test digits
    # issue 13's goal for the named Laplace recipes (KFAC with the prior by validation NLL; the
    # subnetwork of the largest-variance weights with the prior by the evidence): in-distribution
    # NLL within 2 % of the MAP's and a lower NLL under shift
    mp = rows["MAP"]
    for lap in (rows["Laplace KFAC val"], rows["Laplace subnet ml"]):
        assert lap["nll"] <= 1.02 * mp["nll"] and lap["shift_nll"] < mp["shift_nll"], (mp, lap)
    reg = res["regression"]
    for k in range(2):  # SGLD/SGHMC means within a few posterior std of the exact mean
        assert abs(reg["sgld_mean"][k] - reg["posterior_mean"][k]) < 0.5 * reg["posterior_std"][k]
        assert abs(reg["sghmc_mean"][k] - reg["posterior_mean"][k]) < 0.5 * reg["posterior_std"][k]
    # epistemic variance of the SGLD draws at x* = 0, 2, 4 against the exact x*^T Sigma x*: the
    # quick run keeps 200 independent chains x 5 snapshots spaced 3 relaxation times apart (ESS ~
    # 1000), so a variance estimate has relative sd sqrt(2 / 1000) = 4.5 %: 3.3 sd = 15 % (observed
    # at this seed: 1 %); noise off by 10 % (variance off by 21 %) fails it
    split = reg["variance_split"]
    for s in split:
        assert abs(s["epistemic_sgld"] / s["epistemic_exact"] - 1) < 0.15, s
        assert s["aleatoric"] == pytest.approx(0.3**2)  # the demo's noise variance, BLR_NOISE^2
    assert split[0]["epistemic_exact"] < split[1]["epistemic_exact"] < split[2]["epistemic_exact"]
    assert "SWAG" in proc.stdout and "report written" in proc.stdout
    flat = res["flatness"]
    assert set(flat) == {"SGD", "SWA"}
    for r in flat.values():  # a trained network's loss is locally convex along its sharpest direction
        assert r["top_eigenvalue"] > 0 and r["trace_std_error"] > 0
    assert "Flatness of the training loss" in proc.stdout


SAMPLERS = ("SGLD", "cSGLD", "pSGLD", "SGHMC")


def _check_rows_and_sweep(res: dict, out) -> None:
    """Rows, sweep and mixing of a demo run (quick or full): every sampler has one tuned row labelled
    with its T and prior, chosen by validation NLL over its sweep, and a T = 1 reference row; R-hat
    and ESS are finite for every tracked scalar of both settings."""
    import math

    rows = {r["method"]: r for r in res["classification"]}
    fixed = {"MAP", "MAP + temperature", "SWAG", "Bayes by Backprop", "Laplace KFAC val", "Laplace subnet ml",
             "Laplace KFAC ml [ref]"}
    assert fixed <= set(rows), set(rows)
    assert len(rows) == len(fixed) + 2 * len(SAMPLERS), set(rows)
    assert rows["Laplace KFAC ml [ref]"]["role"] == "reference"
    sg = res["sgmcmc"]
    temps = sg["temperatures"]
    assert 1.0 in temps and min(temps) < 1.0
    for name in SAMPLERS:
        tuned = [r for r in rows.values() if r.get("sampler") == name and r["role"] == "bayes"]
        ref = [r for r in rows.values() if r.get("sampler") == name and r["role"] == "reference"]
        assert len(tuned) == 1 and len(ref) == 1, (name, tuned, ref)
        tuned, ref = tuned[0], ref[0]
        assert ref["temperature"] == 1.0 and ref["method"] == f"{name} T=1 N(0,1) [ref]", ref
        assert tuned["method"] == f"{name} T={tuned['temperature']:g} {tuned['prior']}", tuned
        assert tuned["chains"] == ref["chains"] == 4
        sweep = [r for r in sg["sweep"] if r["method"] == name]
        assert sorted({r["temperature"] for r in sweep}) == sorted(temps)
        assert len(sweep) == len(temps) * (2 if name == "SGLD" else 1)  # SGLD also sweeps the fan-in prior
        for r in sweep:
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("val_nll", "test_nll", "shift_nll")), r
        best = min(sweep, key=lambda r: r["val_nll"])  # the choice is the lowest validation NLL
        chosen = sg["chosen"][name]
        assert (chosen["temperature"], chosen["prior"]) == (best["temperature"], best["prior"])
        assert (tuned["temperature"], tuned["prior"]) == (best["temperature"], best["prior"])
        for mix in (chosen, sg["reference"][name]):
            assert mix["chains"] == 4 and mix["draws_per_chain"] >= 4
            assert len(mix["rhat"]) == 5 and set(mix["rhat"]) == set(mix["ess_bulk"])  # 2 log-liks + 3 weights
            for k in mix["rhat"]:
                assert math.isfinite(mix["rhat"][k]) and mix["rhat"][k] > 0.9, (name, k, mix)
                assert math.isfinite(mix["ess_bulk"][k]) and mix["ess_bulk"][k] > 0, (name, k, mix)
    md = (out / "results.md").read_text()
    assert "temperature / prior sweep" in md and "R-hat" in md


def _check_landscape(land: dict, stdout: str, out) -> None:
    """The loss-landscape pictures' numbers (issue 11): straight lines between independently trained
    solutions rise, the trained Bezier curve does not; the evaluations agree where they meet (both
    ends of a path are the solutions themselves); SWA, SGD and the skip-connection slices give
    finite numbers, intervals that contain their point and nets trained below chance level."""
    import math

    assert set(land) == {"mode_connectivity", "swa", "residual", "time_s"}, set(land)
    mc = land["mode_connectivity"]
    ends = mc["solution_train_loss"]
    assert len(ends) == 3 and all(0 < v < 0.2 for v in ends), ends
    for k, top in mc["line_max_loss"].items():  # independent solutions: a barrier on every straight line
        assert math.isfinite(top) and top > 3 * max(ends), (k, top, ends)
    # the curve w0 -> w1 is trained: far below the barrier of the straight line between the same ends
    assert mc["curve_max_loss"] < 0.5 * mc["line_max_loss"]["0-1"], mc
    # t = 0 and t = 1 of the line (interpolate) and of the curve (BezierCurve.evaluate) are w0 and w1
    line01 = mc["line_loss"]["0-1"]
    assert line01[0] == pytest.approx(mc["curve_ends_loss"][0], rel=1e-4)
    assert line01[-1] == pytest.approx(mc["curve_ends_loss"][1], rel=1e-4)
    assert mc["line_loss"]["0-2"][0] == pytest.approx(ends[0], rel=1e-4)
    assert mc["line_loss"]["1-2"][-1] == pytest.approx(ends[2], rel=1e-4)
    sw = land["swa"]
    d = sw["swa_sgd_distance"]
    assert d > 0 and sw["plane_coords"]["SGD"] == pytest.approx([d, 0.0], abs=1e-6 * d)
    # the shared region along the SWA-SGD line: below the higher of the two losses + rise (the losses
    # on the line are interpolated between its points, so the level is compared loosely)
    assert sw["line_level"] == pytest.approx(max(sw["train_loss"].values()) + sw["rise"], rel=0.05), sw
    for name, at in (("SWA", 0.0), ("SGD", d)):
        assert 0 < sw["train_loss"][name] < 0.2 and 0 < sw["test_loss"][name] < 0.5, sw
        w = sw["line_width"][name]
        assert w["left"] < at < w["right"] and w["width"] == pytest.approx(w["right"] - w["left"]), (name, w)
        assert w["margin"] == pytest.approx(min(at - w["left"], w["right"] - at)), (name, w)
        assert math.isfinite(sw["random_width"][name]["mean_width"]) and sw["random_width"][name]["mean_width"] > 0
    rs = land["residual"]
    for name in ("residual", "plain"):
        r = rs[name]
        assert r["train_loss"] < 0.75 * math.log(8), (name, r)  # trained: below chance level (log 8)
        assert all(math.isfinite(r[k]) for k in ("curvature", "rise_at_1", "mean_width", "max_loss")), (name, r)
        assert r["rise_at_1"] > 0 and r["mean_width"] > 0, (name, r)
    assert "Loss landscapes" in stdout and "Bezier curve" in stdout
    assert "Loss landscapes" in (out / "results.md").read_text()


@pytest.mark.slow
def test_full_demo_meets_the_goal(tmp_path):
    """Issue 14's goal on the full run (seed 0, the README's table): every Bayesian row that is not a
    labelled reference has test NLL <= 1.02 x the MAP's and a lower NLL under shift than the MAP."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pyfastbayes", "demo", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    _check_rows_and_sweep(res, out)
    _check_landscape(res["landscape"], proc.stdout, out)
    rows = res["classification"]
    mp = rows[0]
    assert mp["method"] == "MAP"
    bayes = [r for r in rows if r["role"] == "bayes"]
    assert len(bayes) == 4 + 4  # the tuned SG-MCMC rows, SWAG, Bayes by Backprop, Laplace KFAC val and subnet ml
    for r in bayes:
        assert r["nll"] <= 1.02 * mp["nll"] and r["shift_nll"] < mp["shift_nll"], (mp, r)
        assert r["goal_met"] is True
    assert "met by every Bayesian row" in proc.stdout
    # the SWA picture's point on the full run (Izmailov et al. 2018, fig. 1): along the line through SWA
    # and the last SGD iterate, SWA lies deeper inside the low-loss region they share than SGD
    sw = res["landscape"]["swa"]
    assert sw["line_width"]["SWA"]["margin"] > sw["line_width"]["SGD"]["margin"], sw["line_width"]
    assert "SWA lies nearer the centre" in proc.stdout
    # the cold-posterior evidence stays visible: each sampler's T = 1 row predicts worse in distribution
    # than its tuned row (whatever T the sweep picked below 1)
    for name in SAMPLERS:
        tuned = next(r for r in bayes if r.get("sampler") == name)
        ref = next(r for r in rows if r.get("sampler") == name and r["role"] == "reference")
        if tuned["temperature"] < 1:
            assert ref["nll"] > tuned["nll"], (tuned, ref)


def test_demo_rejects_missing_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from pyfastbayes.demo import run_demo

    with pytest.raises(RuntimeError, match="cuda"):
        run_demo(device="cuda", quick=True)
