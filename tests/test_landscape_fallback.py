"""grid on models torch.vmap cannot batch over the points (one point at a time, with a warning) and
grid's output_fn; references: a fresh copy of the model per point, plain forward."""
import copy
import warnings

import pytest
import torch
from torch import nn

from _helpers import recompute_bn_
from pyfastbayes.landscape import BezierCurve, grid, interpolate, random_directions
from pyfastbayes.nn import ParamLayout


class _Recurrent(nn.Module):
    """An LSTM (no batching rule for aten::lstm) with a BatchNorm1d (or not) and a Linear head."""

    def __init__(self, bn=True):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(self.bn(out[:, -1]))


class _Branching(nn.Module):
    """Control flow on the point's weights and .item(): vmap refuses both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.a.weight.sum() > 0:
            h = h * 2
        return self.b(h) / (1 + float(self.b.weight.abs().max().item()))


class _Dict(nn.Module):
    """Outputs in a dict, [N, T, C] logits."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.lin(x)}


def _data(shape, n=(7, 5, 6), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, *shape, generator=g), torch.randint(0, 3, (k,), generator=g)) for k in n]


def _point(model, theta, data, recompute: bool):
    """A copy of the model at theta; recompute: BatchNorm statistics reset and recomputed over the
    data (momentum None, BatchNorm layers alone in train mode)."""
    m = copy.deepcopy(model)
    ParamLayout(m).write_(theta.float(), m)
    return recompute_bn_(m, data) if recompute else m.eval()


def _reference(model, loss_fn, data, d, axes, recompute=False, output_fn=lambda o: o):
    theta0 = ParamLayout(model).flatten().double()
    out = torch.zeros(*[len(a) for a in axes], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(len(a)) for a in axes]).reshape(-1, len(axes)):
        theta = theta0 + sum(axes[k][i].double() * d[k].double() for k, i in enumerate(idx))
        m = _point(model, theta, data, recompute)
        with torch.no_grad():
            tot = sum(float(loss_fn(output_fn(m(x)), y)) * len(y) for x, y in data)
        out[tuple(idx)] = tot / sum(len(y) for _, y in data)
    return out


def _grid_warned(*args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = grid(*args, **kwargs)
    fallback = [w for w in seen if "one point at a time" in str(w.message)]
    return res, fallback


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_lstm_grid_falls_back_to_one_point_at_a_time(bn):
    torch.manual_seed(0)
    model = _Recurrent()
    model.train()
    with torch.no_grad():  # running statistics away from the landscape data's
        model(torch.randn(16, 5, 4) * 2 + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data((5, 4))
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    axes = (torch.linspace(-1, 1, 3), torch.linspace(-0.5, 1, 3))
    # 2 points per chunk: 5 chunks, the last of 1 point; the warning comes once per call
    res, warned = _grid_warned(model, nn.CrossEntropyLoss(), data, d, axes, bn=bn, batch_points=2, progress=False)
    assert len(warned) == 1 and issubclass(warned[0].category, RuntimeWarning)
    assert "lstm" in str(warned[0].message)
    ref = _reference(model, nn.CrossEntropyLoss(), data, d, axes, recompute=bn == "recompute")
    torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-6)
    assert model.training  # mode and buffers as they were
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_control_flow_and_item_fall_back_with_metrics_and_row_blocks():
    torch.manual_seed(0)
    model = _Branching()
    data = _data((4,), n=(9, 4))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    axis = torch.linspace(-2, 2, 5)

    def acc(out, y):
        return (out.argmax(-1) == y).double().mean()
    res, warned = _grid_warned(model, nn.CrossEntropyLoss(), data, d, axis, metrics={"acc": acc}, batch_rows=3,
                               progress=False)
    assert len(warned) == 1
    torch.testing.assert_close(res.loss, _reference(model, nn.CrossEntropyLoss(), data, d, (axis,)), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(res.metrics["acc"], _reference(model, acc, data, d, (axis,)), rtol=0, atol=1e-6)


def test_the_warning_names_a_metric_that_cannot_be_batched():
    """A metric calling .item() (or output_fn) is what vmap cannot batch, not the model: the
    warning says so, and the values are still right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = _data((4,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    axis = torch.linspace(-1, 1, 3)

    def acc(out, y):
        return torch.tensor((out.argmax(-1) == y).double().mean().item())
    res, warned = _grid_warned(model, nn.CrossEntropyLoss(), data, d, axis, metrics={"acc": acc}, progress=False)
    assert len(warned) == 1 and "cannot batch metrics['acc'] over the points" in str(warned[0].message)
    torch.testing.assert_close(res.metrics["acc"], _reference(model, acc, data, d, (axis,)), rtol=0, atol=1e-6)

    def pick(out):
        return out[:, : int(out.shape[1] - out.sum().item() * 0)]  # .item(): data-dependent
    _, warned = _grid_warned(model, nn.CrossEntropyLoss(), data, d, axis, output_fn=pick, progress=False)
    assert len(warned) == 1 and "cannot batch output_fn over the points" in str(warned[0].message)
    branching = _Branching()
    _, warned = _grid_warned(branching, nn.CrossEntropyLoss(), data, random_directions(branching, 1), axis,
                             progress=False)
    assert len(warned) == 1 and "cannot batch this model" in str(warned[0].message)


def test_a_batchable_model_does_not_warn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    _, warned = _grid_warned(model, nn.CrossEntropyLoss(), _data((4,)), d, torch.linspace(-1, 1, 3), progress=False)
    assert warned == []


def test_errors_of_the_model_itself_are_raised_not_looped():
    # the plain forward fails too: its own error, no fallback warning
    torch.manual_seed(0)
    model = _Recurrent()
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail the test
        with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
            grid(model, nn.CrossEntropyLoss(), _data((5, 7)), d, torch.linspace(-1, 1, 3), progress=False)


def test_curve_and_interpolate_on_an_lstm():
    torch.manual_seed(0)
    a, b = _Recurrent(bn=False), _Recurrent(bn=False)
    data = _data((5, 4))
    with pytest.warns(RuntimeWarning, match="one point at a time"):
        line = interpolate(a, b, 3, nn.CrossEntropyLoss(), data, progress=False)
    with torch.no_grad():
        ends = [sum(float(nn.functional.cross_entropy(m(x), y)) * len(y) for x, y in data) / 18 for m in (a, b)]
    torch.testing.assert_close(line.loss[[0, -1]], torch.tensor(ends, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    curve = BezierCurve(a, b, n_bends=1)
    with pytest.warns(RuntimeWarning, match="one point at a time"):
        ev = curve.evaluate([0.0, 1.0], nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(ev["loss"], torch.tensor(ends, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_output_fn_selects_and_reshapes_the_outputs():
    torch.manual_seed(0)
    model = _Dict()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(k, 5, 4, generator=g), torch.randint(0, 3, (k, 5), generator=g)) for k in (6, 3)]
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    axes = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 4))
    pick = lambda out: out["logits"].transpose(1, 2)  # noqa: E731  [N, C, T] against [N, T] targets
    ce = nn.CrossEntropyLoss(ignore_index=2)  # rows counted by kept targets: blocks must weigh them so
    ref = _reference(model, ce, data, d, axes, output_fn=pick)
    for rows in (None, 2):
        res = grid(model, ce, data, d, axes, output_fn=pick, batch_rows=rows, progress=False)
        torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-6)
    line = interpolate(model, copy.deepcopy(model), 2, ce, data, output_fn=pick, progress=False)
    with torch.no_grad():
        at0 = sum(float(ce(pick(model(x)), y)) * len(y) for x, y in data) / 9
    torch.testing.assert_close(line.loss, torch.full((2,), at0, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="output_fn="):
        grid(model, ce, data, d, axes, progress=False)
    with pytest.raises(TypeError, match="output_fn must be None or callable"):
        grid(model, ce, data, d, axes, output_fn="logits", progress=False)


class _NormThenRecurrent(nn.Module):
    """A BatchNorm1d BEFORE the LSTM: the failed vmapped statistics pass had updated it already."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.rnn, self.head = nn.LSTM(6, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(self.bn(self.lin(x))[:, None])
        return self.head(out[:, -1])


def test_recompute_fallback_starts_the_statistics_afresh():
    torch.manual_seed(0)
    model = _NormThenRecurrent()
    data = _data((4,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(1))
    axis = torch.linspace(-1, 1, 3)
    with pytest.warns(RuntimeWarning, match="one point at a time"):
        res = grid(model, nn.CrossEntropyLoss(), data, d, axis, bn="recompute", progress=False)
    ref = _reference(model, nn.CrossEntropyLoss(), data, d, (axis,), recompute=True)
    torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-6)
