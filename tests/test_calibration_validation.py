"""One validation path for every calibration metric (issue 8, defect 10 and "unclear errors"):
the same checks and the same messages in ece, nll, brier, accuracy, the entropies, the streaming
metric and the plot; N = 0 refused everywhere; non-finite values reported as such; every
message names the argument and says how to fix it."""
import math

import pytest

from _helpers import require
import torch

from pyfastbayes import calibration as cal

INF, NAN = float("inf"), float("nan")
Y = torch.tensor([1, 0, 1])


def _stream(p, y, **kw):
    m = cal.CalibrationError(from_logits=kw.get("from_logits", False))
    m.update(p, y)
    return m.compute()


# every metric over probs (+ targets): the ones without targets ignore y
METRICS = {
    "ece": lambda p, y, **kw: cal.ece(p, y, **kw),
    "ece_adaptive": lambda p, y, **kw: cal.ece(p, y, binning="adaptive", **kw),
    "nll": lambda p, y, **kw: cal.nll(p, y, **kw),
    "brier": lambda p, y, **kw: cal.brier(p, y, **kw),
    "accuracy": lambda p, y, **kw: cal.accuracy(p, y, **kw),
    "predictive_entropy": lambda p, y, **kw: cal.predictive_entropy(p, **kw),
    "expected_entropy": lambda p, y, **kw: cal.expected_entropy(p, **kw),
    "mutual_information": lambda p, y, **kw: cal.mutual_information(p, **kw),
    "CalibrationError": _stream,
}
WITH_TARGETS = {"ece", "ece_adaptive", "nll", "brier", "accuracy", "CalibrationError"}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 3), (0,)])
@pytest.mark.parametrize("from_logits", [False, True])
def test_no_data_points_everywhere(metric, shape, from_logits):
    p, y = torch.empty(shape), torch.empty(0, dtype=torch.long)
    # the streaming metric accepts an empty batch (an empty shard under DDP); compute() refuses
    exc = RuntimeError if metric == "CalibrationError" else ValueError
    with pytest.raises(exc, match=r"no data points \(N = 0\)"):
        METRICS[metric](p, y, from_logits=from_logits)


def test_no_data_points_ood_auroc():
    with pytest.raises(ValueError, match=r"scores_in must be a non-empty 1-D tensor: no data points \(N = 0\)"):
        cal.ood_auroc(torch.empty(0), torch.rand(3))


BAD_LOGITS = {
    "+inf": torch.tensor([[0.0, 1.0], [INF, 0.0], [2.0, 1.0]]),
    "all -inf": torch.tensor([[0.0, 1.0], [-INF, -INF], [2.0, 1.0]]),
    "nan": torch.tensor([[0.0, 1.0], [NAN, 0.0], [2.0, 1.0]]),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", BAD_LOGITS)
def test_nonfinite_logits_raise_everywhere(metric, case):
    """nll gave inf (+inf logit) or NaN (all -inf, NaN) and brier/accuracy NaN or a silent answer."""
    with pytest.raises(ValueError, match=r"probs has NaN or infinite values in 1 of N = 3 rows .*-inf"):
        METRICS[metric](BAD_LOGITS[case], Y, from_logits=True)
    binary = BAD_LOGITS[case][:, 0]  # binary logits [N]: NaN and +inf (no all--inf row exists)
    if case != "all -inf":
        with pytest.raises(ValueError, match=r"probs has NaN or infinite values in 1 of N = 3 rows"):
            METRICS[metric](binary, Y, from_logits=True)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("S", [0, 2])
def test_nan_probs_are_reported_as_nonfinite(metric, S):
    """nll, brier and predictive_entropy said "rows must sum to 1" for a NaN."""
    p = torch.tensor([[0.2, 0.8], [NAN, 0.5], [0.5, 0.5]])
    p = p.expand(S, -1, -1) if S else p
    with pytest.raises(ValueError, match=r"probs has NaN or infinite values in 1 of N = 3 rows; probabilities "
                                         r"must be finite: drop or repair those rows"):
        METRICS[metric](p, Y)


CASES = {  # probs, targets, message: the same for every metric
    "row sum": (torch.tensor([[0.2, 0.9], [0.6, 0.4], [0.5, 0.5]]), Y,
                r"probs rows must sum to 1 \(within 0.0001, a tolerance of its dtype torch.float32\); 1 of N = 3 "
                r"rows do not \(pass from_logits=True for logits; normalise probabilities with "
                r"p / p.sum\(-1, keepdim=True\); half-precision probabilities cast up with .float\(\) keep their "
                r"rounding: pass them in their own dtype, or normalise after the cast\)"),
    "negative": (torch.tensor([[-0.2, 1.2], [0.6, 0.4], [0.5, 0.5]]), Y,
                 r"probs must be non-negative probabilities; 1 of N = 3 rows hold negative values \(pass "
                 r"from_logits=True for logits\)"),
    "binary outside [0, 1]": (torch.tensor([1.2, 0.5, 0.3]), Y,
                              r"probs must be non-negative probabilities of class 1, in \[0, 1\]; 1 of N = 3 values "
                              r"lie outside \(pass from_logits=True for logits\)"),
    "target": (torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), torch.tensor([1, 2, 0]),
               r"targets must lie in \[0, 2\) \(C = 2 classes\); 1 of N = 3 do not \(min 0, max 2\): pass class "
               r"indices 0..1"),
    "binary target": (torch.tensor([0.2, 0.8, 0.5]), torch.tensor([1, -1, 0]),
                      r"targets must lie in \[0, 2\) \(C = 2 classes\); 1 of N = 3 do not \(min -1, max 1\): pass 0 "
                      r"or 1 for binary \[N\] probs"),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", CASES)
def test_same_checks_same_messages(metric, case):
    """accuracy never validated; nll/brier/entropies had their own checks and wording."""
    p, y, msg = CASES[case]
    if "target" in case and metric not in WITH_TARGETS:
        METRICS[metric](p, y)  # no targets: nothing to complain about
        return
    with pytest.raises(ValueError, match=msg):
        METRICS[metric](p, y)


@pytest.mark.parametrize("metric", ["nll", "brier"])
def test_validate_false_still_refuses_out_of_range_targets(metric):
    """validate=False skips the value pass, but a target used as an index must not read out of
    bounds: the range is still checked."""
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        METRICS[metric](torch.tensor([[0.2, 0.8]]), torch.tensor([5]), validate=False)


def test_validate_false_skips_value_checks():
    p = torch.tensor([[0.2, 0.9], [0.6, 0.4]])  # a row sums to 1.1
    y = torch.tensor([1, 0])
    assert float(cal.nll(p, y, validate=False)) == pytest.approx(-(math.log(0.9) + math.log(0.6)) / 2)
    assert float(cal.accuracy(p, y, validate=False)) == 1.0


def test_minus_inf_logit_of_the_target_is_a_zero_probability():
    """A -inf logit in an otherwise finite row is a class of probability 0: nll gives the same
    large finite value as the probabilities path (clamped at the smallest normal float64)."""
    logits = torch.tensor([[-INF, 0.0], [0.0, 0.0]], dtype=torch.float64)
    probs = logits.softmax(-1)
    y = torch.tensor([0, 1])
    got = cal.nll(logits, y, from_logits=True)
    assert float(got) == pytest.approx((-math.log(torch.finfo(torch.float64).tiny) + math.log(2)) / 2, rel=1e-15)
    torch.testing.assert_close(got, cal.nll(probs, y), rtol=1e-15, atol=0)
    torch.testing.assert_close(cal.brier(logits, y, from_logits=True), cal.brier(probs, y), rtol=1e-15, atol=0)


def test_messages_name_the_argument():
    with pytest.raises(TypeError, match=r"probs must be a floating-point tensor, got torch.int64; convert"):
        cal.nll(torch.ones(2, 2, dtype=torch.long), Y[:2])
    with pytest.raises(TypeError, match=r"targets must hold integer class indices \(or bool\), got torch.float32; "
                                        r"convert with .long\(\)"):
        cal.accuracy(torch.full((2, 2), 0.5), torch.zeros(2))
    with pytest.raises(ValueError, match=r"targets has N = 3 entries but probs has N = 2 points"):
        cal.brier(torch.full((2, 2), 0.5), Y)
    with pytest.raises(ValueError, match=r"scores_out holds NaN or infinite values \(1 of 2\); drop or repair"):
        cal.ood_auroc(torch.rand(3), torch.tensor([0.5, NAN]))
    with pytest.raises(ValueError, match=r"max_iter must be an int >= 1, got 0"):
        cal.TemperatureScaling(max_iter=0)
    with pytest.raises(ValueError, match=r"logits has NaN or infinite values in 1 of N = 3 rows"):
        cal.TemperatureScaling().fit(BAD_LOGITS["nan"], Y)
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        cal.VectorScaling().fit(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no data points \(N = 0\): logits has shape \(0, 3\)"):
        cal.TemperatureScaling().fit(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def test_reliability_diagram_validates_like_the_metrics():
    require("matplotlib").use("Agg")
    p, y, msg = CASES["row sum"]
    with pytest.raises(ValueError, match=msg):
        cal.reliability_diagram(p, y)
    with pytest.raises(ValueError, match=r"no data points \(N = 0\)"):
        cal.reliability_diagram(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
