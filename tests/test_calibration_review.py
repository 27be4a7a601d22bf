"""Defects a review found in the calibration metrics (each test failed before its fix)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from pyfastbayes import calibration as cal


def test_lbfgs_temperature_reports_an_exhausted_evaluation_budget():
    """LBFGS also stops after max_eval = max_iter * 5 // 4 closure calls; with max_iter = 3 it stopped
    at T = 4.48 (optimum 11.2, NLL 0.5 too high) and said converged, without a warning."""
    torch.manual_seed(13)
    u = torch.randn(2000, 10, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=u).sample()
    z = u * 12
    with pytest.warns(RuntimeWarning, match="ran out before the fit converged"):
        ts = cal.TemperatureScaling(method="lbfgs", max_iter=3).fit(z, y)
    assert not ts.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = cal.TemperatureScaling(method="lbfgs").fit(z, y)
    newton = cal.TemperatureScaling().fit(z, y)
    assert full.converged
    excess = F.cross_entropy(z / full.temperature, y) - F.cross_entropy(z / newton.temperature, y)
    assert abs(float(excess)) < 1e-9  # (the NLL is flat at the optimum: T itself agrees to ~1e-5)


def test_nll_of_logits_is_exact_beyond_the_smallest_normal_probability():
    """Finite log probabilities below log(tiny) = -708.4 were clamped: logits (0, 800) gave 472 for
    the mean NLL where cross_entropy gives 600. A probability of 0 / a -inf target logit still
    counts 708.4."""
    z = torch.tensor([[0.0, 800.0], [0.0, 1000.0], [5.0, 0.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    assert float(cal.nll(z, y, from_logits=True)) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-15)
    inf = torch.tensor([[-math.inf, 0.0]], dtype=torch.float64)
    assert float(cal.nll(inf, torch.zeros(1, dtype=torch.long), from_logits=True)) == pytest.approx(708.396, rel=1e-5)
    assert float(cal.nll(torch.tensor([[0.0, 1.0]]), torch.zeros(1, dtype=torch.long))) == pytest.approx(708.396,
                                                                                                           rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_probabilities_keep_class_zero(dtype):
    """Binary [N] float32 p = 1e-8 with y = 0: 1 - p rounded to 1 gave nll 0 and brier 0."""
    p = torch.tensor([1e-4, 2e-4], dtype=dtype)
    y = torch.zeros(2, dtype=torch.long)
    p64 = p.double()
    assert float(cal.nll(p, y)) == pytest.approx(float(-torch.log1p(-p64).mean()), rel=1e-12)
    assert float(cal.brier(p, y)) == pytest.approx(float(p64.square().mean()), rel=1e-12)
    tiny = torch.tensor([1e-8], dtype=torch.float32)
    assert float(cal.nll(tiny, y[:1])) == pytest.approx(1e-8, rel=1e-6)


def test_brier_of_confident_predictions_has_no_cancellation():
    """sum p^2 - 2 p_y + 1 cancelled where p_y is near 1 (a row of true Brier 1.2e-17 gave 0)."""
    p = torch.tensor([[1 - 3e-9, 1e-9, 2e-9]], dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    want = float(((p - F.one_hot(y, 3).double()) ** 2).sum())
    assert float(cal.brier(p, y)) == pytest.approx(want, rel=1e-9)


def test_an_empty_batch_of_another_width_adds_nothing():
    """An empty batch (N = 0) may have any C: update used to refuse it against num_classes."""
    metric = cal.CalibrationError(n_bins=5, num_classes=3)
    metric.update(torch.softmax(torch.randn(8, 3), -1), torch.randint(0, 3, (8,)))
    before = metric.compute()
    metric.update(torch.empty(0, 5), torch.empty(0, dtype=torch.long))
    assert float(metric.compute()) == float(before)
