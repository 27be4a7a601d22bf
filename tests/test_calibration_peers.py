"""pyfastbayes.calibration against the peers: torchmetrics 1.9 and netcal 1.4 (installed with
--no-deps in the venv; netcal.metrics imports without tensorboard).

Ported from torchmetrics' own suite (tests/unittests/classification/test_calibration_error.py):
its binary and multiclass cases (probabilities, logits, an extra dimension flattened into N;
4 batches of 32, 5 classes, extra dimension 3), n_bins and norms, checked there against netcal's
ECE/MCE; here ours is checked against both. Not ported: ``ignore_index`` (we have no such
argument: drop the rows instead), the DDP runs (tests/test_calibration_dist.py covers sync) and
differentiability (our metrics are not differentiable). netcal's own suite has no metric tests
(only tests/test_mle_precision.py, ported in test_calibration_recalibration.py).

Where we disagree, and why (each pinned by a test below):
- a confidence of exactly 1.0: ours and netcal count it in the last bin (closed on the right,
  Guo et al. 2017); torchmetrics counts it in a phantom bin B + 1 of its own (its issue #3510);
- binary [N, 2] input: netcal calibrates the positive class (it takes column 1 whenever the
  targets hold at most two labels); ours calibrates the top label of [N, 2] and the positive
  class of [N] (as torchmetrics' binary_calibration_error);
- logits: torchmetrics guesses them from values outside [0, 1]; ours needs from_logits=True and
  otherwise refuses values outside [0, 1] (saying so);
- netcal's ACE (default equal_intervals=True) is the unweighted mean over non-empty equal-width
  bins: not our binning='adaptive' (equal-mass bins, weighted by count); netcal's ECE and ACE
  with equal_intervals=False equal ours when N is a multiple of n_bins.
"""
import math

import numpy as np
import pytest

from _helpers import require
import torch

from pyfastbayes import calibration as cal

tm = require("torchmetrics")
netcal = require("netcal.metrics")
tmf = tm.functional.classification

NUM_BATCHES, BATCH_SIZE, NUM_CLASSES, EXTRA_DIM = 4, 32, 5, 3  # torchmetrics' test sizes
TOL = 1e-6  # torchmetrics bins float32 confidences (sums rounded at ~1e-7 relative); ours float64


def _binary_case(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BATCHES, BATCH_SIZE) + ((EXTRA_DIM,) if kind.startswith("multidim") else ())
    p = torch.rand(shape, generator=g)
    preds = torch.log(p / (1 - p)) if kind.endswith("logits") else p
    return preds, torch.randint(0, 2, shape, generator=g)


BINARY = ["probs", "logits", "multidim-probs", "multidim-logits"]  # torchmetrics' _binary_cases 1, 2, 4, 5


def _netcal(metric: str, n_bins: int, x: np.ndarray, y: np.ndarray) -> float:
    peer = {"l1": netcal.ECE, "max": netcal.MCE}[metric](n_bins)
    return float(peer.measure(x, y))


@pytest.mark.parametrize("kind", BINARY)
@pytest.mark.parametrize("n_bins", [10, 15, 20])
@pytest.mark.parametrize("norm", ["l1", "max", "l2"])
def test_binary_matches_torchmetrics_and_netcal(kind, n_bins, norm):
    """Before: ours binned the top-label confidence max(p, 1 - p) of [N] input (probs case,
    n_bins = 20: 0.2268 against the peers' 0.2616; with an even n_bins and no value on an edge
    the two coincide, as the bins of p and 1 - p mirror each other)."""
    preds, target = _binary_case(kind, seed=n_bins)
    logits = kind.endswith("logits")
    x, y = preds.flatten(), target.flatten()
    ours = float(cal.ece(x, y, n_bins=n_bins, norm=norm, from_logits=logits))
    assert abs(ours - float(tmf.binary_calibration_error(preds, target, n_bins=n_bins, norm=norm))) <= TOL
    if norm != "l2":  # netcal has ECE and MCE, no RMSCE
        p = torch.sigmoid(x.double()) if logits else x.double()
        assert abs(ours - _netcal(norm, n_bins, p.numpy(), y.numpy())) <= TOL
    # the streaming metric over torchmetrics' batches gives the same as their class metric
    metric = tm.classification.BinaryCalibrationError(n_bins=n_bins, norm=norm)
    stream = cal.CalibrationError(n_bins=n_bins, norm=norm, from_logits=logits)
    for pb, yb in zip(preds, target):
        metric.update(pb, yb)
        stream.update(pb.flatten(), yb.flatten())
    assert abs(float(stream.compute()) - float(metric.compute())) <= TOL
    assert float(stream.compute()) == pytest.approx(ours, abs=1e-14)


def test_binary_is_positive_class_calibration():
    """Positive class: bins {0.3, 0.3} (frequency of y = 1: 1/2) and {0.8, 0.8} (frequency 1):
    ECE = (0.2 + 0.2) / 2. Top label of the same points ([N, 2] input): confidences 0.7, 0.7, 0.8,
    0.8 all in the upper bin, accuracy 3/4 = mean confidence: ECE 0."""
    p = torch.tensor([0.3, 0.3, 0.8, 0.8], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 1])
    assert float(cal.ece(p, y, n_bins=2)) == pytest.approx(0.2, abs=1e-15)
    assert float(cal.ece(torch.stack([1 - p, p], -1), y, n_bins=2)) == pytest.approx(0.0, abs=1e-15)
    assert float(tmf.binary_calibration_error(p.float(), y, n_bins=2)) == pytest.approx(0.2, abs=1e-7)
    assert _netcal("l1", 2, p.numpy(), y.numpy()) == pytest.approx(0.2, abs=1e-12)
    # the logit of p gives the same; adaptive bins and the plot follow the same rule
    assert float(cal.ece(torch.log(p / (1 - p)), y, n_bins=2, from_logits=True)) == pytest.approx(0.2, abs=1e-12)
    assert float(cal.ece(p, y, n_bins=2, binning="adaptive")) == pytest.approx(0.2, abs=1e-15)


def test_streaming_refuses_to_mix_binary_and_top_label():
    p = torch.tensor([0.3, 0.8])
    m = cal.CalibrationError(n_bins=2)
    m.update(p, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"got \[N, C\] probs \(top-label calibration\) after binary \[N\] probs"):
        m.update(torch.stack([1 - p, p], -1), torch.tensor([1, 1]))
    m.reset()
    m.update(torch.stack([1 - p, p], -1), torch.tensor([1, 1]))  # after reset: either form


def test_reliability_diagram_of_binary_input():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.tensor([0.3, 0.3, 0.8, 0.8])
    fig = cal.reliability_diagram(p, torch.tensor([1, 0, 1, 1]), n_bins=2)
    bars = fig.axes[0].patches[:2]  # the frequency-of-class-1 bars of the two filled bins
    assert sorted(r.get_height() for r in bars) == [0.5, 1.0]
    assert fig.axes[0].get_ylabel() == "frequency of class 1"
    plt.close(fig)


def _multiclass_case(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BATCHES, BATCH_SIZE, NUM_CLASSES) + ((EXTRA_DIM,) if kind.startswith("multidim") else ())
    x = torch.randn(shape, generator=g)
    preds = x if kind.endswith("logits") else x.softmax(2)
    return preds, torch.randint(0, NUM_CLASSES, (shape[0], shape[1]) + shape[3:], generator=g)


@pytest.mark.parametrize("kind", BINARY)
@pytest.mark.parametrize("n_bins", [15, 20])
@pytest.mark.parametrize("norm", ["l1", "max"])
def test_multiclass_matches_torchmetrics_and_netcal(kind, n_bins, norm):
    """torchmetrics' _multiclass_cases 1, 2, 4, 5: [B, N, C(, E)] -> [B * N (* E), C]."""
    preds, target = _multiclass_case(kind, seed=n_bins)
    logits = kind.endswith("logits")
    x = preds.movedim(2, -1).reshape(-1, NUM_CLASSES)
    y = target.reshape(-1)
    ours = float(cal.ece(x, y, n_bins=n_bins, norm=norm, from_logits=logits))
    # torchmetrics flattens the extra dimension itself: [B * N, C(, E)]
    theirs = tmf.multiclass_calibration_error(preds.flatten(0, 1), target.flatten(0, 1), NUM_CLASSES, n_bins=n_bins,
                                              norm=norm)
    assert abs(ours - float(theirs)) <= TOL
    p = x.double().softmax(-1) if logits else x.double()
    assert abs(ours - _netcal(norm, n_bins, p.numpy(), y.numpy())) <= TOL


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_torchmetrics(norm, n_bins):
    g = torch.Generator().manual_seed(n_bins)
    p = (torch.randn(3000, 10, generator=g, dtype=torch.float64) * 2).softmax(-1).float()
    y = torch.randint(0, 10, (3000,), generator=g)
    want = tm.functional.calibration_error(p, y, "multiclass", num_classes=10, n_bins=n_bins, norm=norm)
    assert abs(float(cal.ece(p, y, n_bins=n_bins, norm=norm)) - float(want)) <= TOL
    metric = tm.classification.MulticlassCalibrationError(num_classes=10, n_bins=n_bins, norm=norm)
    ours = cal.CalibrationError(n_bins=n_bins, norm=norm)
    for pb, yb in zip(p.split(700), y.split(700)):
        metric.update(pb, yb)
        ours.update(pb, yb)
    assert abs(float(ours.compute()) - float(metric.compute())) <= TOL


@pytest.mark.parametrize("norm", ["l1", "max"])
@pytest.mark.parametrize("S", [0, 4])
def test_ece_matches_netcal(norm, S):
    """float64 both sides: only netcal's clip of p to [eps, 1 - eps] differs (~1e-16)."""
    g = torch.Generator().manual_seed(S)
    x = torch.randn(*((S,) if S else ()), 2000, 5, generator=g, dtype=torch.float64) * 2
    p, y = x.softmax(-1), torch.randint(0, 5, (2000,), generator=g)
    kw = {"uncertainty": "mean"} if S else {}
    peer = (netcal.ECE if norm == "l1" else netcal.MCE)(15)
    assert abs(float(cal.ece(p, y, norm=norm)) - float(peer.measure(p.numpy(), y.numpy(), **kw))) <= 1e-12


@pytest.mark.parametrize("n_bins", [4, 10])
@pytest.mark.parametrize("binary", [False, True])
def test_equal_mass_bins_match_netcal(n_bins, binary):
    """netcal's ECE and ACE with equal_intervals=False (quantile edges) against ours with
    binning='adaptive': with N a multiple of n_bins and distinct values every bin holds N / n_bins
    points on both sides, so weighted (ECE) and unweighted (ACE) means agree with ours."""
    g = torch.Generator().manual_seed(n_bins)
    N = 1000
    x = torch.randn(N, 4, generator=g, dtype=torch.float64).softmax(-1)
    y = torch.randint(0, 4, (N,), generator=g)
    if binary:
        x, y = x[:, 0], (torch.rand(N, generator=g, dtype=torch.float64) < x[:, 0]).long()
    ours = float(cal.ece(x, y, n_bins=n_bins, binning="adaptive"))
    for peer in (netcal.ECE, netcal.ACE):
        assert abs(ours - float(peer(n_bins, equal_intervals=False).measure(x.numpy(), y.numpy()))) <= 1e-12


def test_confidence_exactly_one_lands_in_the_last_bin():
    """p = 0.95 (y = 1) and p = 1.0 (y = 0) share the last of 10 bins: |0.5 - 0.975| = 0.475.
    netcal agrees (its histogram closes the last bin; it clips 1.0 to 1 - eps); torchmetrics 1.9
    puts 1.0 in a bin of its own and gets (0.05 + 1.0) / 2 = 0.525 (its issue #3510)."""
    p, y = torch.tensor([0.95, 1.0], dtype=torch.float64), torch.tensor([1, 0])
    assert float(cal.ece(p, y, n_bins=10)) == pytest.approx(0.475, abs=1e-15)
    assert _netcal("l1", 10, p.numpy(), y.numpy()) == pytest.approx(0.475, abs=1e-12)
    # the same on the top-label path: [N, 2] with the confidence 1.0 of class 0
    q = torch.tensor([[0.05, 0.95], [1.0, 0.0]], dtype=torch.float64)
    assert float(cal.ece(q, torch.tensor([1, 1]), n_bins=10)) == pytest.approx(0.475, abs=1e-15)


def test_probability_zero_lands_in_the_first_bin():
    """torchmetrics' issue #1646 (index -1 for p = 0, fixed there): p = 0 sits in bin 0."""
    p, y = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1, 1])
    # bins: {0.0} with frequency 1 -> gap 1; {1.0 x 4} with frequency 1/2 -> gap 1/2
    assert float(cal.ece(p, y, n_bins=2)) == pytest.approx((1 * 1 + 4 * 0.5) / 5)
    assert _netcal("l1", 2, p.numpy().astype(np.float64), y.numpy()) == pytest.approx(0.6, abs=1e-12)


def test_netcal_takes_the_positive_class_of_two_columns():
    """netcal reads [N, 2] as binary (column 1); ours reads it as top-label and [N] as binary."""
    g = torch.Generator().manual_seed(3)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    y = (torch.rand(500, generator=g, dtype=torch.float64) < p ** 2).long()  # miscalibrated
    two = torch.stack([1 - p, p], -1)
    theirs = _netcal("l1", 15, two.numpy(), y.numpy())
    assert abs(float(cal.ece(p, y)) - theirs) <= 1e-12
    assert abs(float(cal.ece(two, y)) - theirs) > 1e-3
    assert not math.isclose(float(cal.ece(two, y)), float(cal.ece(p, y)))
