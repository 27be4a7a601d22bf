"""Mode connectivity (pyfastbayes.landscape.curves): Bezier curves and polygonal chains between two
networks, their ends, basis, gradients, training and evaluation, and the refused inputs."""
import math

import pytest
import torch
from torch import nn

from _helpers import recompute_bn_
from pyfastbayes.landscape.curves import BezierCurve, PolyChain, bezier_basis, linear_path, plot_curve

LOSS = nn.CrossEntropyLoss()


def _mlp(seed: int, hidden: int = 32, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 3)).to(dtype)


def _spiral(n: int = 100, k: int = 3, seed: int = 0):
    """k interleaved noisy spiral arms of n points each: x [k n, 2] float32, y [k n] int64."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(k):
        r = torch.linspace(0.1, 1, n, dtype=torch.float64)
        th = c * 2 * math.pi / k + 4 * r + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
        xs.append(torch.stack([r * th.cos(), r * th.sin()], 1))
        ys.append(torch.full((n,), c))
    return torch.cat(xs).float(), torch.cat(ys)


def _trained(seed: int, x, y, steps: int = 400) -> nn.Module:
    m = _mlp(seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        LOSS(m(x), y).backward()
        opt.step()
    return m


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# ---- geometry -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,n_bends", [(BezierCurve, 0), (BezierCurve, 1), (BezierCurve, 3), (PolyChain, 1),
                                         (PolyChain, 2)])
def test_endpoints_reproduce_the_models_exactly(cls, n_bends):
    a, b = _mlp(0), _mlp(1)
    curve = cls(a, b, n_bends)
    with torch.no_grad():  # move the bends off the line: the ends must not depend on them
        for p in curve.bends:
            p.add_(torch.randn_like(p))
    assert torch.equal(curve.point(0.0), _flat(a))
    assert torch.equal(curve.point(1), _flat(b))
    assert torch.equal(curve.point(torch.tensor(1.0)), _flat(b))
    x = torch.randn(7, 2)
    with torch.no_grad():
        assert torch.equal(curve(x, 0.0), a(x))
        assert torch.equal(curve(x, 1.0), b(x))


def test_bezier_basis_against_closed_form():
    t = 0.3
    assert torch.allclose(bezier_basis(t, 1), torch.tensor([0.7, 0.3], dtype=torch.float64))
    assert torch.allclose(bezier_basis(t, 2), torch.tensor([0.49, 0.42, 0.09], dtype=torch.float64))
    assert torch.allclose(bezier_basis(t, 3), torch.tensor([0.343, 0.441, 0.189, 0.027], dtype=torch.float64))
    ts = torch.linspace(0, 1, 11)
    B = bezier_basis(ts, 4)
    assert B.shape == (11, 5) and B.dtype == torch.float64
    assert torch.allclose(B.sum(1), torch.ones(11, dtype=torch.float64))
    assert torch.equal(B[0], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(B[-1], torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    for i, s in enumerate(ts.tolist()):
        for k in range(5):
            assert B[i, k].item() == pytest.approx(math.comb(4, k) * s ** k * (1 - s) ** (4 - k), abs=1e-15)


def test_quadratic_bezier_point_matches_formula():
    a, b = _mlp(0), _mlp(1)
    curve = BezierCurve(a, b, 1)
    with torch.no_grad():
        curve.bends[0].copy_(torch.randn_like(curve.bends[0]))
    A, B, C = _flat(a), curve.bends[0].detach(), _flat(b)
    for t in (0.1, 0.5, 0.77):
        want = (1 - t) ** 2 * A + 2 * t * (1 - t) * B + t ** 2 * C
        assert torch.allclose(curve.point(t).detach(), want, atol=1e-6)


def test_polychain_passes_through_its_bends():
    a, b = _mlp(0), _mlp(1)
    chain = PolyChain(a, b, 2)
    with torch.no_grad():
        for p in chain.bends:
            p.copy_(torch.randn_like(p))
    assert torch.equal(chain.point(1 / 3).detach(), chain.bends[0].detach())
    assert torch.allclose(chain.point(2 / 3).detach(), chain.bends[1].detach(), atol=1e-6)
    mid = 0.5 * (chain.bends[0] + chain.bends[1]).detach()
    assert torch.allclose(chain.point(0.5).detach(), mid, atol=1e-6)


def test_bends_start_on_the_line_and_line_is_linear_interpolation():
    a, b = _mlp(0, dtype=torch.float64), _mlp(1, dtype=torch.float64)
    A, B = _flat(a), _flat(b)
    line = linear_path(a, b)
    assert line.n_bends == 0 and list(line.parameters()) == []
    x = torch.randn(5, 2, dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        want = (1 - t) * A + t * B
        assert torch.allclose(line.point(t), want, rtol=0, atol=1e-14)
        # the model at the interpolated weights, built the ordinary way
        m = _mlp(0, dtype=torch.float64)
        torch.nn.utils.vector_to_parameters(want, m.parameters())
        with torch.no_grad():
            assert torch.allclose(line(x, t), m(x), rtol=0, atol=1e-12)
    # freshly built curves lie on the line too
    for cls in (BezierCurve, PolyChain):
        c = cls(a, b, 3)
        for t in (0.2, 0.6):
            assert torch.allclose(c.point(t).detach(), line.point(t), atol=1e-12)


def test_gradients_reach_only_the_bends():
    a, b = _mlp(0), _mlp(1)
    curve = BezierCurve(a, b, 2)
    assert [id(p) for p in curve.parameters()] == [id(p) for p in curve.bends]
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    LOSS(curve(x, 0.4), y).backward()
    for p in curve.bends:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in list(a.parameters()) + list(b.parameters()):
        assert p.grad is None
    assert not curve.theta_a.requires_grad and not curve.theta_b.requires_grad
    # the chain rule through theta(t): d loss / d bend_k = B_k(t) * d loss / d theta
    theta = curve.point(0.4).detach().requires_grad_(True)
    out = torch.func.functional_call(a, curve.layout.unflatten(theta), (x,))
    LOSS(out, y).backward()
    w = bezier_basis(0.4, 3)
    for k, p in enumerate(curve.bends, start=1):
        assert torch.allclose(p.grad, float(w[k]) * theta.grad, atol=1e-7)


# ---- training and evaluation ---------------------------------------------------------------------------
@pytest.mark.slow  # ~4 s alone on 2 cores, more under load
def test_trained_bezier_has_lower_max_loss_than_the_line():
    x, y = _spiral()
    a, b = _trained(1, x, y), _trained(2, x, y)
    ts = torch.linspace(0, 1, 21)
    line = linear_path(a, b).evaluate(ts, LOSS, (x, y))
    curve = BezierCurve(a, b, 1)
    hist = curve.fit(LOSS, (x, y), epochs=300, lr=0.01, generator=torch.Generator().manual_seed(0), progress=False)
    assert hist.shape == (300,) and hist.dtype == torch.float64
    res = curve.evaluate(ts, LOSS, (x, y))
    # the ends are the two models: same loss on both paths
    assert res["loss"][0] == line["loss"][0] and res["loss"][-1] == line["loss"][-1]
    # measured: line max ~0.87, curve max ~0.08 (ends ~1e-3)
    assert line["loss"].max() > 0.3
    assert res["loss"].max() < 0.5 * line["loss"].max()
    # a PolyChain also beats the line
    chain = PolyChain(a, b, 1)
    chain.fit(LOSS, (x, y), epochs=300, lr=0.01, generator=torch.Generator().manual_seed(0), progress=False)
    assert chain.evaluate(ts, LOSS, (x, y))["loss"].max() < 0.5 * line["loss"].max()
    ax = plot_curve(res, line)
    assert len(ax.lines) == 2
    import matplotlib.pyplot as plt
    plt.close(ax.figure)


def test_evaluate_is_reproducible_batched_and_restores_mode():
    x, y = _spiral(n=30)
    a, b = _mlp(0), _mlp(1)
    curve = BezierCurve(a, b, 1)
    with torch.no_grad():
        curve.bends[0].add_(0.1 * torch.randn_like(curve.bends[0]))
    a.train()
    acc = {"acc": lambda out, t: (out.argmax(1) == t).double().mean()}
    ts = [0.0, 0.3, 1.0]
    r1 = curve.evaluate(ts, LOSS, (x, y), metrics=acc)
    r2 = curve.evaluate(torch.tensor(ts, dtype=torch.float64), LOSS, (x, y), metrics=acc)
    assert a.training
    assert set(r1) == {"t", "loss", "acc"}
    for k in r1:
        assert r1[k].shape == (3,) and r1[k].dtype == torch.float64
        assert torch.equal(r1[k], r2[k])
    # unequal batches: the mean over all rows, not the mean of batch means
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    r3 = curve.evaluate(ts, LOSS, batches, metrics=acc)
    assert torch.allclose(r3["loss"], r1["loss"], atol=1e-6)
    assert torch.allclose(r3["acc"], r1["acc"], atol=1e-12)
    with torch.no_grad():
        assert r1["loss"][0].item() == pytest.approx(LOSS(a(x), y).item(), rel=1e-6)
    # chunks of t: the same values (each chunk reads the data once); a bad chunk size is refused
    for c in (1, 2):
        r4 = curve.evaluate(ts, LOSS, batches, metrics=acc, batch_points=c)
        torch.testing.assert_close(r4["loss"], r3["loss"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r4["acc"], r3["acc"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="batch_points"):
        curve.evaluate(ts, LOSS, batches, batch_points=0)


def test_fit_is_reproducible_with_a_generator():
    x, y = _spiral(n=20)
    a, b = _mlp(0), _mlp(1)
    runs = []
    for _ in range(2):
        c = PolyChain(a, b, 1)
        h = c.fit(LOSS, [(x[:30], y[:30]), (x[30:], y[30:])], epochs=3, lr=0.01,
                  generator=torch.Generator().manual_seed(5), progress=False)
        runs.append((h, c.bends[0].detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], PolyChain(a, b, 1).bends[0].detach())  # the bend moved
    # a custom optimizer over the bends
    c = BezierCurve(a, b, 1)
    c.fit(LOSS, (x, y), epochs=2, optimizer=torch.optim.SGD(c.parameters(), lr=0.1), progress=False)


# ---- refused inputs -------------------------------------------------------------------------------------
def test_bad_inputs():
    a, b = _mlp(0), _mlp(1)
    x, y = _spiral(n=5)
    with pytest.raises(ValueError, match="different trainable parameters.*tensor 0"):
        BezierCurve(a, _mlp(1, hidden=16))
    with pytest.raises(ValueError, match="different architectures"):
        BezierCurve(a, nn.Sequential(nn.Linear(2, 3)))
    other = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    with pytest.raises(ValueError, match="module '1'"):
        BezierCurve(a, other)
    with pytest.raises(ValueError, match="n_bends must be an int >= 0"):
        BezierCurve(a, b, -1)
    with pytest.raises(ValueError, match="n_bends must be an int >= 1"):
        PolyChain(a, b, 0)
    with pytest.raises(ValueError, match="n_bends"):
        BezierCurve(a, b, 1.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        BezierCurve(a, "b")
    curve = BezierCurve(a, b, 1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            curve.point(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curve.evaluate([0.0, 2.0], LOSS, (x, y))
    with pytest.raises(TypeError):
        curve.point(True)
    with pytest.raises(ValueError, match="empty"):
        curve.evaluate([], LOSS, (x, y))
    with pytest.raises(ValueError, match="no rows"):
        curve.evaluate([0.5], LOSS, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="no rows"):
        curve.fit(LOSS, (x[:0], y[:0]), lr=0.1, progress=False)
    with pytest.raises(ValueError, match="no rows"):
        curve.evaluate([0.5], LOSS, [])
    with pytest.raises(TypeError, match="one-shot"):
        curve.evaluate([0.5], LOSS, iter([(x, y)]))
    with pytest.raises(ValueError, match="lr"):
        curve.fit(LOSS, (x, y), progress=False)
    with pytest.raises(ValueError, match="not both"):
        curve.fit(LOSS, (x, y), lr=0.1, optimizer=torch.optim.SGD(curve.parameters(), lr=0.1), progress=False)
    with pytest.raises(ValueError, match="none of the curve's bends"):
        curve.fit(LOSS, (x, y), optimizer=torch.optim.SGD(a.parameters(), lr=0.1), progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        linear_path(a, b).fit(LOSS, (x, y), lr=0.1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        curve.fit(LOSS, (x, y), epochs=0, lr=0.1, progress=False)


def test_refuses_other_running_statistics_integer_and_differing_frozen_tensors():
    def inorm(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 4), nn.Unflatten(1, (1, 4)), nn.InstanceNorm1d(1, track_running_stats=True),
                             nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="InstanceNorm1d.*running statistics.*track_running_stats=False"):
        BezierCurve(inorm(0), inorm(1))

    class WithInt(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)
            self.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)

        def forward(self, x):
            return self.lin(x)
    with pytest.raises(TypeError, match="floating-point"):
        BezierCurve(WithInt(), WithInt())

    a, b = _mlp(0), _mlp(1)
    a[0].weight.requires_grad_(False)
    b[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'0.weight' differs"):
        BezierCurve(a, b)
    b[0].weight.data.copy_(a[0].weight.data)  # equal frozen tensors are fine: taken from model_a
    c = BezierCurve(a, b, 1)
    assert c.layout.numel == sum(p.numel() for p in a.parameters() if p.requires_grad)


# ---- BatchNorm: batch statistics in fit, statistics recomputed per t in evaluate ---------------------------
def _bn_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                         nn.Tanh(), nn.Linear(16, 3))


def _bn_trained(seed: int, x, y) -> nn.Module:
    m = _bn_mlp(seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for i in range(60):
        opt.zero_grad()
        LOSS(m(x[i % 3::3]), y[i % 3::3]).backward()
        opt.step()
    return m.eval()


def _at(curve, t) -> nn.Module:
    """A fresh copy of model_a with the curve's parameters at t (the reference, one model per t)."""
    import copy
    m = copy.deepcopy(curve.template)
    torch.nn.utils.vector_to_parameters(curve.point(t).detach(), [p for p in m.parameters() if p.requires_grad])
    return m


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_batchnorm_curve_recomputes_statistics_per_t():
    x, y = _spiral(60)
    a, b = _bn_trained(0, x, y), _bn_trained(1, x, y)
    state_a, state_b = _state(a), _state(b)
    assert not torch.equal(state_a["1.running_mean"], state_b["1.running_mean"])  # different ends: allowed
    curve = BezierCurve(a, b, 1)
    with torch.no_grad():
        curve.bends[0].add_(0.3 * torch.randn_like(curve.bends[0]))
    data = [(x[:100], y[:100]), (x[100:], y[100:])]
    bn_data = [(x[::2], y[::2]), (x[1::2], y[1::2])]
    ts = [0.0, 0.3, 0.5, 1.0]
    acc = lambda out, t: (out.argmax(-1) == t).double().mean()  # noqa: E731
    res = curve.evaluate(ts, LOSS, data, {"acc": acc}, batch_points=3, bn_data=bn_data)
    for i, t in enumerate(ts):
        ref = recompute_bn_(_at(curve, t), bn_data)
        with torch.no_grad():
            want = sum(float(LOSS(ref(xb), yb)) * len(yb) for xb, yb in data) / len(y)
            want_acc = sum(float(acc(ref(xb), yb)) * len(yb) for xb, yb in data) / len(y)
        assert res["loss"][i].item() == pytest.approx(want, rel=1e-5), t
        assert res["acc"][i].item() == pytest.approx(want_acc, abs=1e-6), t
        stats = curve.bn_statistics(t, bn_data)
        assert sorted(stats) == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"]
        for k, v in stats.items():
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(curve(x, t, bn_stats=stats), ref(x), rtol=1e-5, atol=1e-5)
    # the statistics matter: with the ends' own running statistics the interior loss would differ
    with torch.no_grad():
        assert res["loss"][0].item() != pytest.approx(float(LOSS(a(x), y)), rel=1e-3)
    # without statistics an eval-mode forward at t refuses (the ends' statistics do not fit theta(t))
    with pytest.raises(ValueError, match=r"bn_stats=curve.bn_statistics\(t, data\)"):
        curve(x, 0.5)
    with pytest.raises(ValueError, match="bn_stats must be the dict"):
        curve(x, 0.5, bn_stats={"1.running_mean": torch.zeros(16)})
    # train mode: batch statistics, as a fresh copy in train mode; model_a's buffers untouched, and
    # so are given statistics
    curve.template.train()
    ref = _at(curve, 0.5).train()
    given = {k: v.clone() for k, v in stats.items()}
    with torch.no_grad():
        torch.testing.assert_close(curve(x, 0.5), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(curve(x, 0.5, bn_stats=given), ref(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(given[k], stats[k]) for k in stats)
    curve.template.eval()
    hist = curve.fit(LOSS, data, epochs=2, lr=0.01, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(hist).all()
    for m, st in ((a, state_a), (b, state_b)):
        assert all(torch.equal(v, st[k]) for k, v in m.state_dict().items()), "fit/evaluate changed an end model"
    assert not a.training  # mode restored


def test_batchnorm_curve_argument_checks():
    x, y = _spiral(20)
    curve = BezierCurve(_bn_mlp(0), _bn_mlp(1), 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        curve.evaluate([0.5], LOSS, (x, y), bn_data=loader)
    with pytest.raises(ValueError, match="at least 2 rows"):
        curve.evaluate([0.5], LOSS, (x, y), bn_data=[(x[:1], y[:1])])
    plain = BezierCurve(_mlp(0), _mlp(1), 1)
    with pytest.raises(ValueError, match="bn_data: the model has no BatchNorm"):
        plain.evaluate([0.5], LOSS, (x, y), bn_data=(x, y))
    with pytest.raises(ValueError, match="bn_stats: the model has no BatchNorm"):
        plain(x, 0.5, bn_stats={})
    assert plain.bn_statistics(0.5, (x, y)) == {}
