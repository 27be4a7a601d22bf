"""The grid engine's batched pieces: the Linear stand-in's vmap rule against vmap of F.linear, the
recognised cross-entropy against the user's loss mapped over the points, and the model left as
it was (modules, also after an error)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastbayes.landscape import _batched, grid, random_directions
from pyfastbayes.landscape._losses import point_values


def _ref_linear(x, w, b, in_dims):
    return torch.vmap(lambda x, w, b: F.linear(x, w, b), in_dims=in_dims)(x, w, b)


_ACTS = {None: lambda t: t, "relu": torch.relu, "tanh": torch.tanh}


def _through(route: str, fn_apply, stand_in, monkeypatch):
    """The batched call of a stand-in by ``route``: 'function' its autograd.Function under vmap,
    'direct' the stand-in module inside vmap (its own unwrapping, the Function forbidden), 'fallback'
    the stand-in module with functorch's C API missing (the Function's vmap rule)."""
    if route == "function":
        return fn_apply
    if route == "direct":
        cls = _batched._LinearFn if isinstance(stand_in, nn.Linear) else _batched._Conv2dFn
        monkeypatch.setattr(cls, "apply", lambda *a: pytest.fail("the direct route fell back"))
    else:
        monkeypatch.setattr(_batched, "_ft", None)
    return lambda x, w, b, *rest: torch.func.functional_call(stand_in, {"weight": w, "bias": b}, (x,))


@pytest.mark.parametrize("route", ["function", "direct", "fallback"])
@pytest.mark.parametrize("act", [None, "relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["all", "x_shared", "lead_dims", "no_bias", "w_shared", "x_dim1", "bias_shared"])
def test_linear_rule_equals_vmap_of_linear(case, dtype, act, route, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, rows, i, o = 5, 7, 4, 3

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    x, w, b, dims = r(n, rows, i), r(n, o, i), r(n, o), (0, 0, 0)
    if case == "x_shared":
        x, dims = r(rows, i), (None, 0, 0)
    elif case == "lead_dims":
        x = r(n, 2, rows, i)
    elif case == "no_bias":
        b, dims = None, (0, 0, None)
    elif case == "w_shared":
        w, dims = r(o, i), (0, None, 0)
    elif case == "x_dim1":
        x, dims = r(rows, n, i), (1, 0, 0)
    elif case == "bias_shared":
        b, dims = r(o), (0, 0, None)
    layer = _batched._twin(nn.Linear(i, o, bias=b is not None), _batched._BatchedLinear)
    layer.act = act
    call = _through(route, lambda x, w, b: _batched._LinearFn.apply(x, w, b, act), layer, monkeypatch)
    got = torch.vmap(call, in_dims=dims)(x, w, b)
    want = _ACTS[act](_ref_linear(x, w, b, dims))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("route", ["function", "direct", "fallback"])
@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["all", "x_shared", "x_shared_groups", "w_shared", "no_bias", "bias_shared",
                                  "x_dim1", "groups"])
def test_conv2d_rule_equals_vmap_of_conv2d(case, dtype, act, route, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, rows, cin, cout, groups = 4, 3, 4, 6, 1
    args = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    if case in ("groups", "x_shared_groups"):
        groups = 2
    x, w, b, dims = r(n, rows, cin, 7, 8), r(n, cout, cin // groups, 3, 3), r(n, cout), (0, 0, 0)
    if case in ("x_shared", "x_shared_groups"):
        x, dims = r(rows, cin, 7, 8), (None, 0, 0)
    elif case == "w_shared":
        w, b, dims = r(cout, cin, 3, 3), r(cout), (0, None, None)
    elif case == "no_bias":
        b, dims = None, (0, 0, None)
    elif case == "bias_shared":
        b, dims = r(cout), (0, 0, None)
    elif case == "x_dim1":
        x, dims = r(rows, n, cin, 7, 8), (1, 0, 0)
    st, pad, dil = args["stride"], args["padding"], args["dilation"]
    layer = _batched._twin(nn.Conv2d(cin, cout, 3, stride=st, padding=pad, dilation=dil, groups=groups,
                                     bias=b is not None), _batched._BatchedConv2d)
    layer.act = act
    call = _through(route, lambda x, w, b: _batched._Conv2dFn.apply(x, w, b, st, pad, dil, groups, act), layer,
                    monkeypatch)
    got = torch.vmap(call, in_dims=dims)(x, w, b)
    want = _ACTS[act](torch.vmap(lambda x, w, b: F.conv2d(x, w, b, st, pad, dil, groups), in_dims=dims)(x, w, b))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_swapped_restores_every_module_also_on_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                          nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    hooked = model[2][0]
    hooked.register_forward_hook(lambda *a: None)  # a hooked layer keeps its own forward
    before = [m for m in model.modules()]
    with _batched.swapped(model) as net:
        assert net is model
        assert type(model[0]) is _batched._BatchedLinear and model[0].weight is before[1].weight
        assert model[2][0] is hooked and type(model[2][1]) is _batched._BatchedLinear
        assert type(model[3]) is _batched._BatchedConv2d and model[3].bias is before[6].bias
        assert model[4] is before[7]  # circular padding keeps its own forward
    assert [m for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"):
        with _batched.swapped(model):
            raise RuntimeError("boom")
    assert [m for m in model.modules()] == before
    with _batched.swapped(model, conv=False):
        assert type(model[0]) is _batched._BatchedLinear and model[3] is before[6]  # convolutions kept
    assert [m for m in model.modules()] == before
    class ReadsAttributes(nn.Module):  # a forward that reads the layer's attributes still runs
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            assert isinstance(self.fc, nn.Linear)
            return self.fc(x.view(-1, self.fc.in_features))

    reader = ReadsAttributes()
    d = random_directions(reader, n=1, generator=torch.Generator().manual_seed(0))
    res = grid(reader, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2)), d, torch.linspace(-1, 1, 3),
               progress=False)
    assert torch.isfinite(res.loss).all() and type(reader.fc) is nn.Linear
    single = nn.Linear(3, 2)
    with _batched.swapped(single) as net:
        assert type(net) is _batched._BatchedLinear and net.weight is single.weight


def test_activations_fuse_into_the_layer_before_them_only_inside_a_plain_sequential():
    class MySequential(nn.Sequential):  # a subclass may hand outputs elsewhere: not fused
        pass

    hooked_relu = nn.ReLU()
    hooked_relu.register_forward_hook(lambda *a: None)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), hooked_relu,
                          nn.Conv2d(1, 1, 1), nn.ReLU(inplace=True), nn.Sigmoid(),
                          MySequential(nn.Linear(4, 4), nn.ReLU()))
    before = list(model.modules())
    with _batched.swapped(model):
        assert [getattr(model[i], "act", "-") for i in (0, 2, 4, 6)] == ["relu", "tanh", None, "relu"]
        assert [type(model[i]) for i in (1, 3, 5, 7, 8)] == [_batched._Fused, _batched._Fused, nn.ReLU,
                                                              _batched._Fused, nn.Sigmoid]
        assert model[5] is hooked_relu and model[9][0].act is None and type(model[9][1]) is nn.ReLU
    assert list(model.modules()) == before and not hasattr(before[1], "act")
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)  # global hooks: nothing fused
    try:
        with _batched.swapped(model):
            assert model[0].act is None and type(model[1]) is nn.ReLU
    finally:
        handle.remove()
    assert list(model.modules()) == before


@pytest.mark.parametrize("route", ["direct", "fallback"])
@pytest.mark.parametrize("first_layer", [True, False])
def test_grid_with_fused_activations_equals_the_point_loop(first_layer, route, monkeypatch):
    """ReLU and Tanh fused into Linear and Conv2d stand-ins (the first layer's one included) give the
    numbers of the plain model evaluated point by point; also without functorch's C API (the
    stand-ins' autograd.Functions, the first layer combined by einsum)."""
    if route == "fallback":
        monkeypatch.setattr(_batched, "_ft", None)
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    cases = [(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)),
              torch.randn(40, 6, generator=g)),
             (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 9, 3)), torch.randn(40, 1, 8, 8, generator=g))]
    for model, x in cases:
        y = torch.randint(0, 3, (40,), generator=g)
        d = random_directions(model, n=2, generator=torch.Generator().manual_seed(1))
        a, b = torch.linspace(-1, 1, 3), torch.linspace(-0.5, 0.5, 2)
        res = grid(model, nn.CrossEntropyLoss(), [(x[:25], y[:25]), (x[25:], y[25:])], d, (a, b),
                   first_layer=first_layer, batch_rows=16, progress=False)
        want = torch.empty(3, 2, dtype=torch.float64)
        names = [n for n, _ in model.named_parameters()]
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        for i, ai in enumerate(a):
            for j, bj in enumerate(b):
                flat = theta0 + ai * d[0] + bj * d[1]
                params = dict(zip(names, torch.split(flat, [p.numel() for p in model.parameters()])))
                params = {n: t.view_as(p) for (n, t), p in zip(params.items(), model.parameters())}
                with torch.no_grad():
                    want[i, j] = float(F.cross_entropy(torch.func.functional_call(model, params, (x,)), y))
        torch.testing.assert_close(res.loss, want, rtol=1e-5, atol=1e-6)
        assert all(type(m) is not _batched._Fused for m in model.modules())


@pytest.mark.parametrize("loss", ["module", "functional", "ignore_index"])
def test_recognised_cross_entropy_equals_the_loss_per_point(loss):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(6, 9, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (9,), generator=g)
    fn = {"module": nn.CrossEntropyLoss(), "functional": F.cross_entropy,
          "ignore_index": nn.CrossEntropyLoss(ignore_index=4)}[loss]
    if loss == "ignore_index":
        y[:3] = 4

    def per_point(f):  # point_values is called per point inside the grid's vmap over the points
        return torch.vmap(lambda o: point_values([f], o, y)[0])(out)

    got = per_point(fn)
    want = torch.stack([F.cross_entropy(o, y, ignore_index=4 if loss == "ignore_index" else -100) for o in out])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack([point_values([fn], o, y)[0] for o in out]), want, rtol=1e-12,
                               atol=1e-12)  # and outside a vmap
    # not recognised: other settings and probability targets are called as they are, with the same numbers
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(per_point(smooth),
                               torch.stack([smooth(o, y) for o in out]), rtol=1e-12, atol=1e-12)
    soft = torch.softmax(torch.randn(9, 10, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(torch.vmap(lambda o: point_values([nn.CrossEntropyLoss()], o, soft)[0])(out),
                               torch.stack([F.cross_entropy(o, soft) for o in out]), rtol=1e-12, atol=1e-12)


def test_all_ignored_rows_give_nan_like_the_loss():
    out = torch.randn(2, 3, 4)
    y = torch.full((3,), -100)
    assert torch.isnan(torch.vmap(lambda o: point_values([F.cross_entropy], o, y))(out)).all()
    assert torch.isnan(F.cross_entropy(out[0], y))


def test_grid_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = list(model.modules())
    d = random_directions(model, n=2, generator=torch.Generator().manual_seed(2))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    grid(model, nn.CrossEntropyLoss(), (x, y), d, (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3)),
         progress=False)
    def fails(o, t):
        raise RuntimeError("a loss that fails mid-walk")

    with pytest.raises(RuntimeError, match="fails mid-walk"):
        grid(model, fails, (x, y), d, (torch.linspace(-1, 1, 3),) * 2, progress=False)
    assert list(model.modules()) == mods
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_chunk_that_runs_out_of_memory_is_retried_smaller(monkeypatch):
    """Default chunk size: a chunk that raises torch.OutOfMemoryError is retried with half the points
    (the surface is unchanged); a chunk size the user chose raises with a hint instead."""
    import sys

    G = sys.modules["pyfastbayes.landscape.grid"]  # the module (the package exports the function grid)
    real = G.data_sums
    seen = []

    def tight(model, layout, thetas, *args, **kw):  # "memory" for at most 3 points at once
        seen.append(thetas.shape[0])
        if thetas.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, layout, thetas, *args, **kw)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    d = random_directions(model, n=2, generator=torch.Generator().manual_seed(2))
    data = (torch.randn(10, 4), torch.randint(0, 3, (10,)))
    coords = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 4))
    want = grid(model, nn.CrossEntropyLoss(), data, d, coords, batch_points=3, progress=False).loss
    monkeypatch.setattr(G, "data_sums", tight)
    with pytest.warns(RuntimeWarning, match="retrying with"):
        got = grid(model, nn.CrossEntropyLoss(), data, d, coords, progress=False).loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert seen == [12, 6, 3, 3, 3, 3]  # 12 and 6 points fail, then 4 chunks of 3
    with pytest.raises(torch.OutOfMemoryError, match="batch_points=8 does not fit"):
        grid(model, nn.CrossEntropyLoss(), data, d, coords, batch_points=8, progress=False)
    monkeypatch.setattr(G, "data_sums", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match="even one point"):
        grid(model, nn.CrossEntropyLoss(), data, d, coords, progress=False)
