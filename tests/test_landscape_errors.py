"""Input validation and state safety of pyfastbayes.landscape: bad input gets a clear error naming
the argument, and a call that fails leaves the models, curves and optimizers as they were."""
import copy
import functools

import pytest
import torch
from torch import nn

from pyfastbayes import landscape as L

ce = nn.CrossEntropyLoss()


def _mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _curve(cls=L.BezierCurve, n_bends: int = 1):
    a = _mlp(0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    return cls(a, b, n_bends)


# ---- 1. curve fit: finite lr, non-finite loss, restore on failure ---------------------------------
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1.0, 0])
def test_fit_refuses_a_non_finite_or_non_positive_lr(lr):
    c = _curve()
    before = _state(c)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        c.fit(ce, _data(), lr=lr, progress=False)
    assert _same(before, _state(c))


@pytest.mark.parametrize("cls", [L.BezierCurve, L.PolyChain])
def test_fit_raises_on_a_nan_loss_and_restores_the_bends(cls):
    x, y = _data()
    c = _curve(cls, 2)
    before = _state(c)
    bad = [(x, y), (torch.full_like(x[:4], float("nan")), y[:4]), (x, y)]
    with pytest.raises(RuntimeError, match=r"not finite .* epoch 0, first at batch 1.*smaller lr"):
        c.fit(ce, bad, lr=0.1, progress=False)
    assert _same(before, _state(c))
    assert all(p.grad is None for p in c.bends)


def test_fit_raises_when_a_huge_lr_diverges_and_restores_the_bends():
    c = _curve()
    before = _state(c)
    with pytest.raises(RuntimeError, match="not finite"):
        c.fit(ce, _data(), lr=1e30, epochs=3, progress=False)
    assert _same(before, _state(c))


def test_fit_failure_in_a_later_batch_restores_bends_optimizer_and_generator():
    x, y = _data()
    c = _curve()
    opt = torch.optim.Adam(c.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    c.fit(ce, (x, y), optimizer=opt, generator=gen, progress=False)  # optimizer state to keep
    before, opt_before = _state(c), copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in c.bends]
    gen_before = gen.get_state()
    with pytest.raises(IndexError):  # the user's loss on out-of-range targets in the 2nd batch
        c.fit(ce, [(x, y), (x, y + 5)], optimizer=opt, generator=gen, progress=False)
    assert _same(before, _state(c))
    assert all(torch.equal(p.grad, g) for p, g in zip(c.bends, grads))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], opt_before["state"][i][k])
               for i in opt_before["state"] for k in opt_before["state"][i])
    assert torch.equal(gen.get_state(), gen_before)
    # and the restored curve trains on exactly as if the failed call never happened
    twin = copy.deepcopy(c)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    twin_opt.load_state_dict(opt_before)
    h1 = c.fit(ce, (x, y), optimizer=opt, generator=gen, progress=False)
    h2 = twin.fit(ce, (x, y), optimizer=twin_opt, generator=torch.Generator().set_state(gen_before), progress=False)
    assert torch.equal(h1, h2)


def test_fit_on_float64_data_names_data():
    x, y = _data()
    c = _curve()
    before = _state(c)
    with pytest.raises(TypeError, match=r"data: the inputs are torch.float64 .* torch.float32"):
        c.fit(ce, (x.double(), y), lr=0.1, progress=False)
    assert _same(before, _state(c))


# ---- 2. per-row loss / metric ------------------------------------------------------------------------
def test_grid_refuses_a_per_row_loss_or_metric():
    m, (x, y) = _mlp(), _data()
    before = _state(m)
    d = L.random_directions(m, 1)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* shape \(32,\)"):
        L.grid(m, nn.CrossEntropyLoss(reduction="none"), (x, y), d, [-1, 0, 1], progress=False)
    with pytest.raises(ValueError, match=r"metrics\['acc'\] must return a scalar"):
        L.grid(m, ce, (x, y), d, [-1, 0, 1], metrics={"acc": lambda o, t: (o.argmax(1) == t).float()},
               progress=False)
    # a sum over the batch: the surface would depend on the batch size
    with pytest.raises(ValueError, match=r"loss_fn has reduction='sum'.*reduction='mean'"):
        L.grid(m, nn.CrossEntropyLoss(reduction="sum"), (x, y), d, [-1, 0, 1], progress=False)
    with pytest.raises(ValueError, match=r"metrics\['mse'\] has reduction='sum'"):
        L.grid(m, ce, (x, y), d, [-1, 0, 1], metrics={"mse": functools.partial(nn.functional.mse_loss,
                                                                                reduction="sum")}, progress=False)
    with pytest.raises(ValueError, match=r"loss_fn has reduction='sum'"):
        L.interpolate(m, _mlp(), 2, nn.CrossEntropyLoss(reduction="sum"), (x, y), progress=False)
    assert _same(before, _state(m))


def test_evaluate_refuses_a_per_row_loss_or_metric():
    c, (x, y) = _curve(), _data()
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        c.evaluate([0, 1], nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match=r"metrics\['err'\] must return a scalar"):
        c.evaluate([0, 1], ce, (x, y), metrics={"err": lambda o, t: (o.argmax(1) != t).float()})
    with pytest.raises(ValueError, match=r"loss_fn has reduction='sum'"):
        c.evaluate([0, 1], nn.CrossEntropyLoss(reduction="sum"), (x, y))


# ---- 3. class targets in the engine's own cross-entropy -----------------------------------------
@pytest.mark.parametrize("loss", [ce, nn.functional.cross_entropy])
def test_grid_names_out_of_range_class_targets(loss):
    m, (x, y) = _mlp(), _data()
    before = _state(m)
    d = L.random_directions(m, 1)
    with pytest.raises(ValueError, match=r"class index 6, outside \[0, 3\)"):
        L.grid(m, loss, [(x, y), (x, y + 5)], d, [-1, 0, 1], progress=False)
    assert _same(before, _state(m))
    # ignore_index rows are not classes
    ok = y.clone()
    ok[0] = -100
    L.grid(m, loss, (x, ok), d, [-1, 0, 1], progress=False)


def test_grid_names_float_class_targets():
    m, (x, y) = _mlp(), _data()
    d = L.random_directions(m, 1)
    with pytest.raises(TypeError, match=r"targets are torch.float32 of shape \(32,\).*targets.long\(\)"):
        L.grid(m, ce, (x, y.float()), d, [-1, 0, 1], progress=False)
    # class probabilities of the outputs' shape are fine
    probs = torch.softmax(torch.randn(32, 3), dim=1)
    res = L.grid(m, ce, (x, probs), d, [-1, 0, 1], progress=False)
    assert torch.isfinite(res.loss).all()


# ---- 4. data dtype --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype,data_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_grid_and_interpolate_name_a_data_dtype_mismatch(model_dtype, data_dtype):
    m, (x, y) = _mlp(0, model_dtype), _data()
    before = _state(m)
    d = L.random_directions(m, 1)
    with pytest.raises(TypeError, match=rf"data: the inputs are {data_dtype} .* {model_dtype}: cast the data"):
        L.grid(m, ce, (x.to(data_dtype), y), d, [-1, 0, 1], progress=False)
    with pytest.raises(TypeError, match="data: the inputs are"):
        L.interpolate(m, _mlp(1, model_dtype), 3, ce, (x.to(data_dtype), y), progress=False)
    assert _same(before, _state(m))


def test_evaluate_names_a_data_dtype_mismatch():
    c, (x, y) = _curve(), _data()
    with pytest.raises(TypeError, match="data: the inputs are torch.float64"):
        c.evaluate([0, 1], ce, (x.double(), y))


def test_a_model_that_converts_its_inputs_is_not_refused():
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x.float())

    m, (x, y) = Casting(), _data()
    d = L.random_directions(m, 1)
    a = L.grid(m, ce, (x.double(), y), d, [-1, 0, 1], progress=False).loss
    b = L.grid(m, ce, (x, y), d, [-1, 0, 1], progress=False).loss
    torch.testing.assert_close(a, b)


# ---- 5. meta device -------------------------------------------------------------------------------------
def test_meta_models_are_refused_naming_the_model():
    mm = nn.Linear(4, 3, device="meta")
    x, y = _data()
    with pytest.raises(ValueError, match="model has parameter 'weight' on the meta device.*to_empty"):
        L.random_directions(mm)
    with pytest.raises(ValueError, match="meta device"):
        L.grid(mm, ce, (x, y), torch.randn(1, 15), [-1, 0, 1], progress=False)
    with pytest.raises(ValueError, match=r"others\[0\] has parameter 'weight' on the meta device"):
        L.directions_to(nn.Linear(4, 3), [mm])
    with pytest.raises(ValueError, match="model_b has parameter 'weight' on the meta device"):
        L.BezierCurve(nn.Linear(4, 3), mm)


# ---- 6. directions_to, LandscapeResult, plot_contour points --------------------------------------------
def test_directions_to_refuses_a_0_dim_tensor():
    m = _mlp()
    with pytest.raises(TypeError, match="others must be .*0-dim tensor"):
        L.directions_to(m, torch.tensor(1.0))


def test_landscape_result_refuses_malformed_coords_and_metrics():
    R = L.LandscapeResult
    with pytest.raises(TypeError, match=r"coords must be a tuple of 1-D tensors.*\(alphas,\)"):
        R(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="coords must be a tuple"):
        R(None, torch.zeros(3))
    with pytest.raises(ValueError, match="coords must be 1 or 2 one-dimensional tensors"):
        R((torch.tensor(1.0),), torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"coords\[0\] must be a tensor \(or array\) of numbers"):
        R(("ab",), torch.zeros(2))
    with pytest.raises(TypeError, match="metrics must be a dict"):
        R((torch.zeros(2),), torch.zeros(2), [torch.zeros(2)])
    with pytest.raises(TypeError, match="metrics keys must be non-empty strings"):
        R((torch.zeros(2),), torch.zeros(2), {1: torch.zeros(2)})


def test_plot_contour_refuses_malformed_points():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = L.LandscapeResult((torch.linspace(0, 1, 3), torch.linspace(0, 1, 4)), torch.rand(3, 4))
    with pytest.raises(TypeError, match=r"points must be a dict label -> \(alpha, beta\)"):
        r.plot_contour(points=[(0, 0)])
    with pytest.raises(TypeError, match=r"points\['a'\] must be \(alpha, beta\) or \[k, 2\]"):
        r.plot_contour(points={"a": 0})
    ax = r.plot_contour(points={"SGD": (0, 0), "SWA": torch.tensor([1.0, 0.5])})
    assert [t.get_text() for t in ax.texts][-2:] == ["SGD", "SWA"]
    plt.close("all")


# ---- 7. non-finite trajectory, weights, directions --------------------------------------------------------
def test_pca_refuses_a_non_finite_trajectory():
    traj = torch.randn(4, 6)
    traj[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"trajectory must be finite: row\(s\) \[2\]"):
        L.pca_directions(traj, 1)


def test_random_directions_names_a_non_finite_weight():
    m = _mlp()
    with torch.no_grad():
        m[2].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="model parameter '2.weight' holds NaN or infinity"):
        L.random_directions(m, 1)
    # a NaN bias is not used by the default normalisation (biases get zero directions)
    m = _mlp()
    with torch.no_grad():
        m[0].bias[0] = float("nan")
    assert torch.isfinite(L.random_directions(m, 1)).all()
    with pytest.raises(ValueError, match="'0.bias' holds NaN"):
        L.random_directions(m, 1, ignore=None)
    assert torch.isfinite(L.random_directions(m, 1, normalization="none", ignore=None)).all()


def test_grid_refuses_non_finite_directions():
    m, (x, y) = _mlp(), _data()
    before = _state(m)
    d = L.random_directions(m, 2)
    d[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"directions must be finite: row\(s\) \[1\]"):
        L.grid(m, ce, (x, y), d, ([-1, 1], [-1, 1]), progress=False)
    assert _same(before, _state(m))


@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_grid_first_layer_must_be_a_bool(value):
    """first_layer="no" (or 0) used to switch the shortcut on: not False, so True."""
    m, (x, y) = _mlp(), _data()
    with pytest.raises(TypeError, match=r"first_layer must be None, True or False, got"):
        L.grid(m, ce, (x, y), L.random_directions(m, 1), torch.tensor([-1.0, 1.0]), first_layer=value,
               progress=False)


# ---- 8. bn='recompute' on 1-row batches --------------------------------------------------------------
def test_bn_recompute_names_one_row_batches():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = _data()
    before = _state(m)
    d = L.random_directions(m, 1)
    batches = [(x[:8], y[:8]), (x[8:9], y[8:9])]  # a 1-row last batch
    with pytest.raises(ValueError, match="bn='recompute' .* at least 2 rows.*drop_last=True"):
        L.grid(m, ce, batches, d, [-1, 0, 1], bn="recompute", progress=False)
    assert _same(before, _state(m))
    assert all(mod.momentum == 0.1 and mod.training for mod in m.modules() if isinstance(mod, nn.BatchNorm1d))
    # a 1-row batch is fine for a BatchNorm2d (its statistics run over the pixels too)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    xi = torch.randn(3, 1, 6, 6)
    res = L.grid(conv, ce, [(xi[:2], y[:2]), (xi[2:], y[2:3])], L.random_directions(conv, 1), [-1, 0, 1],
                 bn="recompute", progress=False)
    assert torch.isfinite(res.loss).all()


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_a_failing_forward_raises_the_model_own_error(bn):
    """Inputs of the wrong width: the model's own error ("mat1 and mat2 shapes cannot be multiplied"),
    not the batched stand-in's about the points' dimension; the BatchNorm statistics untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    before = _state(model)
    d = L.random_directions(model, 1)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(10x6 and 5x8\)") as info:
        L.grid(model, nn.CrossEntropyLoss(), (x, y), d, torch.tensor([0.0, 1.0]), bn=bn, progress=False)
    assert info.value.__cause__ is not None  # the walk's own error stays attached
    assert _same(_state(model), before) and model.training and model[1].training

    def failing_loss(out, t):
        raise ValueError("the loss's own error")

    with pytest.raises(ValueError, match="the loss's own error"):  # the plain forward works: not replaced
        L.grid(model, failing_loss, (torch.randn(10, 5), y), d, torch.tensor([0.0, 1.0]), bn=bn, progress=False)


# twelfth-session review: grid reads the data again for every chunk of points; a shuffling loader
# with drop_last or bn='recompute' gave each chunk other rows / statistics (seams in the surface)
def test_a_shuffling_loader_that_would_change_between_chunks_is_refused():
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from pyfastbayes.landscape import grid, random_directions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ds = TensorDataset(torch.randn(30, 3), torch.randint(0, 2, (30,)))
    d = random_directions(model, n=1, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(-1, 1, 3)
    for loader, bn in ((DataLoader(ds, batch_size=8, shuffle=True, drop_last=True), "eval"),
                       (DataLoader(ds, batch_size=8, shuffle=True), "recompute")):
        with pytest.raises(ValueError, match="DataLoader that shuffles"):
            grid(model, nn.CrossEntropyLoss(), loader, d, ts, bn=bn, progress=False)
    grid(model, nn.CrossEntropyLoss(), DataLoader(ds, batch_size=8, shuffle=True), d, ts, progress=False)  # exact


def test_pca_directions_tuple_passed_as_directions_is_explained():
    import torch
    from torch import nn
    from pyfastbayes.landscape import grid, pca_directions
    from pyfastbayes.nn import ParamLayout
    model = nn.Linear(3, 2)
    theta = ParamLayout(model).flatten()
    traj = torch.stack([theta + 0.1 * torch.randn_like(theta) for _ in range(5)])
    with pytest.raises(TypeError, match=r"pca_directions returns \(directions, explained variance ratios\)"):
        grid(model, nn.CrossEntropyLoss(), (torch.randn(4, 3), torch.randint(0, 2, (4,))), pca_directions(traj, 2),
             (torch.linspace(-1, 1, 2), torch.linspace(-1, 1, 2)), progress=False)


def test_a_failed_grid_leaves_the_models_buffers_as_they_were():
    # the first-layer probe and the error-explaining forward ran the model: a Bayesian layer's RNG
    # position advanced by two on a call that then failed
    import torch
    from torch import nn
    from pyfastbayes.landscape import grid, random_directions
    from pyfastbayes.vi import BayesianLinear
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(3, 4), nn.ReLU(), BayesianLinear(4, 2))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    d = random_directions(model, n=1, generator=torch.Generator().manual_seed(0))
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        grid(model, nn.CrossEntropyLoss(), (x, y), d, torch.linspace(-1, 1, 3), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_parameter_calls_probe_writes_no_buffer():
    import torch
    from torch import nn
    from pyfastbayes.nn.calls import parameter_calls
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    before = [b.clone() for b in model.buffers()]
    assert [n for n, _, _ in parameter_calls(model, torch.randn(8, 3))] == ["0", "1"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_a_grid_leaves_buffers_its_forward_updates_in_place_as_they_were():
    """A forward that writes a buffer in place (a call counter) runs on the model's own buffers in
    the walk, and in the first-layer shortcut's probe: both put back afterwards."""
    import torch
    from torch import nn
    from pyfastbayes.landscape import grid, random_directions

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    for first_layer in (None, False):
        model = Counting()
        d = random_directions(model, n=2, generator=torch.Generator().manual_seed(0))
        grid(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])], d,
             (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3)), progress=False, first_layer=first_layer)
        assert int(model.calls) == 0


def test_class_targets_of_the_wrong_rank_get_a_value_error():
    """[rows, 1] class indices for [rows, C] outputs: torch's own check is an assert inside the vmap."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from pyfastbayes.landscape import grid, random_directions

    m = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10, 1))
    d = random_directions(m, n=2, generator=torch.Generator().manual_seed(0))
    for loss in (nn.CrossEntropyLoss(), F.cross_entropy):
        with pytest.raises(ValueError, match=r"targets of shape \(10, 1\) for outputs \(10, 3\).*y.view\(-1\)"):
            grid(m, loss, (x, y), d, (torch.linspace(-1, 1, 2),) * 2, progress=False)
