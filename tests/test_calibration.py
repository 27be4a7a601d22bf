"""pyfastbayes.calibration: metrics against a float64 numpy reference, edge bins, bad input,
statistics, recalibration, streaming. Elsewhere: the binning op (test_ops_calibration.py), the
peers torchmetrics and netcal (test_calibration_peers.py), one validation path
(test_calibration_validation.py), recalibration edge cases (test_calibration_recalibration.py),
sync under torch.distributed (test_calibration_dist.py)."""
import math
from fractions import Fraction

import numpy as np
import pytest

from _helpers import require
import torch

from _helpers import ALL_DTYPES
from pyfastbayes import _native, _reference, calibration as cal, ops
from pyfastbayes.calibration._checks import as_3d


# ---------------------------------------------------------------------------------------------
# an independent float64 numpy reference
# ---------------------------------------------------------------------------------------------
def np_bin(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin k = {x : k <= x * B < k + 1} exactly (last bin closed); exact arithmetic on edges."""
    p = x * n_bins
    k = np.floor(p)
    for i in np.flatnonzero(k == p):  # the rounded product sits on an edge: decide exactly
        k[i] = math.floor(Fraction(float(x[i])) * n_bins)
    return np.clip(k, 0, n_bins - 1).astype(np.int64)


def np_error(conf: np.ndarray, hit: np.ndarray, bin_of: np.ndarray, n_bins: int, norm: str) -> float:
    n = len(conf)
    total, worst = 0.0, 0.0
    for b in range(n_bins):
        m = bin_of == b
        if not m.any():
            continue
        gap = abs(hit[m].mean() - conf[m].mean())
        worst = max(worst, gap)
        total += m.sum() / n * (gap if norm == "l1" else gap * gap)
    return {"l1": total, "l2": math.sqrt(total), "max": worst}[norm]


def np_ece(probs, targets, n_bins=15, norm="l1", binning="uniform", classwise=False, from_logits=False):
    """ECE in float64 numpy. Binary [N] inputs: p of class 1 against y == 1 (positive class)."""
    x = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets)
    binary = x.ndim == 1
    if binary:
        x = np.stack([np.zeros_like(x), x], -1) if from_logits else np.stack([1 - x, x], -1)
    if x.ndim == 2:
        x = x[None]
    if from_logits:
        e = np.exp(x - x.max(-1, keepdims=True))
        x = e / e.sum(-1, keepdims=True)
    avg = x.mean(0)
    n, c = avg.shape
    if classwise:
        cols = [(avg[:, j], (y == j).astype(np.float64)) for j in range(c)]
    elif binary:
        cols = [(avg[:, 1], (y == 1).astype(np.float64))]
    else:
        pred = avg.argmax(-1)
        cols = [(avg[np.arange(n), pred], (pred == y).astype(np.float64))]
    errs = []
    for conf, hit in cols:
        if binning == "uniform":
            bin_of = np_bin(conf, n_bins)
        else:
            order = np.argsort(conf, kind="stable")
            bin_of = np.empty(n, dtype=np.int64)
            for b, chunk in enumerate(np.array_split(order, n_bins)):
                bin_of[chunk] = b
        errs.append(np_error(conf, hit, bin_of, n_bins, norm))
    return float(np.mean(errs))


def rand_probs(*shape, scale=2.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, dtype=torch.float64) * scale).softmax(-1).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# the binning op: its contract (op vs reference over devices x dtypes x S x logits x classwise,
# non-contiguous and empty input, opcheck, row diagnostics) is tested in test_ops_calibration.py
# ---------------------------------------------------------------------------------------------
def test_fallback_without_native(monkeypatch):
    p, y = rand_probs(3, 300, 4, dtype=torch.float64), torch.randint(0, 4, (300,))
    expected = cal.ece(p, y)
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    assert ops.native_op("calibration_bins", "cpu") is None
    torch.testing.assert_close(cal.ece(p, y), expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# ece against the numpy reference (the peers: test_calibration_peers.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
@pytest.mark.parametrize("classwise", [False, True])
@pytest.mark.parametrize("shape", [(503, 5), (4, 503, 5), (503,)])
def test_ece_matches_numpy(norm, binning, classwise, shape):
    """N = 503: not a multiple of n_bins, so equal-mass bins differ in size (the first 3 longer)."""
    p = torch.rand(shape, dtype=torch.float64) if len(shape) == 1 else rand_probs(*shape, dtype=torch.float64)
    y = torch.randint(0, 2 if len(shape) == 1 else shape[-1], (503,))
    got = cal.ece(p, y, n_bins=10, norm=norm, binning=binning, classwise=classwise)
    want = np_ece(p.numpy(), y.numpy(), 10, norm, binning, classwise)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) - want) <= 1e-12


@pytest.mark.parametrize("S", [1, 5])
def test_ece_from_logits_matches_numpy(S):
    x = torch.randn(S, 400, 6, dtype=torch.float64) * 3
    y = torch.randint(0, 6, (400,))
    got = cal.ece(x, y, from_logits=True, classwise=True)
    assert abs(float(got) - np_ece(x.numpy(), y.numpy(), 15, classwise=True, from_logits=True)) <= 1e-12
    torch.testing.assert_close(cal.ece(x, y, from_logits=True), cal.ece(x.softmax(-1), y), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# edges
# ---------------------------------------------------------------------------------------------
def _bins_of(probs, targets, n_bins, **kw):
    return ops.calibration_bins(as_3d(probs, False), targets, n_bins, **kw)[0]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_confidence_one_and_zero_land_in_end_bins(dtype):
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    y = torch.tensor([0, 0])
    bins = _bins_of(p, y, 15)
    assert bins[14].tolist() == [2.0, 2.0, 1.0] and bins[:14].sum() == 0  # conf 1 -> last bin
    cw = _bins_of(p, y, 15, classwise=True)
    assert cw[:, 0, 0].tolist() == [1.0, 1.0] and cw[:, 14, 0].tolist() == [1.0, 1.0]  # p_c = 0 -> bin 0
    assert float(cal.ece(p, y)) == pytest.approx(0.5)


def test_exact_edges_go_to_the_upper_bin():
    # dyadic edges are exact in binary: 0.25, 0.5, 0.75 for 4 bins -> bins 1, 2, 3
    conf = torch.tensor([0.25, 0.5, 0.75, 0.2499999999999999, 0.7500000000000001], dtype=torch.float64)
    p = torch.stack([conf, 1 - conf], -1)  # class 0 has the confidence (>= 0.5 for the top label)
    cw = _bins_of(p, torch.zeros(5, dtype=torch.long), 4, classwise=True)[0, :, 0]
    assert cw.tolist() == [1.0, 1.0, 1.0, 2.0]
    # k / 15 rounded to double lies a hair above or below the true edge: the exact rule decides
    for n_bins in (3, 10, 15, 7):
        edges = torch.tensor([k / n_bins for k in range(1, n_bins)], dtype=torch.float64)
        want = np_bin(edges.numpy(), n_bins)
        got = _reference.uniform_bin(edges, n_bins)
        assert got.tolist() == want.tolist()
        p = torch.stack([edges, 1 - edges], -1)
        cw = _bins_of(p, torch.zeros(len(edges), dtype=torch.long), n_bins, classwise=True)[0, :, 0]
        assert cw.tolist() == np.bincount(want, minlength=n_bins).astype(float).tolist()
        # every edge is within one ulp of its bin boundary, so both neighbours occur
        assert set((got - torch.arange(1, n_bins)).tolist()) <= {0, -1}


def test_float32_edges_rule():
    edges32 = torch.tensor([k / 15 for k in range(1, 15)], dtype=torch.float32)
    got = _reference.uniform_bin(edges32.double(), 15)
    assert got.tolist() == np_bin(edges32.double().numpy(), 15).tolist()
    p = torch.stack([edges32, 1 - edges32], -1)
    cw = _bins_of(p, torch.zeros(14, dtype=torch.long), 15, classwise=True)[0, :, 0]
    assert cw.tolist() == np.bincount(got.numpy(), minlength=15).astype(float).tolist()


def test_ties_pick_the_lowest_class():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4]], dtype=torch.float64)
    assert float(cal.accuracy(p, torch.tensor([0, 1]))) == 1.0
    assert float(cal.accuracy(p, torch.tensor([1, 2]))) == 0.0
    bins = _bins_of(p, torch.tensor([0, 2]), 10)
    assert bins[5].tolist() == [1.0, 0.5, 1.0] and bins[4].tolist() == [1.0, 0.4, 0.0]
    assert abs(float(cal.ece(p, torch.tensor([0, 2]), n_bins=10)) - 0.45) < 1e-12


def test_single_point_and_empty_bins():
    p = torch.tensor([[0.1, 0.9]])
    assert float(cal.ece(p, torch.tensor([1]))) == pytest.approx(0.1)
    assert float(cal.ece(p, torch.tensor([0]))) == pytest.approx(0.9)
    # three filled bins, twelve empty: MCE ignores empty bins, l1 weights by counts. The double
    # 0.6 is 0.59999999999999997..., just below the edge 9/15, so it lands in bin 8 (exact rule)
    p = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    assert _bins_of(p, y, 15)[:, 0].nonzero().flatten().tolist() == [8, 10, 14]
    assert float(cal.ece(p, y, norm="max")) == pytest.approx(0.6)
    assert float(cal.ece(p, y)) == pytest.approx((0.05 + 0.6 + 0.3) / 3)
    assert float(cal.ece(p, y, norm="l2")) == pytest.approx(math.sqrt((0.05**2 + 0.6**2 + 0.3**2) / 3))
    # equal-mass bins with N = 3 < 15: one point per bin, the rest empty
    assert float(cal.ece(p, y, binning="adaptive", n_bins=15)) == pytest.approx((0.05 + 0.6 + 0.3) / 3)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def expected_ece(p: np.ndarray, q: np.ndarray, n_bins: int) -> tuple[float, float]:
    """Mean and standard deviation of the uniform-bin l1 ECE of points with probabilities p
    (binned) and labels y ~ Bernoulli(q), given p. Per bin the gap Z_b = mean_b(y - p) is a mean
    of n_b independent terms: ~ N(mu_b, s_b^2), mu_b = mean_b(q - p), s_b^2 = sum_b q(1 - q) / n_b^2
    (CLT; n_b >= 60 here); E|Z_b| is the folded-normal mean; the bins are independent, so
    E[ECE] = sum_b w_b E|Z_b| and Var[ECE] = sum_b w_b^2 Var|Z_b| with w_b = n_b / N. Checked by
    Monte Carlo (2000 repetitions, N = 1000): mean and sd within 1%."""
    bin_of = np_bin(p, n_bins)
    N, mean, var = len(p), 0.0, 0.0
    for b in range(n_bins):
        m = bin_of == b
        n_b = int(m.sum())
        if not n_b:
            continue
        mu = float((q[m] - p[m]).mean())
        s = math.sqrt(float((q[m] * (1 - q[m])).sum())) / n_b
        e_abs = s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * math.erf(mu / (s * math.sqrt(2)))
        w = n_b / N
        mean += w * e_abs
        var += w * w * (mu * mu + s * s - e_abs * e_abs)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("truth", ["calibrated", "p^2"])
def test_ece_of_known_miscalibration_and_it_shrinks_with_n(truth):
    """Binary [N] points with y ~ Bernoulli(q): q = p is calibrated (ECE is pure noise, shrinking
    like sqrt(B / N)), q = p^2 is over-confident (ECE -> 1/6 minus binning). The ECE must lie within
    4 sd of its expectation (expected_ece; two-sided normal tail 6e-5 per N, fixed seed). The old
    bound, 3 x sqrt(B / N) / 2 (Cauchy-Schwarz and Markov), sat 3.4 to 5.4x above the observed
    calibrated values and had no lower side."""
    g = torch.Generator().manual_seed(1234)
    B, values = 15, []
    for N in (1_000, 10_000, 100_000):
        p = torch.rand(N, generator=g, dtype=torch.float64)
        q = p if truth == "calibrated" else p * p
        y = (torch.rand(N, generator=g, dtype=torch.float64) < q).long()
        e = float(cal.ece(p, y, n_bins=B))
        mean, sd = expected_ece(p.numpy(), q.numpy(), B)
        assert abs(e - mean) <= 4 * sd, (N, e, mean, sd)
        values.append(e)
    if truth == "calibrated":
        assert values[-1] < values[0]
        assert values[-1] <= 3 * 0.5 * math.sqrt(B / 100_000)  # the old, looser bound still holds


def _synthetic_logits(N, C, T0, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, C, generator=g, dtype=torch.float64) * 2.0  # calibrated logits
    y = torch.multinomial(u.softmax(-1), 1, generator=g).squeeze(1)
    return u * T0, y, u


def temperature_sd(z: torch.Tensor, u: torch.Tensor) -> float:
    """Standard deviation of the MLE of beta = 1/T for observed logits z [N, C] whose calibrated
    version is u (labels ~ softmax(u)): 1 / sqrt(N * Fisher), Fisher = mean Var_p[z] at the truth."""
    p = u.softmax(-1)
    fisher = float((p * (z - (p * z).sum(-1, keepdim=True)) ** 2).sum(-1).mean())
    return 1 / math.sqrt(z.shape[0] * fisher)


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_temperature_scaling_recovers_temperature(method):
    T0, N = 2.5, 100_000  # sd of 1/T: 0.3%, so a 2% error in T is 6 sd away
    z, y, u = _synthetic_logits(N, 10, T0, seed=7)
    ts = cal.TemperatureScaling(method=method).fit(z.float(), y)
    beta = 1 / float(ts.temperature)
    sd = temperature_sd(z, u)
    assert abs(beta - 1 / T0) <= 4 * sd, (beta, 1 / T0, sd)  # two-sided normal tail 6e-5
    calibrated = ts.transform(z)
    assert float(cal.nll(calibrated, y, from_logits=True)) < float(cal.nll(z, y, from_logits=True))
    assert float(cal.ece(calibrated, y, from_logits=True)) < float(cal.ece(z, y, from_logits=True))


def vector_scaling_sd(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """Standard deviations of the vector-scaling MLE (w [C], and b_c - b_0 for c >= 1: softmax is
    blind to a shift of every b_c) from the inverse Hessian of the total NLL at the fit."""
    C = w.shape[0]

    def total_nll(theta):
        wt, d = theta[:C], theta[C:]
        bt = torch.cat([d.new_zeros(1), d])
        return torch.nn.functional.cross_entropy(z * wt + bt, y, reduction="sum")

    theta = torch.cat([w, b[1:] - b[0]])
    cov = torch.linalg.inv(torch.autograd.functional.hessian(total_nll, theta))
    sd = cov.diagonal().sqrt()
    return sd[:C], sd[C:]


def test_temperature_methods_agree_and_vector_scaling():
    z, y, _ = _synthetic_logits(5000, 4, 0.5, seed=3)
    a = cal.TemperatureScaling("newton").fit(z, y).temperature
    b = cal.TemperatureScaling("lbfgs").fit(z, y).temperature
    assert abs(float(a) - float(b)) <= 1e-6
    vs = cal.VectorScaling().fit(z, y)
    assert vs.weight.shape == (4,) and vs.bias.shape == (4,)
    # the temperature model is inside the vector model: NLL no worse, and w close to 1/T0 = 2:
    # within 4 sd of the MLE (was: atol 0.25, 3x the largest observed deviation)
    nll_t = float(cal.nll(z / a, y, from_logits=True))
    assert float(cal.nll(vs.transform(z), y, from_logits=True)) <= nll_t + 1e-9
    sd_w, sd_d = vector_scaling_sd(z, y, vs.weight, vs.bias)
    assert ((vs.weight - 2.0).abs() <= 4 * sd_w).all(), (vs.weight, sd_w)
    assert ((vs.bias[1:] - vs.bias[0]).abs() <= 4 * sd_d).all(), (vs.bias, sd_d)  # true biases: 0
    assert vs.transform(z.float()).dtype == torch.float32


def test_vector_scaling_recovers_weights_and_biases():
    """Calibrated logits u = w0 * z + b0 with unequal w0 and b0: the fit recovers both (biases up
    to a common shift) within 4 sd of the MLE."""
    g = torch.Generator().manual_seed(11)
    u = torch.randn(20_000, 4, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(u.softmax(-1), 1, generator=g).squeeze(1)
    w0 = torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    b0 = torch.tensor([1.0, -0.5, 0.0, 0.5], dtype=torch.float64)
    vs = cal.VectorScaling().fit((u - b0) / w0, y)
    sd_w, sd_d = vector_scaling_sd((u - b0) / w0, y, vs.weight, vs.bias)
    assert ((vs.weight - w0).abs() <= 4 * sd_w).all(), (vs.weight, sd_w)
    d, d0 = vs.bias[1:] - vs.bias[0], b0[1:] - b0[0]
    assert ((d - d0).abs() <= 4 * sd_d).all(), (d, d0, sd_d)


# ---------------------------------------------------------------------------------------------
# streaming state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classwise", [False, True])
def test_streaming_equals_one_shot(classwise):
    p, y = rand_probs(3, 1000, 6, dtype=torch.float64), torch.randint(0, 6, (1000,))
    m = cal.CalibrationError(n_bins=12, norm="l2", classwise=classwise, num_classes=6 if classwise else None)
    for i in range(0, 1000, 300):
        m.update(p[:, i:i + 300], y[i:i + 300])
    assert m.state.shape == ((6, 12, 3) if classwise else (12, 3))  # O(bins), not O(N)
    torch.testing.assert_close(m.compute(), cal.ece(p, y, n_bins=12, norm="l2", classwise=classwise),
                               rtol=1e-12, atol=1e-14)
    m.reset()
    with pytest.raises(RuntimeError, match="before any data"):
        m.compute()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        m.sync()


# ---------------------------------------------------------------------------------------------
# other metrics
# ---------------------------------------------------------------------------------------------
def test_nll_brier_accuracy_against_sklearn_and_numpy():
    sk = require("sklearn.metrics")
    p, y = rand_probs(4, 600, 5, dtype=torch.float64), torch.randint(0, 5, (600,))
    pbar = p.mean(0).numpy()
    assert abs(float(cal.nll(p, y)) - sk.log_loss(y.numpy(), pbar, labels=range(5))) <= 1e-10
    x = torch.randn(4, 600, 5, dtype=torch.float64)
    want = sk.log_loss(y.numpy(), x.softmax(-1).mean(0).numpy(), labels=range(5))
    assert abs(float(cal.nll(x, y, from_logits=True)) - want) <= 1e-10
    onehot = np.eye(5)[y.numpy()]
    assert abs(float(cal.brier(p, y)) - ((pbar - onehot) ** 2).sum(1).mean()) <= 1e-12
    assert float(cal.accuracy(p, y)) == (pbar.argmax(1) == y.numpy()).mean()
    pb, yb = torch.rand(300, dtype=torch.float64), torch.randint(0, 2, (300,))
    assert abs(float(cal.brier(pb, yb)) - sk.brier_score_loss(yb.numpy(), pb.numpy())) <= 1e-12
    assert abs(float(cal.nll(pb, yb)) - sk.log_loss(yb.numpy(), pb.numpy())) <= 1e-10


def test_entropies_and_mutual_information():
    p = rand_probs(6, 200, 4, dtype=torch.float64)
    pbar = p.mean(0)
    h = -(pbar * pbar.log()).sum(-1)
    eh = -(p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(cal.predictive_entropy(p), h)
    torch.testing.assert_close(cal.expected_entropy(p), eh)
    torch.testing.assert_close(cal.mutual_information(p), h - eh)
    assert (cal.mutual_information(p) > 0).all()
    same = p[:1].expand(5, -1, -1)  # identical draws: no epistemic uncertainty
    assert float(cal.mutual_information(same).abs().max()) <= 1e-12
    # two confident draws that disagree: H[pbar] = log 2, E H = 0, MI = log 2
    two = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert float(cal.mutual_information(two)) == pytest.approx(math.log(2))
    torch.testing.assert_close(cal.predictive_entropy(p.log(), from_logits=True), h)


def test_ood_auroc_against_sklearn():
    sk = require("sklearn.metrics")
    s_in = torch.randint(0, 20, (300,)).double()  # many ties
    s_out = torch.randint(5, 30, (200,)).double()
    want = sk.roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[s_in.numpy(), s_out.numpy()])
    assert abs(float(cal.ood_auroc(s_in, s_out)) - want) <= 1e-12
    assert float(cal.ood_auroc(torch.zeros(3), torch.ones(2))) == 1.0
    assert float(cal.ood_auroc(torch.ones(3), torch.ones(2))) == 0.5


def test_reliability_diagram(monkeypatch):
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: (_ for _ in ()).throw(AssertionError("show() called")))
    p, y = rand_probs(500, 3), torch.randint(0, 3, (500,))
    fig = cal.reliability_diagram(p, y, n_bins=10)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    main = fig.axes[0]
    bins = ops.calibration_bins(p[None], y, 10)[0]
    n_filled = int((bins[:, 0] > 0).sum())
    assert len(main.patches) == 2 * n_filled  # accuracy bars + gap shading
    heights = sorted(r.get_height() for r in main.patches[:n_filled])
    acc = (bins[:, 2] / bins[:, 0])[bins[:, 0] > 0]
    assert np.allclose(heights, sorted(acc.tolist()))
    plt.close(fig)
    fig, ax = plt.subplots()
    assert cal.reliability_diagram(p, y, ax=ax) is fig
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
P = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
Y = torch.tensor([1, 0])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(probs=torch.tensor([[0.2, 0.9], [0.6, 0.4]])), ValueError, "probs rows must sum to 1"),
    (dict(probs=torch.tensor([[-0.2, 1.2], [0.6, 0.4]])), ValueError, "probs must be non-negative"),
    (dict(probs=torch.tensor([1.2, 0.5])), ValueError, "probs must be non-negative"),
    (dict(probs=torch.tensor([[float("nan"), 1.0], [0.6, 0.4]])), ValueError, "probs has NaN"),
    (dict(targets=torch.tensor([1, 2])), ValueError, r"targets must lie in \[0, 2\)"),
    (dict(targets=torch.tensor([-1, 0])), ValueError, "targets must lie"),
    (dict(targets=torch.tensor([1, 0, 1])), ValueError, "targets has N = 3 .* N = 2"),
    (dict(targets=torch.tensor([1.0, 0.0])), TypeError, "targets must hold integer"),
    (dict(targets=[1, 0]), TypeError, "targets must be a torch.Tensor"),
    (dict(probs=np.ones((2, 2)) / 2), TypeError, "probs must be a torch.Tensor"),
    (dict(probs=torch.ones(2, 2, dtype=torch.long)), TypeError, "probs must be a floating"),
    (dict(probs=torch.ones(1, 1, 2, 2) / 2), ValueError, r"probs must be \[N\]"),
    (dict(probs=torch.ones(2, 1)), ValueError, "C >= 2"),
    (dict(n_bins=0), ValueError, "n_bins must be in"),
    (dict(n_bins=2.5), TypeError, "n_bins must be an int"),
    (dict(norm="l3"), ValueError, "norm must be one of"),
    (dict(binning="quantile"), ValueError, "binning must be one of"),
    (dict(probs=torch.empty(0, 2), targets=torch.empty(0, dtype=torch.long)), ValueError, "N = 0"),
])
def test_ece_bad_input(kwargs, exc, match):
    args = dict(probs=P, targets=Y)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cal.ece(**args)


def test_bad_input_elsewhere():
    # opt-out works: the unchecked rows are binned as they are (row 0 sums to 1.1, confidence 0.9)
    bad = torch.tensor([[0.2, 0.9], [0.6, 0.4]], dtype=torch.float64)
    got = float(cal.ece(bad, Y, validate=False))
    assert abs(got - np_ece(bad.numpy(), Y.numpy())) <= 1e-15 and abs(got - (0.1 + 0.4) / 2) <= 1e-15
    with pytest.raises(ValueError, match="probs rows must sum"):
        cal.nll(torch.tensor([[0.2, 0.9]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="targets must lie"):
        cal.brier(P, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="num_classes"):
        cal.CalibrationError(classwise=True)
    with pytest.raises(ValueError, match="num_classes = 3"):
        cal.CalibrationError(classwise=True, num_classes=3).update(P, Y)
    with pytest.raises(ValueError, match="scores_out must be a non-empty"):
        cal.ood_auroc(torch.rand(3), torch.rand(0))
    with pytest.raises(ValueError, match="logits must be"):
        cal.TemperatureScaling().fit(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="method must be"):
        cal.TemperatureScaling(method="grid")
    with pytest.raises(RuntimeError, match="before fit"):
        cal.VectorScaling().transform(torch.randn(2, 3))


def test_ood_auroc_compares_large_integer_scores_exactly():
    """Integer scores beyond 2^53 are distinct in int64, not tied after a float64 cast."""
    from pyfastbayes.calibration import ood_auroc

    big = 2**53
    assert ood_auroc(torch.tensor([big + 1]), torch.tensor([big])).item() == 0.0
    assert ood_auroc(torch.tensor([big]), torch.tensor([big + 1])).item() == 1.0
    assert ood_auroc(torch.tensor([big, big + 1]), torch.tensor([big + 1])).item() == 0.75
    assert ood_auroc(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.5])).item() == 0.5
