"""Temperature and vector scaling at the edges (issue 8, defect 11): separable validation data,
uninformative logits, the documented range of T, and the scenario of netcal's own MLE test."""
import warnings

import pytest
import torch

from pyfastbayes import calibration as cal
from test_calibration import temperature_sd


def _separable(N=300, C=4, margin=3.0, seed=0):
    """Logits whose target entry is the largest by ``margin``: every point classified correctly."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    z[torch.arange(N), y] = z.max(-1).values + margin
    return z, y


def _nll_slope(z, y, T):
    """d NLL / d beta at beta = 1 / T (negative: the NLL still falls as T shrinks)."""
    p = (z / T).softmax(-1)
    return float((p * (z - z.gather(1, y[:, None]))).sum(-1).mean())  # E_p[z - z_y]: no cancellation


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_separable_data_stop_at_t_min_with_a_warning(method):
    """Before: T ~ 1e-3 (wherever the optimiser gave up), silently."""
    z, y = _separable()
    with pytest.warns(RuntimeWarning, match=r"stopped at the bound T = t_min = 0.05: the logits separate the "
                                            r"validation data .* no finite minimiser; use more or harder validation"):
        ts = cal.TemperatureScaling(method).fit(z, y)
    assert float(ts.temperature) == 0.05 and ts.at_bound == "t_min" and ts.n_iter == 0
    assert _nll_slope(z, y, 0.05) < 0  # the NLL indeed still falls at the bound
    # a narrower range stops at its own bound
    with pytest.warns(RuntimeWarning, match="T = t_min = 0.5"):
        assert float(cal.TemperatureScaling(method, t_min=0.5).fit(z, y).temperature) == 0.5


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_uninformative_logits_stop_at_t_max_with_a_warning(method):
    z, y = _separable(margin=-3.0)  # the target logit is the SMALLEST: worse than uniform at any T
    with pytest.warns(RuntimeWarning, match=r"stopped at the bound T = t_max = 20: .* little information"):
        ts = cal.TemperatureScaling(method).fit(z, y)
    assert float(ts.temperature) == 20.0 and ts.at_bound == "t_max"


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_minimiser_below_t_min_on_data_that_do_not_separate(method):
    """Underconfident logits (true T0 = 0.02 < t_min) on data with errors: the warning says the
    minimiser lies below t_min, not that the data separate."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(u.softmax(-1), 1, generator=g).squeeze(1)
    with pytest.warns(RuntimeWarning, match=r"T = t_min = 0.05: the NLL is still falling there, its minimiser "
                                            r"lies below t_min"):
        ts = cal.TemperatureScaling(method).fit(u * 0.02, y)
    assert float(ts.temperature) == 0.05
    # with the range widened the true temperature is found: 1/T within 4 sd of the MLE
    z = u * 0.02
    ts = cal.TemperatureScaling(method, t_min=1e-3).fit(z, y)
    assert ts.at_bound is None and abs(1 / float(ts.temperature) - 50) <= 4 * temperature_sd(z, u)


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_ordinary_fit_does_not_warn_and_stays_inside(method):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(u.softmax(-1), 1, generator=g).squeeze(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts = cal.TemperatureScaling(method).fit(3 * u, y)
    assert ts.at_bound is None and 0.05 < float(ts.temperature) < 20 and ts.n_iter >= 1


def test_temperature_range_arguments():
    for kw, msg in [(dict(t_min=0.0), r"t_min must be a finite number > 0, got 0.0"),
                    (dict(t_max=float("inf")), r"t_max must be a finite number > 0"),
                    (dict(t_min=2.0, t_max=1.0), r"t_min must be < t_max, got t_min = 2.0, t_max = 1.0")]:
        with pytest.raises(ValueError, match=msg):
            cal.TemperatureScaling(**kw)


def test_vector_scaling_warns_on_separable_data():
    z, y = _separable()
    with pytest.warns(RuntimeWarning, match=r"VectorScaling: the logits separate the validation data"):
        cal.VectorScaling().fit(z, y)


def test_netcal_mle_scenario():
    """netcal's own test (tests/test_mle_precision.py): 2000 x 5, labels from softmax(latent),
    predictions softmax(3 * latent), i.e. over-confident by T0 = 3; temperature scaling must lower
    the NLL by more than 0.2 and give the same answer for float32 and float64 inputs. netcal's
    TemperatureScaling itself needs tensorboard (not installed), so the scenario runs on ours; we
    also ask for 1/T0 within 4 standard deviations of the MLE (sd = 1 / sqrt(N * Fisher))."""
    g = torch.Generator().manual_seed(42)
    latent = torch.randn(2000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(latent.softmax(-1), 1, generator=g).squeeze(1)
    z = 3.0 * latent
    before = float(cal.nll(z, y, from_logits=True))
    temps, after = {}, {}
    for dtype in (torch.float32, torch.float64):
        ts = cal.TemperatureScaling().fit(z.to(dtype), y)
        temps[dtype], after[dtype] = float(ts.temperature), float(cal.nll(ts.transform(z), y, from_logits=True))
        assert after[dtype] < before - 0.2
    assert abs(after[torch.float32] - after[torch.float64]) <= 1e-6
    assert abs(temps[torch.float32] - temps[torch.float64]) <= 1e-5  # float32 rounding of z: ~1e-7 relative
    assert abs(1 / temps[torch.float64] - 1 / 3.0) <= 4 * temperature_sd(z, latent)


def test_one_logit_column_gets_the_logits_hint():
    """[N, 1] logits were told to pass 'binary problems as [N] probabilities of class 1', which the
    next call refused as not [N, C] logits."""
    for cls in (cal.TemperatureScaling, cal.VectorScaling):
        with pytest.raises(ValueError, match=r"logits must be \[N, C\] with C >= 2 classes, got shape \(10, 1\); for a "
                                             r"binary problem pass both columns"):
            cls().fit(torch.randn(10, 1), torch.randint(0, 2, (10,)))
