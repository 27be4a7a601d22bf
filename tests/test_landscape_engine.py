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


_ACT_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _through(route: str, fn_apply, stand_in, act, monkeypatch):
    """The batched call of a stand-in by ``route``: 'function' its autograd.Function under vmap,
    'direct' the stand-in module inside vmap (its own unwrapping, the Function forbidden), 'fallback'
    the stand-in module with functorch's C API missing (the Function's vmap rule). With ``act``, the
    stand-in runs inside a fused Sequential (stand-in, activation), as the grid builds it."""
    if route == "function":
        return fn_apply
    if route == "direct":
        cls = _batched._LinearFn if isinstance(stand_in, nn.Linear) else _batched._Conv2dFn
        monkeypatch.setattr(cls, "apply", lambda *a: pytest.fail("the direct route fell back"))
    else:
        monkeypatch.setattr(_batched, "_ft", None)
    if act is None:
        return lambda x, w, b, *rest: torch.func.functional_call(stand_in, {"weight": w, "bias": b}, (x,))
    seq = _batched._twin(nn.Sequential(stand_in, _ACT_MODULES[act]()), _batched._FusedSequential)
    seq.fused = {"0": act}
    monkeypatch.setattr(_ACT_MODULES[act], "forward", lambda *a: pytest.fail("the activation was not fused"))
    return lambda x, w, b, *rest: torch.func.functional_call(seq, {"0.weight": w, "0.bias": b}, (x,))


@pytest.mark.parametrize("route", ["function", "direct", "fallback"])
@pytest.mark.parametrize("act", [None, "relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["all", "x_shared", "lead_dims", "no_bias", "w_shared", "x_dim1", "bias_shared"])
@pytest.mark.parametrize("o", [3, 40])  # per-point weights: the CPU's transposed product (o < 32) and the plain one
def test_linear_rule_equals_vmap_of_linear(o, case, dtype, act, route, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, rows, i = 5, 7, 4

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
    call = _through(route, lambda x, w, b: _batched._LinearFn.apply(x, w, b, act), layer, act, monkeypatch)
    narrow = []
    monkeypatch.setattr(_batched, "_narrow_points", lambda *a, f=_batched._narrow_points: narrow.append(1) or f(*a))
    got = torch.vmap(call, in_dims=dims)(x, w, b)
    assert bool(narrow) == (o < _batched._NARROW and case not in ("w_shared", "bias_shared"))
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
    call = _through(route, lambda x, w, b: _batched._Conv2dFn.apply(x, w, b, st, pad, dil, groups, act), layer,
                    act, monkeypatch)
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
        assert type(net) is _batched._FusedSequential and net.fused == {"0": "relu"}  # the Linear-ReLU pair
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
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), hooked_relu,
                          nn.Conv2d(1, 1, 1), nn.ReLU(inplace=True), nn.Sigmoid(),
                          MySequential(nn.Linear(4, 4), nn.ReLU()), inner)
    before = list(model.modules())
    with _batched.swapped(model) as net:
        assert type(net) is _batched._FusedSequential and net is not model
        assert net.fused == {"0": "relu", "2": "tanh", "6": "relu"}
        assert type(net[1]) is nn.ReLU and net[5] is hooked_relu  # children unchanged: direct calls unfused
        assert type(net[9]) is MySequential and not isinstance(net[9], _batched._FusedSequential)
        assert type(net[10]) is _batched._FusedSequential and net[10].fused == {"0": "relu"}
        assert type(model[10]) is _batched._FusedSequential  # the nested one is installed in the original
    assert list(model.modules()) == before and model[10] is inner
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)  # global hooks: nothing fused
    try:
        with _batched.swapped(model) as net:
            assert net is model and type(model[10]) is nn.Sequential
    finally:
        handle.remove()
    assert list(model.modules()) == before


def test_fused_layers_called_directly_give_their_own_outputs():
    """A model that calls a Sequential's children itself (residual over a Linear-ReLU pair, a
    feature loop) gets the unfused outputs: the grid equals the point-by-point loop."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
            self.feats = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.body[0](x)
            h = self.body[1](h) + h
            for m in self.feats:
                h = m(h) + 0.5 * h
            return self.out(h)

    torch.manual_seed(4)
    model = Residual()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    d = random_directions(model, n=1, generator=torch.Generator().manual_seed(1))
    a = torch.linspace(-1, 1, 4)
    names = [n for n, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = []
    for ai in a:
        flat = theta0 + ai * d[0]
        ps = {n: t.view_as(p) for n, t, p in zip(names, torch.split(flat, [p.numel() for p in model.parameters()]),
                                                   model.parameters())}
        with torch.no_grad():
            want.append(float(F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)))
    for first_layer in (True, False):
        res = grid(model, nn.CrossEntropyLoss(), (x, y), d, a, first_layer=first_layer, progress=False)
        torch.testing.assert_close(res.loss, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


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
        assert all(not isinstance(m, _batched._FusedSequential) for m in model.modules())


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


def test_grid_reads_shuffled_and_randomly_transformed_data():
    """The walk runs inside the vmap over the points; the data is fetched outside it, so a shuffling
    DataLoader (its sampler's randperm) and a dataset drawing random numbers work, with the values
    of the same data in order (a per-example noise that depends on a generator reseeded per pass)."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    d = random_directions(model, n=2, generator=torch.Generator().manual_seed(2))
    axes = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 2))
    plain = grid(model, nn.CrossEntropyLoss(), (x, y), d, axes, progress=False)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    torch.testing.assert_close(grid(model, nn.CrossEntropyLoss(), shuffled, d, axes, progress=False).loss,
                               plain.loss, rtol=1e-5, atol=1e-6)

    class Noisy(Dataset):  # draws a random number per item (discarded: same data every pass)
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            torch.rand(1)
            return x[i], y[i]

    torch.testing.assert_close(grid(model, nn.CrossEntropyLoss(), DataLoader(Noisy(), batch_size=16), d, axes,
                                    progress=False).loss, plain.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_layer", [True, False])
def test_grid_under_autocast(first_layer):
    """Under CPU autocast the GEMMs give bfloat16 outputs while biases and the first layer's mixing
    weights stay float32: the fused passes take them in the output's dtype (bfloat16 rounding)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    d = random_directions(model, n=2, generator=torch.Generator().manual_seed(3))
    axes = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3))
    want = grid(model, nn.CrossEntropyLoss(), (x, y), d, axes, first_layer=first_layer, progress=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grid(model, nn.CrossEntropyLoss(), (x, y), d, axes, first_layer=first_layer, progress=False).loss
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
