"""grid(bn='recompute'): every point's BatchNorm statistics recomputed over the data in one batched
pass, against the one-point-at-a-time user recipe (load the weights, reset the running statistics,
momentum None, one pass in train mode, evaluate in eval mode); 'eval' vs 'recompute'; the
first-layer shortcut in both modes; the model left as it was."""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes.landscape import grid, interpolate, random_directions
from pyfastbayes.nn import ParamLayout
from _helpers import CountingBatches, needs_cuda

BN = nn.modules.batchnorm._BatchNorm


def _acc(out, y):
    return (out.argmax(-1) == y).float().mean()


def _warm(m, shape):
    """Running statistics from other data than the landscape's (scaled, shifted), so the centre's
    statistics ('eval') differ from the recomputed ones."""
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, *shape) * 2 + 1)
    return m


def _mlp():
    torch.manual_seed(0)
    return _warm(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                               nn.Tanh(), nn.Linear(6, 3)), (5,))


def _cnn():
    torch.manual_seed(1)
    return _warm(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                               nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)),
                 (2, 6, 6))


def _data(shape, n=(7, 5, 6)):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(k, *shape, generator=g) * 1.5 - 0.5, torch.randint(0, 3, (k,), generator=g)) for k in n]


def _recipe(model, theta, data, bn_only=False):
    """The user recipe at one point: a copy with the point's weights, BatchNorm statistics reset,
    momentum None, one pass over the data in train mode (bn_only: only the BatchNorm layers),
    then eval mode."""
    m = copy.deepcopy(model)
    ParamLayout(m).write_(theta.to(torch.float32), m)
    for mod in m.modules():
        if isinstance(mod, BN):
            mod.reset_running_stats()
            mod.momentum = None
    if bn_only:
        m.eval()
        for mod in m.modules():
            if isinstance(mod, BN):
                mod.train()
    else:
        m.train()
    with torch.no_grad():
        for x, _ in data:
            m(x)
    return m.eval()


def _reference(model, fns, data, directions, coords, bn_only=False):
    """One point at a time: the recipe, then the mean of each fn over all examples."""
    layout = ParamLayout(model)
    theta0 = layout.flatten().double()
    axes = [torch.as_tensor(c, dtype=torch.float64) for c in coords]
    out = torch.zeros(len(fns), *[len(a) for a in axes], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(len(a)) for a in axes]).reshape(-1, len(axes)):
        theta = theta0.clone()
        for k, i in enumerate(idx):
            theta += axes[k][i] * directions[k].double()
        m = _recipe(model, theta, data, bn_only)
        n = sum(len(y) for _, y in data)
        with torch.no_grad():
            for f, fn in enumerate(fns):
                out[(f, *idx)] = sum(float(fn(m(x), y)) * len(y) for x, y in data) / n
    return out


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(type(m).__name__, m.training, getattr(m, "momentum", None)) for m in model.modules()])


def _case(model, shape):
    """Data, two directions and a 4 x 3 grid of offsets for the bn='recompute' comparisons."""
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(5))
    return _data(shape), d, (torch.linspace(-1, 1, 4), torch.linspace(-0.5, 1.0, 3))


def _recompute(model, data, d, coords):
    """grid with bn='recompute' and accuracy; 5 points per chunk: chunks of 5, 5, 2 (per-point
    buffers of several chunk sizes)."""
    return grid(model, nn.CrossEntropyLoss(), data, d, coords, metrics={"acc": _acc}, bn="recompute",
                batch_points=5, progress=False)


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))], ids=["mlp_bn1d", "cnn_bn2d"])
def test_recompute_matches_the_one_point_recipe(make, shape):
    model = make()
    model.train()  # grid must restore every flag (and never write the model's buffers)
    before = _state(model)
    data, d, coords = _case(model, shape)
    loss_fn = nn.CrossEntropyLoss()
    res = _recompute(model, data, d, coords)
    ref = _reference(model, [loss_fn, _acc], data, d, coords)
    torch.testing.assert_close(res.loss, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.metrics["acc"], ref[1], rtol=0, atol=1e-6)
    after = _state(model)
    assert after[1] == before[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    # 'eval' keeps the centre's (other data's) statistics: a different surface
    ev = grid(model, loss_fn, data, d, coords, bn="eval", batch_points=5, progress=False)
    assert (ev.loss - res.loss).abs().max() > 1e-2
    # one chunk with every point, and row blocks in the evaluation pass: the same numbers (the
    # statistics pass reads whole batches; splitting them would change the batch statistics)
    one = grid(model, loss_fn, data, d, coords, bn="recompute", batch_points=12, batch_rows=2, progress=False)
    torch.testing.assert_close(one.loss, res.loss, rtol=1e-5, atol=1e-6)


def test_eval_and_recompute_agree_where_the_statistics_are_the_centres():
    """With the model's statistics recomputed at theta0 over the same data (the recipe), 'eval' and
    'recompute' agree at the centre and differ away from it; without BatchNorm they are equal."""
    model = _mlp()
    data = _data((5,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(7))
    fixed = _recipe(model, ParamLayout(model).flatten(), data)
    coords = torch.tensor([-1.0, 0.0, 1.0])
    loss_fn = nn.CrossEntropyLoss()
    ev = grid(fixed, loss_fn, data, d, coords, bn="eval", progress=False).loss
    rc = grid(fixed, loss_fn, data, d, coords, bn="recompute", progress=False).loss
    assert rc[1].item() == pytest.approx(ev[1].item(), rel=1e-5, abs=1e-6)
    assert abs(rc[0] - ev[0]) > 1e-3 and abs(rc[2] - ev[2]) > 1e-3
    plain = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    dp = random_directions(plain, 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(grid(plain, loss_fn, data, dp, coords, bn="eval", progress=False).loss,
                       grid(plain, loss_fn, data, dp, coords, bn="recompute", progress=False).loss)


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))], ids=["mlp_bn1d", "cnn_bn2d"])
@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_first_layer_shortcut_in_both_bn_modes(make, shape, bn):
    model = make()
    data = _data(shape)
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(2))
    coords = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3))
    kw = dict(metrics={"acc": _acc}, bn=bn, batch_points=4, batch_rows=3, progress=False)
    plain = grid(model, nn.CrossEntropyLoss(), data, d, coords, first_layer=False, **kw)
    short = grid(model, nn.CrossEntropyLoss(), data, d, coords, first_layer=True, **kw)
    torch.testing.assert_close(short.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short.metrics["acc"], plain.metrics["acc"])
    assert type(model[0]) in (nn.Linear, nn.Conv2d)  # the first layer is back




def test_recompute_is_batched_over_points():
    """One chunk of all 9 points: the data is walked twice (statistics pass, evaluation pass), not
    once per point."""
    model = _mlp()
    data = CountingBatches(_data((5,)))
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    grid(model, nn.CrossEntropyLoss(), data, d, (torch.linspace(-1, 1, 3),) * 2, bn="recompute", batch_points=9,
         first_layer=False, progress=False)
    assert data.walks == 2


def test_dropout_stays_off_in_the_statistics_pass():
    """Only the BatchNorm layers are in train mode while the statistics are gathered: Dropout is off,
    the surface is deterministic and equals the recipe with only the BatchNorm layers in train mode."""
    torch.manual_seed(4)
    model = _warm(nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
                  (5,))
    data = _data((5,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(3))
    coords = (torch.linspace(-1, 1, 4),)
    loss_fn = nn.CrossEntropyLoss()
    a = grid(model, loss_fn, data, d, coords[0], bn="recompute", progress=False).loss
    b = grid(model, loss_fn, data, d, coords[0], bn="recompute", progress=False).loss
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _reference(model, [loss_fn], data, d, coords, bn_only=True)[0], rtol=1e-5,
                               atol=1e-5)


def test_batchnorm_without_running_statistics_keeps_whole_batches():
    """A BatchNorm without running statistics normalises with each batch's own: row blocks would
    change it, so grid keeps whole batches (both modes), as a plain eval-mode loop does."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    data = _data((5,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(3))
    coords = torch.linspace(-1, 1, 3)
    loss_fn = nn.CrossEntropyLoss()
    ref = _reference(model.eval(), [loss_fn], data, d, (coords,))[0]
    for bn in ("eval", "recompute"):
        res = grid(model, loss_fn, data, d, coords, bn=bn, batch_rows=2, progress=False)
        torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-5)


def test_interpolate_eval_warns_when_the_end_is_not_model_b():
    import warnings
    a, b = _mlp(), _mlp()
    data, loss_fn = _data((5,)), nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same statistics: no warning
        interpolate(a, b, 2, loss_fn, data, progress=False)
        interpolate(a, _warm(b, (5,)), 2, loss_fn, data, bn="recompute", progress=False)
    with pytest.warns(RuntimeWarning, match="does not end at model_b"):
        res = interpolate(a, b, 2, loss_fn, data, progress=False)  # b's statistics moved by _warm above
    n = sum(len(y) for _, y in data)
    with torch.no_grad():
        own_b = sum(float(loss_fn(b.eval()(x), y)) * len(y) for x, y in data) / n
    assert abs(res.loss[-1].item() - own_b) > 1e-4  # what the warning says: the end is not model_b


def test_interpolate_recompute_ends_are_the_refreshed_models():
    a, b = _mlp(), _mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data, loss_fn = _data((5,)), nn.CrossEntropyLoss()
    res = interpolate(a, b, 4, loss_fn, data, bn="recompute", progress=False)
    n = sum(len(y) for _, y in data)
    for i, m in ((0, a), (-1, b)):
        fresh = _recipe(m, ParamLayout(m).flatten(), data)
        with torch.no_grad():
            want = sum(float(loss_fn(fresh(x), y)) * len(y) for x, y in data) / n
        assert res.loss[i].item() == pytest.approx(want, rel=1e-5)


@needs_cuda
@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))], ids=["mlp_bn1d", "cnn_bn2d"])
def test_recompute_on_cuda_matches_cpu(make, shape):
    """The batched statistics pass on CUDA (cuDNN's BatchNorm under vmap) gives the CPU surface."""
    model = make()
    data, d, coords = _case(model, shape)
    cpu = _recompute(model, data, d, coords)
    gpu = _recompute(copy.deepcopy(model).cuda(), [(x.cuda(), y.cuda()) for x, y in data], d.cuda(), coords)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.metrics["acc"].cpu(), cpu.metrics["acc"], rtol=0, atol=1e-6)
