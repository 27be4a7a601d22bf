"""examples/heteroscedastic_laplace.py: it runs, writes its picture, and its heteroscedastic
Laplace learns the noise (the aleatoric sd near the true one) where the homoscedastic one cannot."""
import importlib.util
import math
from pathlib import Path

import torch

from _helpers import require

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "heteroscedastic_laplace.py"


def test_example_runs_and_learns_the_noise(tmp_path, capsys):
    require("matplotlib")
    spec = importlib.util.spec_from_file_location("heteroscedastic_laplace", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "het.png"
    fits = mod.main(["--n", "300", "--epochs", "150", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert set(fits) == {"heteroscedastic", "homoscedastic"}
    g = torch.Generator().manual_seed(5)
    x, y, sd = mod.data(500, g)
    errs = {}
    for name, (la, _) in fits.items():
        p = la.predict(x)
        errs[name] = float((p.aleatoric.sqrt() - sd).abs().mean())
        assert math.isfinite(mod.gaussian_nll(p.mean, p.variance, y))
    assert errs["heteroscedastic"] < 0.5 * errs["homoscedastic"], errs
    assert "test NLL" in capsys.readouterr().out
