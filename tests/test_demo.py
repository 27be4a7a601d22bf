"""The main job, `python -m pyfastbayes demo --quick`, as a smoke test with sanity checks."""
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
    for name in ["regression_predictive.png", "reliability.png", "results.json", "results.md"]:
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["classification"]}
    assert set(rows) == {"MAP", "MAP + temperature", "SGLD", "cSGLD", "pSGLD", "SGHMC", "SWAG", "Bayes by Backprop",
                         "Laplace KFAC val", "Laplace KFAC ml"}
    for name, r in rows.items():
        assert r["acc"] > 0.8, (name, r)  # 8 classes: chance is 0.125
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["brier"] <= 2
        assert r["ood_auroc"] > 0.6, (name, r)  # held-out digits look more uncertain than test digits
    # issue 13's goal for the named Laplace recipe (prior by validation NLL): in-distribution NLL within
    # 2 % of the MAP's and a lower NLL under shift
    mp, lap = rows["MAP"], rows["Laplace KFAC val"]
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


def test_demo_rejects_missing_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from pyfastbayes.demo import run_demo

    with pytest.raises(RuntimeError, match="cuda"):
        run_demo(device="cuda", quick=True)
