"""The main job, `python -m pyfastbayes demo --quick`, as a smoke test with sanity checks."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_quick_demo_runs_and_reports(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pyfastbayes", "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["regression_predictive.png", "reliability.png", "results.json", "results.md"]:
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["classification"]}
    assert set(rows) == {"MAP", "MAP + temperature", "SGLD", "cSGLD", "pSGLD", "SGHMC", "SWAG"}
    for name, r in rows.items():
        assert r["acc"] > 0.8, (name, r)  # 8 classes: chance is 0.125
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["brier"] <= 2
        assert r["ood_auroc"] > 0.6, (name, r)  # held-out digits look more uncertain than test digits
    reg = res["regression"]
    for k in range(2):  # SGLD/SGHMC means within a few posterior std of the exact mean
        assert abs(reg["sgld_mean"][k] - reg["posterior_mean"][k]) < 0.5 * reg["posterior_std"][k]
        assert abs(reg["sghmc_mean"][k] - reg["posterior_mean"][k]) < 0.5 * reg["posterior_std"][k]
    split = reg["variance_split"]
    assert split[0]["epistemic_sgld"] < split[1]["epistemic_sgld"] < split[2]["epistemic_sgld"]
    assert len({s["aleatoric"] for s in split}) == 1
    assert "SWAG" in proc.stdout and "report written" in proc.stdout


def test_demo_rejects_missing_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from pyfastbayes.demo import run_demo

    with pytest.raises(RuntimeError, match="cuda"):
        run_demo(device="cuda", quick=True)
