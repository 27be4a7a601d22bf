"""pyfastbayes.calibration and pyfastbayes.priors public API (audit): options are checked for what
they are (no string read as its truth value, no silently rounded scale), every refusal names the
argument and the fix. (tests/test_calibration_validation.py covers the value checks of the
metrics: sums, signs, NaN, targets, N = 0; these are the cases it does not.)"""
import math

import pytest
import torch
from torch import nn

from _helpers import require
from pyfastbayes import calibration as cal
from pyfastbayes.priors import scaled_groups

P = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
Y = torch.tensor([1, 0, 1])


def _stream(**kw):
    m = cal.CalibrationError(**kw)
    m.update(P, Y)
    return m.compute()


# from_logits='no' is truthy: probabilities were read as logits and a wrong number came back;
# validate=None skipped the checks; classwise='no' switched classwise binning on
FLAG_CALLS = {
    "ece": lambda **kw: cal.ece(P, Y, **kw),
    "nll": lambda **kw: cal.nll(P, Y, **kw),
    "brier": lambda **kw: cal.brier(P, Y, **kw),
    "accuracy": lambda **kw: cal.accuracy(P, Y, **kw),
    "predictive_entropy": lambda **kw: cal.predictive_entropy(P, **kw),
    "expected_entropy": lambda **kw: cal.expected_entropy(P, **kw),
    "mutual_information": lambda **kw: cal.mutual_information(P, **kw),
    "CalibrationError": _stream,
    "evaluate": lambda **kw: cal.evaluate(P, Y, **kw),
}


@pytest.mark.parametrize("call", FLAG_CALLS)
@pytest.mark.parametrize("flag,value", [("from_logits", "no"), ("validate", None), ("from_logits", 1)])
def test_flags_must_be_bools(call, flag, value):
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got {type(value).__name__}"):
        FLAG_CALLS[call](**{flag: value})


@pytest.mark.parametrize("call", ["ece", "CalibrationError", "evaluate"])
def test_classwise_must_be_a_bool(call):
    kw = {} if call == "ece" else {"num_classes": 2}
    with pytest.raises(TypeError, match=r"classwise must be True or False, got str 'no'"):
        FLAG_CALLS[call](classwise="no", **kw)


def test_bool_flags_still_work():
    import numpy as np
    assert float(cal.ece(P, Y, from_logits=np.bool_(False))) == float(cal.ece(P, Y))


def test_evaluate_distributed_must_be_none_or_bool():
    """distributed='no' was read as True ("distributed=True but torch.distributed is not initialised")."""
    with pytest.raises(TypeError, match=r"distributed must be True or False, got str 'no'"):
        cal.evaluate(P, Y, distributed="no")
    assert cal.evaluate(P, Y, metrics="nll", distributed=False)["nll"] == cal.nll(P, Y)


def test_num_classes_checked_even_without_classwise():
    with pytest.raises(TypeError, match="num_classes must be an int, got str"):
        cal.CalibrationError(num_classes="3")
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 2, got 1"):
        cal.CalibrationError(num_classes=1)


def test_meta_tensors_are_named():
    """They raised NotImplementedError "Cannot copy out of meta tensor; no data!"."""
    with pytest.raises(ValueError, match=r"probs is a meta tensor \(a shape without data\)"):
        cal.ece(P.to("meta"), Y.to("meta"))
    with pytest.raises(ValueError, match=r"probs is a meta tensor"):
        cal.nll(P.to("meta"), Y.to("meta"))


# tol=nan / -1 made the fit run max_iter steps for nothing, tol='1e-3' was parsed from the string
@pytest.mark.parametrize("cls", [cal.TemperatureScaling, cal.VectorScaling])
@pytest.mark.parametrize("tol", [float("nan"), -1.0, "1e-3", True])
def test_tol_is_checked(cls, tol):
    with pytest.raises(ValueError, match=r"tol must be a finite number >= 0, got"):
        cls(tol=tol)


def _fitted():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 3, generator=g, dtype=torch.float64) * 3
    y = torch.distributions.Categorical(logits=z / 1.5).sample()
    return z, y


# transform() of integer logits cast the fitted T (or w) to the integer dtype: T = 1.5 read as 1,
# weights 0.9 as 0: wrong logits, silently; a list raised AttributeError
def test_transform_refuses_integer_logits():
    z, y = _fitted()
    ts, vs = cal.TemperatureScaling().fit(z, y), cal.VectorScaling().fit(z, y)
    assert abs(float(ts.temperature) - 1.5) < 0.5 and float(ts.temperature) != round(float(ts.temperature))
    for m in (ts, vs):
        with pytest.raises(TypeError, match=r"logits must be a floating-point tensor, got torch.int64; .*\.float\(\)"):
            m.transform(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(TypeError, match=r"logits must be a torch.Tensor, got list"):
            m.transform([[1.0, 2.0, 3.0]])
        with pytest.raises(ValueError, match=r"logits must be \[\.\.\., C\]"):
            m.transform(torch.tensor(1.0))
    torch.testing.assert_close(ts.transform(z.float()), (z / ts.temperature).float())


def test_refit_that_fails_keeps_the_fit():
    z, y = _fitted()
    ts = cal.TemperatureScaling().fit(z, y)
    t = ts.temperature.clone()
    with pytest.raises(ValueError, match="targets must lie in"):
        ts.fit(z, y + 3)
    assert torch.equal(ts.temperature, t)


# reliability_diagram(ax='x') raised AttributeError: 'str' object has no attribute 'figure'; the
# array of plt.subplots(1, 2) (a natural pair) was refused the same way
def test_reliability_diagram_checks_ax():
    require("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    with pytest.raises(TypeError, match=r"ax must be None, one matplotlib Axes or a pair of them, got str"):
        cal.reliability_diagram(P, Y, ax="x")
    _, a = plt.subplots()
    with pytest.raises(TypeError, match=r"ax must be a pair of matplotlib Axes \(bars, histogram\), but ax\[1\] "
                                        r"is int"):
        cal.reliability_diagram(P, Y, ax=(a, 2))
    fig, axs = plt.subplots(1, 2)
    assert cal.reliability_diagram(P, Y, ax=axs) is fig  # a NumPy array of two Axes is a pair
    assert len(axs[0].patches) > 0 and len(axs[1].patches) > 0
    plt.close("all")


# priors: scale=1e-320 gave prior_precision inf (every sampler then refused "prior_precision");
# scale=10**400 raised OverflowError; param_names=[...] was shared by every group and appended to
def test_scaled_groups_scale_range():
    with pytest.raises(ValueError, match=r"scale = 1e-320 is too small: the prior precision 2 / scale overflows a "
                                         r"float64; pass scale >= 2e-308"):
        scaled_groups(nn.Linear(2, 2), scale=1e-320)
    with pytest.raises(ValueError, match=r"bias_scale = 1e-320 is too small"):
        scaled_groups(nn.Linear(2, 2), bias_scale=1e-320)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got 1000"):
        scaled_groups(nn.Linear(2, 2), scale=10**400)
    with pytest.raises(ValueError, match=r"other_precision must be a finite number >= 0"):
        scaled_groups(nn.Linear(2, 2), other_precision=10**400)
    assert math.isfinite(scaled_groups(nn.Linear(2, 2), scale=1e-300)[0]["prior_precision"])


def test_scaled_groups_refuses_param_names_option():
    names = ["x"]
    with pytest.raises(TypeError, match=r"scaled_groups sets 'param_names' itself"):
        scaled_groups(nn.Linear(2, 2), param_names=names)
    assert names == ["x"]
