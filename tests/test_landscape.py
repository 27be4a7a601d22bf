"""Loss landscapes: random / to-model / PCA directions, the vmapped grid against a one-point loop,
an analytic quadratic surface, LandscapeResult files and plots, and the refusals."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from pyfastbayes.landscape import (LandscapeResult, directions_to, grid, interpolate, pca_directions,
                                   project_trajectory, random_directions)
from pyfastbayes.landscape.grid import _points
from pyfastbayes.nn import ParamLayout
from _helpers import require


def _acc(out, y):
    return (out.argmax(-1) == y).float().mean()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    # non-trivial running statistics, so eval mode differs from batch statistics
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 2, 6, 6) * 2 + 1)
    return m


def _data(shape, n=(7, 5, 6)):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(k, *shape, generator=g), torch.randint(0, 3, (k,), generator=g)) for k in n]


def _reference(model, loss_fn, data, directions, coords):
    """One point at a time: a fresh copy of the model with the parameters written, plain forward,
    the mean loss over all examples."""
    layout = ParamLayout(model)
    theta0 = layout.flatten().double()
    axes = [torch.as_tensor(c, dtype=torch.float64) for c in coords]
    out = torch.zeros(*[len(a) for a in axes], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(len(a)) for a in axes]).reshape(-1, len(axes)):
        theta = theta0.clone()
        for k, i in enumerate(idx):
            theta += axes[k][i] * directions[k].double()
        m = copy.deepcopy(model).eval()
        ParamLayout(m).write_(theta.float(), m)
        tot, n = 0.0, 0
        with torch.no_grad():
            for x, y in data:
                tot += float(loss_fn(m(x), y)) * len(y)
                n += len(y)
        out[tuple(idx)] = tot / n
    return out


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))], ids=["mlp", "cnn_bn"])
def test_grid_matches_point_loop(make, shape):
    model = make()
    model.train()  # grid must evaluate in eval mode and give the modes back
    data = _data(shape)
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(5))
    coords = (torch.linspace(-1, 1, 4), torch.linspace(-0.5, 1.5, 3))
    loss_fn = nn.CrossEntropyLoss()
    res = grid(model, loss_fn, data, d, coords, metrics={"acc": _acc}, batch_points=5, progress=False)
    ref = _reference(model, loss_fn, data, d, coords)
    assert res.loss.shape == (4, 3) and res.loss.dtype == torch.float64
    torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-5)
    ref_acc = _reference(model, _acc, data, d, coords)
    torch.testing.assert_close(res.metrics["acc"], ref_acc, rtol=0, atol=1e-6)
    assert all(m.training for m in model.modules())
    # 1-D, default chunking: the same values as the first row of the plane through beta = 0
    res1 = grid(model, loss_fn, data, d[:1], torch.tensor([-1.0, 0.0, 2.0]), progress=False)
    torch.testing.assert_close(res1.loss, _reference(model, loss_fn, data, d[:1], (torch.tensor([-1.0, 0.0, 2.0]),)),
                               rtol=1e-5, atol=1e-5)


class _Quadratic(nn.Module):
    """out [N, 2] = x * w: with the loss below, L(w) = a + b w1^2 + c w2^2 for x of ones."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def test_quadratic_surface_is_analytic():
    a, b, c = 0.3, 2.0, 0.5
    model = _Quadratic()
    loss_fn = lambda out, y: (a + b * out[:, 0] ** 2 + c * out[:, 1] ** 2).mean()  # noqa: E731
    data = [(torch.ones(k, 2, dtype=torch.float64), torch.zeros(k)) for k in (3, 2)]
    alphas, betas = torch.linspace(-2, 2, 9), torch.linspace(-1, 3, 5)
    d = torch.eye(2, dtype=torch.float64)
    res = grid(model, loss_fn, data, d, (alphas, betas), batch_points=7, progress=False)
    A, B = torch.meshgrid(alphas.double(), betas.double(), indexing="ij")
    torch.testing.assert_close(res.loss, a + b * (0.5 + A) ** 2 + c * (-1.0 + B) ** 2, rtol=1e-12, atol=1e-12)
    # the model's own parameters are never written
    assert model.w.tolist() == [0.5, -1.0]


def test_points_helper():
    theta0, d, co = torch.randn(7), torch.randn(2, 7), torch.randn(4, 2)
    out = torch.full((4, 7), float("nan"))
    assert _points(theta0, d, co, out) is out
    torch.testing.assert_close(out, theta0 + co @ d)


def test_interpolate_ends_are_the_two_models():
    a, b = _mlp(), _mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    data, loss_fn = _data((5,)), nn.CrossEntropyLoss()
    res = interpolate(a, b, 5, loss_fn, data, progress=False)
    torch.testing.assert_close(res.coords[0], torch.linspace(0, 1, 5, dtype=torch.float64))

    def mean_loss(m):
        return sum(float(loss_fn(m(x), y)) * len(y) for x, y in data) / sum(len(y) for _, y in data)
    with torch.no_grad():
        assert res.loss[0].item() == pytest.approx(mean_loss(a), rel=1e-5)
        assert res.loss[-1].item() == pytest.approx(mean_loss(b), rel=1e-5)


def test_interpolate_refuses_frozen_tensors_that_differ():
    """The line moves only trainable parameters and runs model_a: a frozen parameter or a non-
    BatchNorm buffer of model_b's that differs would silently be model_a's at offset 1."""
    a, b = _mlp(), _mlp()
    with torch.no_grad():
        b[0].weight.add_(1.0)
    a[0].weight.requires_grad_(False)
    b[0].weight.requires_grad_(False)
    data, loss_fn = _data((5,)), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="frozen parameter / buffer '0.weight' differs.*the line"):
        interpolate(a, b, 3, loss_fn, data, progress=False)
    a.register_buffer("scale", torch.ones(()))
    b.register_buffer("scale", 2 * torch.ones(()))
    b[0].weight.data.copy_(a[0].weight.data)
    with pytest.raises(ValueError, match="'scale' differs"):
        interpolate(a, b, 3, loss_fn, data, progress=False)
    b.scale.fill_(1.0)  # equal: fine
    assert interpolate(a, b, 3, loss_fn, data, progress=False).loss.shape == (3,)


# ---- directions ------------------------------------------------------------------------------------------
def test_filter_normalisation():
    model = _cnn()
    layout = ParamLayout(model)
    d = random_directions(model, 3, generator=torch.Generator().manual_seed(0))
    assert d.shape == (3, layout.numel)
    for k in range(3):
        parts = layout.unflatten(d[k])
        for (name, w) in model.named_parameters():
            if w.dim() <= 1:
                assert parts[name].abs().max() == 0, name  # ignore='biasbn'
            else:
                torch.testing.assert_close(parts[name].reshape(w.shape[0], -1).norm(dim=1),
                                           w.detach().reshape(w.shape[0], -1).norm(dim=1), rtol=1e-5, atol=1e-6)
    # reproducible with a generator, different with another seed
    assert torch.equal(d, random_directions(model, 3, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(d, random_directions(model, 3, generator=torch.Generator().manual_seed(1)))


def test_layer_normalisation_and_no_ignore():
    model = _mlp()
    layout = ParamLayout(model)
    d = random_directions(model, 1, normalization="layer", ignore=None, generator=torch.Generator().manual_seed(2))[0]
    for name, w in model.named_parameters():
        part = layout.unflatten(d)[name]
        assert part.norm().item() == pytest.approx(w.detach().norm().item(), rel=1e-5)
        assert part.abs().max() > 0
    # filter normalisation with ignore=None: vectors are normalised by their whole norm too
    d = random_directions(model, 1, ignore=None, generator=torch.Generator().manual_seed(2))[0]
    part = layout.unflatten(d)["0.bias"]
    assert part.norm().item() == pytest.approx(model[0].bias.detach().norm().item(), rel=1e-5)
    raw = random_directions(model, 1, normalization="none", generator=torch.Generator().manual_seed(2))[0]
    # 'none': the raw N(0, 1) draws, tensor by tensor in layout order; biases still zero (ignore='biasbn')
    w0 = model[0].weight
    torch.testing.assert_close(layout.unflatten(raw)["0.weight"],
                               torch.randn(w0.shape, generator=torch.Generator().manual_seed(2)))
    assert layout.unflatten(raw)["0.bias"].abs().max() == 0


def test_directions_to():
    a, b, c = _mlp(), _mlp(), _mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
        for p in c.parameters():
            p.mul_(3.0)
    la = ParamLayout(a)
    d = directions_to(a, [b, c])
    assert d.shape == (2, la.numel)
    torch.testing.assert_close(d[0], torch.ones(la.numel))
    torch.testing.assert_close(d[1], 2 * la.flatten())
    torch.testing.assert_close(directions_to(a, la.flatten() + 4), torch.full((1, la.numel), 4.0))
    with pytest.raises(ValueError, match="others\\[0\\] has other trainable parameters"):
        directions_to(a, [_cnn()])
    with pytest.raises(ValueError, match="others is empty"):
        directions_to(a, [])


def test_pca_directions_known_trajectory():
    # points along 3 e0 (large spread) and e2 (small spread), plus the mean offset
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.5, -0.5, 0.0, -0.5, 0.5], dtype=torch.float64)  # zero mean, orthogonal to t
    traj = torch.zeros(5, 4, dtype=torch.float64)
    traj[:, 0] = -3 * t + 7
    traj[:, 2] = s + 1
    dirs, ratio = pca_directions(traj, 2)
    torch.testing.assert_close(dirs, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64))
    var0, var2 = (9 * t ** 2).sum(), ((s - s.mean()) ** 2).sum()
    torch.testing.assert_close(ratio, torch.stack([var0, var2]) / (var0 + var2))
    with pytest.raises(ValueError, match="n must be <= min"):
        pca_directions(traj, 5)
    with pytest.raises(ValueError, match="spans only 2 direction"):
        pca_directions(traj, 3)  # T - 1 = 4 allows 3, but the rows span 2: the third would be arbitrary
    with pytest.raises(ValueError, match="does not move"):
        pca_directions(torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="spans only 1 direction.*line"):
        pca_directions(torch.outer(torch.arange(4.0), torch.randn(6)), 2)


def test_project_trajectory_recovers_offsets_for_non_orthogonal_directions():
    """Points built as theta0 + a d1 + b d2 (+ a component orthogonal to the plane) come back as
    (a, b), for skewed directions, from tensors and from models; a fixed orthonormal reference
    (the plain dot products) agrees when the directions are orthonormal."""
    torch.manual_seed(0)
    model = _mlp()
    layout = ParamLayout(model)
    theta0 = layout.flatten().double()
    P = theta0.numel()
    d = torch.randn(2, P, dtype=torch.float64)
    d[1] += 0.7 * d[0]  # far from orthogonal
    ab = torch.randn(5, 2, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([d.T, torch.randn(P, 1, dtype=torch.float64)], 1))
    off = q[:, 2] * 3.0  # orthogonal to the plane: projected away
    pts = theta0 + ab @ d + off
    torch.testing.assert_close(project_trajectory(pts, theta0, d), ab, rtol=0, atol=1e-10)
    torch.testing.assert_close(project_trajectory(pts[0], theta0, d), ab[:1], rtol=0, atol=1e-10)
    models = []
    for row in pts[:2]:
        m = copy.deepcopy(model)
        layout.write_(row.float(), m)
        models.append(m)
    torch.testing.assert_close(project_trajectory(models, model, d.float()), ab[:2], rtol=0, atol=1e-4)
    e = q[:, :2].T.contiguous()  # orthonormal: the coordinates are the dot products
    torch.testing.assert_close(project_trajectory(pts, theta0, e), (pts - theta0) @ e.T, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="linearly dependent"):
        project_trajectory(pts, theta0, torch.stack([d[0], 2 * d[0]]))
    scaled = torch.stack([d[0] * 1e4, d[1] * 1e-4])  # independent, lengths 1e8 apart: still solved
    torch.testing.assert_close(project_trajectory(pts, theta0, scaled), ab * torch.tensor([1e-4, 1e4], dtype=ab.dtype),
                               rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="linearly dependent"):
        project_trajectory(pts, theta0, torch.stack([d[0], torch.zeros_like(d[0])]))
    with pytest.raises(ValueError, match=r"points must be \[T, P\] or \[P\] with P = "):
        project_trajectory(pts[:, :3], theta0, d)
    with pytest.raises(TypeError, match="origin must be a model or a floating-point"):
        project_trajectory(pts, "centre", d)


# ---- results ------------------------------------------------------------------------------------------------
def _result2d():
    a, b = torch.linspace(-1, 1, 4), torch.linspace(0, 2, 3)
    A, B = torch.meshgrid(a, b, indexing="ij")
    return LandscapeResult((a, b), A ** 2 + B, {"acc": A * 0 + 0.5})


def test_result_save_load_round_trip(tmp_path):
    r = _result2d()
    path = tmp_path / "land.npz"
    r.save(path)
    q = LandscapeResult.load(path)
    assert len(q.coords) == 2 and all(torch.equal(x, y) for x, y in zip(q.coords, r.coords))
    assert torch.equal(q.loss, r.loss) and q.metrics.keys() == {"acc"}
    assert torch.equal(q.metrics["acc"], r.metrics["acc"])
    r1 = LandscapeResult((torch.arange(3.0),), torch.tensor([1.0, 0.0, 1.0]))
    r1.save(tmp_path / "line")
    q1 = LandscapeResult.load(tmp_path / "line")
    assert q1.ndim == 1 and torch.equal(q1.loss, r1.loss) and q1.metrics == {}
    with pytest.raises(ValueError, match="loss must have shape"):
        LandscapeResult((torch.arange(3.0),), torch.zeros(4))


def test_plots_return_axes():
    mpl = require("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    r = _result2d()
    ax = r.plot_contour(points={"SWA": (0.0, 1.0)})
    assert ax.get_xlabel() == "alpha" and len(ax.lines) == 1
    ax3 = r.plot_surface(metric="acc")
    assert ax3.name == "3d"
    r1 = LandscapeResult((torch.arange(3.0),), torch.tensor([1.0, 0.0, 1.0]))
    ax1 = r1.plot_line()
    assert len(ax1.lines) == 1
    with pytest.raises(ValueError, match="plot_line"):
        r1.plot_contour()
    with pytest.raises(ValueError, match="metric"):
        r.plot_contour(metric="nope")
    plt.close("all")


def test_plots_mark_points_on_the_line_the_plane_and_the_surface():
    mpl = require("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a, b = torch.linspace(-1, 1, 5, dtype=torch.float64), torch.linspace(0, 2, 3, dtype=torch.float64)
    loss = a[:, None] * 2 + b[None, :] * 3 + 1  # bilinear: interpolation at any point is exact
    r = LandscapeResult((a, b), loss)
    draws = torch.tensor([[0.1, 0.5], [-0.7, 1.9], [0.95, 0.0]], dtype=torch.float64)
    ax = r.plot_contour(points={"SWA": (0.0, 1.0), "SWAG draws": draws})
    assert len(ax.lines) == 2 and ax.get_legend() is not None
    np.testing.assert_allclose(np.asarray(ax.lines[1].get_xydata()), draws.numpy())
    ax3 = r.plot_surface(points={"SWA": (0.25, 1.5), "SWAG draws": draws})
    z = np.asarray(ax3.lines[1].get_data_3d()[2])
    np.testing.assert_allclose(z, (draws[:, 0] * 2 + draws[:, 1] * 3 + 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ax3.lines[0].get_data_3d()[2], [0.5 + 4.5 + 1], rtol=1e-12)
    with pytest.raises(ValueError, match="outside the grid"):
        r.plot_surface(points={"far": (3.0, 0.0)})
    r1 = LandscapeResult((a,), a.abs())
    ax1 = r1.plot_line(points={"SWA": 0.0, "SGD": [0.5, -0.25]})
    assert len(ax1.lines) == 3
    np.testing.assert_allclose(np.asarray(ax1.lines[2].get_xydata()), [[0.5, 0.5], [-0.25, 0.25]])
    # descending offsets (grid takes them): the same marks
    rd = LandscapeResult((a.flip(0),), a.abs().flip(0))
    axd = rd.plot_line(points={"SGD": [0.5, -0.25]})
    np.testing.assert_allclose(np.asarray(axd.lines[1].get_xydata()), [[0.5, 0.5], [-0.25, 0.25]])
    r2d = LandscapeResult((a.flip(0), b.flip(0)), loss.flip(0).flip(1))
    ax3d = r2d.plot_surface(points={"SWAG draws": draws})
    np.testing.assert_allclose(ax3d.lines[0].get_data_3d()[2], (draws[:, 0] * 2 + draws[:, 1] * 3 + 1).numpy(),
                               rtol=1e-12)
    # unsorted offsets (grid takes any order): drawn sorted, not as a zigzag line / folded surface
    perm_a, perm_b = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([2, 0, 1])
    rs = LandscapeResult((a[perm_a],), a.abs()[perm_a])
    np.testing.assert_allclose(np.asarray(rs.plot_line().lines[0].get_xydata()),
                               np.stack([a.numpy(), a.abs().numpy()], 1))
    rs2 = LandscapeResult((a[perm_a], b[perm_b]), loss[perm_a][:, perm_b])
    cs_sorted, cs_shuffled = r.plot_contour(levels=5).collections, rs2.plot_contour(levels=5).collections
    paths = [[p for c in cs for p in c.get_paths()] for cs in (cs_sorted, cs_shuffled)]
    assert len(paths[0]) == len(paths[1]) > 0
    for p1, p2 in zip(*paths):
        np.testing.assert_allclose(p1.vertices, p2.vertices, rtol=1e-12, atol=1e-12)
    ax_s = rs2.plot_surface(points={"SWAG draws": draws})
    np.testing.assert_allclose(ax_s.lines[0].get_data_3d()[2], (draws[:, 0] * 2 + draws[:, 1] * 3 + 1).numpy(),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="coords\\[0\\] repeats an offset"):
        LandscapeResult((torch.tensor([0.0, 1.0, 1.0]),), torch.zeros(3)).plot_line()
    # marks off the grid: refused by every plot (a line's end value would be extrapolated flat)
    with pytest.raises(ValueError, match=r"points\['far'\] lies outside the grid \(alpha in \[-1, 1\]\)"):
        r1.plot_line(points={"far": 1.5})
    with pytest.raises(ValueError, match=r"outside the grid \(alpha in \[-1, 1\], beta in \[0, 2\]\)"):
        r.plot_contour(points={"far": (0.0, 2.5)})
    r.plot_contour(points={"end": (1.0 + 1e-12, 2.0)})  # an end computed with rounding still counts
    with pytest.raises(TypeError, match="points\\['SWA'\\] must be an offset alpha"):
        r1.plot_line(points={"SWA": "x"})
    with pytest.raises(TypeError, match="must be a dict"):
        r.plot_contour(points=[(0, 0)])
    with pytest.raises(TypeError, match="\\[k, 2\\]"):
        r.plot_contour(points={"SWA": (0.0, 1.0, 2.0)})
    with pytest.raises(TypeError, match="finite"):
        r.plot_contour(points={"SWA": (float("nan"), 1.0)})
    plt.close("all")


# ---- refusals ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    P = ParamLayout(model).numel
    data = _data((5,))
    d2 = torch.randn(2, P)
    ab = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3))
    with pytest.raises(ValueError, match="P = "):
        grid(model, loss_fn, data, torch.randn(2, P + 1), ab, progress=False)
    with pytest.raises(ValueError, match="m = 1 or 2"):
        grid(model, loss_fn, data, torch.randn(3, P), ab, progress=False)
    with pytest.raises(ValueError, match="at least 2 offsets"):
        grid(model, loss_fn, data, d2, (torch.tensor([0.0]), torch.linspace(-1, 1, 3)), progress=False)
    with pytest.raises(TypeError, match="coords must be a pair"):
        grid(model, loss_fn, data, d2, torch.linspace(-1, 1, 3), progress=False)
    with pytest.raises(ValueError, match="no examples"):
        grid(model, loss_fn, [], d2, ab, progress=False)
    with pytest.raises(ValueError, match="no examples"):
        grid(model, loss_fn, [(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))], d2, ab, progress=False)
    with pytest.raises(ValueError, match="bn must be one of"):
        grid(model, loss_fn, data, d2, ab, bn="train", progress=False)
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        grid(model, loss_fn, data, d2, ab, distributed="yes", progress=False)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        with pytest.raises(ValueError, match="distributed=True but torch.distributed is not initialised"):
            grid(model, loss_fn, data, d2, ab, distributed=True, progress=False)
    with pytest.raises(TypeError, match="directions must be a floating-point"):
        grid(model, loss_fn, data, torch.ones(2, P, dtype=torch.long), ab, progress=False)
    with pytest.raises(ValueError, match="batch_points"):
        grid(model, loss_fn, data, d2, ab, batch_points=0, progress=False)
    with pytest.raises(ValueError, match="normalization must be"):
        random_directions(model, normalization="batch")
    with pytest.raises(ValueError, match="ignore must be"):
        random_directions(model, ignore="bias")
    with pytest.raises(ValueError, match="steps"):
        interpolate(model, _mlp(), 1, loss_fn, data)
    with pytest.raises(TypeError, match=r"steps \(points on the line, ends included\) must be an int"):
        interpolate(model, _mlp(), 2.0, loss_fn, data)
    wider = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"^model_b has other trainable parameters than model_a \("):
        interpolate(model, wider, 3, loss_fn, data)  # it named others[0] and model
    bad = _mlp()
    bad.register_parameter("count", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    with pytest.raises(TypeError, match="'count' has dtype torch.int64"):
        random_directions(bad)
    with pytest.raises(TypeError, match="'count' has dtype"):
        grid(bad, loss_fn, data, d2, ab, progress=False)


def test_dataloader_and_single_batch_data():
    from torch.utils.data import DataLoader, TensorDataset

    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    data = _data((5,))
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(4))
    coords = torch.linspace(-1, 1, 5)
    ref = grid(model, loss_fn, data, d, coords, progress=False).loss
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches 4, 4, 4, 4, 2: another split
    torch.testing.assert_close(grid(model, loss_fn, loader, d, coords, progress=False).loss, ref)
    torch.testing.assert_close(grid(model, loss_fn, (x, y), d, coords, progress=True).loss, ref)


def test_first_layer_products_are_computed_once_per_block_across_chunks(monkeypatch):
    # the m + 1 first-layer products of a block were recomputed for every chunk of points
    from torch.utils.data import DataLoader, TensorDataset
    import pyfastbayes.landscape._first_layer as fl

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    ab = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 4))  # 12 points: 6 chunks of 2
    plain = grid(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])], d, ab, first_layer=False,
                 batch_points=2, progress=False)
    calls = []
    real = fl.FirstLayer.parts
    monkeypatch.setattr(fl.FirstLayer, "parts", lambda self, *a: calls.append(1) or real(self, *a))
    data = [(x[:10], y[:10]), (x[10:], y[10:])]
    res = grid(model, nn.CrossEntropyLoss(), data, d, ab, batch_rows=4, batch_points=2, progress=False)
    # blocks of 4, 4, 2 and 4, 4, 4, 1 rows: computed in the first two chunks (kept once seen again), then reused
    assert len(calls) == 2 * (3 + 4)
    torch.testing.assert_close(res.loss, plain.loss, rtol=1e-5, atol=1e-6)
    calls.clear()  # a DataLoader gives new tensors every pass: computed per chunk (nothing kept by mistake)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    res = grid(model, nn.CrossEntropyLoss(), loader, d, ab, batch_rows=1000, batch_points=2, progress=False)
    assert len(calls) == 3 * 6
    torch.testing.assert_close(res.loss, plain.loss, rtol=1e-5, atol=1e-6)
    calls.clear()  # one buffer refilled in place for every batch (a prefetcher): never another batch's products
    # (copy_ bumps the tensor's version; .data.copy_ and numpy writes do not: the cache compares contents)
    buf = torch.empty(10, 5)
    refills = {"copy_": lambda xb: buf.copy_(xb), "data": lambda xb: buf.data.copy_(xb),
               "numpy": lambda xb: np.copyto(buf.numpy(), xb.numpy())}
    want = grid(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:20], y[10:20])], d, ab, first_layer=False,
                batch_points=2, progress=False)
    for how, refill in refills.items():
        class Refill:
            def __iter__(self):
                for xb, yb in [(x[:10], y[:10]), (x[10:20], y[10:20])]:
                    refill(xb)
                    yield buf, yb
        got = grid(model, nn.CrossEntropyLoss(), Refill(), d, ab, batch_rows=1000, batch_points=2, progress=False)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6, msg=how)
    calls.clear()  # over the budget: computed every time, the same numbers
    monkeypatch.setattr(fl, "CACHE_BYTES", 0)
    res = grid(model, nn.CrossEntropyLoss(), data, d, ab, batch_rows=4, batch_points=2, progress=False)
    assert len(calls) == 7 * 6
    torch.testing.assert_close(res.loss, plain.loss, rtol=1e-5, atol=1e-6)


def test_row_blocks_change_nothing_but_rounding():
    """Splitting each data batch into blocks of rows (batch_rows) weights the blocks by their rows:
    the same means as whole batches, for sizes that do and do not divide the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    ab = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 4))
    whole = grid(model, nn.CrossEntropyLoss(), (x, y), d, ab, batch_rows=1000, progress=False)
    for rows in (1, 5, 23):
        part = grid(model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])], d, ab, batch_rows=rows,
                    progress=False)
        torch.testing.assert_close(part.loss, whole.loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch_rows must be an int >= 1, got 0"):
        grid(model, nn.CrossEntropyLoss(), (x, y), d, ab, batch_rows=0, progress=False)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_first_layer_shortcut_equals_the_plain_path(kind):
    """grid(first_layer=True) combines the first layer's output from its m + 1 products per block;
    it must give the plain path's numbers up to float32 rounding (and metrics too)."""
    from pyfastbayes.landscape import random_directions, grid
    from pyfastbayes.landscape import _first_layer

    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        x = torch.randn(50, 6)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 16, 3))
        x = torch.randn(50, 1, 8, 8)
    y = torch.randint(0, 3, (50,))
    layout = ParamLayout(model)
    first = _first_layer.find(model, layout, x)
    assert first is not None and first.name == "0"
    D = random_directions(model, n=2, generator=torch.Generator().manual_seed(1))
    acc = {"acc": lambda out, t: (out.argmax(-1) == t).float().mean()}
    axes = (torch.linspace(-1, 1, 5), torch.linspace(-0.5, 0.5, 4))
    plain = grid(model, torch.nn.CrossEntropyLoss(), [(x[:30], y[:30]), (x[30:], y[30:])], D, axes, metrics=acc,
                 first_layer=False, batch_rows=7, progress=False)
    short = grid(model, torch.nn.CrossEntropyLoss(), [(x[:30], y[:30]), (x[30:], y[30:])], D, axes, metrics=acc,
                 first_layer=True, batch_rows=7, progress=False)
    torch.testing.assert_close(short.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short.metrics["acc"], plain.metrics["acc"])
    assert isinstance(model[0], torch.nn.Linear if kind == "mlp" else torch.nn.Conv2d)  # the layer is back


def test_first_layer_shortcut_is_not_used_where_it_does_not_apply():
    from pyfastbayes.landscape import _first_layer

    class Scaled(torch.nn.Module):  # the first layer sees 2 x, not the model's input
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(2 * x)

    model = Scaled()
    assert _first_layer.find(model, ParamLayout(model), torch.randn(4, 3)) is None
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3))
    tied.append(tied[0])  # called twice
    assert _first_layer.find(tied, ParamLayout(tied), torch.randn(4, 3)) is None


class _TiedWeight(nn.Module):  # the first layer's weight is also the second layer's
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class _Alias(nn.Module):  # the first layer registered under two names, called through the second
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.first = self.fc1

    def forward(self, x):
        return self.fc2(torch.relu(self.first(x)))


class _TiedDecoder(nn.Module):  # reads the first layer's weight outside its call
    def __init__(self):
        super().__init__()
        self.enc, self.out = nn.Linear(5, 8), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.nn.functional.linear(torch.relu(self.enc(x)), self.enc.weight.t()))


class _ReadsWidth(nn.Module):  # reads a plain attribute of the first layer: the shortcut still applies
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).view(-1, self.fc1.out_features))


def _hooked():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return model


# these four gave the centre's first layer at every point (silently wrong surfaces) or, for
# _ReadsWidth, "'_StandIn' object has no attribute 'out_features'"
@pytest.mark.parametrize("make,eligible", [(_TiedWeight, False), (_Alias, False), (_TiedDecoder, False),
                                           (_hooked, False), (_ReadsWidth, True)],
                         ids=["tied_weight", "alias", "tied_decoder", "hook", "reads_width"])
def test_first_layer_shortcut_only_where_every_path_sees_the_point(make, eligible):
    from pyfastbayes.landscape import _first_layer

    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    assert (_first_layer.find(model, ParamLayout(model), x) is not None) == eligible
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([-1.0, 0.0, 0.5])
    got = grid(model, nn.CrossEntropyLoss(), (x, y), d, coords, progress=False).loss
    torch.testing.assert_close(got, _reference(model, nn.CrossEntropyLoss(), [(x, y)], d, [coords]),
                               rtol=1e-5, atol=1e-6)
    assert all(type(m) is not _first_layer._StandIn for m in model.modules())  # put back


def _mlp8():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _masked_mse(out, y):  # a user's mean over the rows a mask keeps: not a plain mean over rows
    mask = (y >= 1).to(out.dtype)
    return ((out[:, 0] - y.to(out.dtype)) ** 2 * mask).sum() / mask.sum()


# blocks of rows were weighted by their row counts: ignored labels, class weights or a masked mean
# gave other numbers than whole batches (or NaN for a block whose labels were all ignored)
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5])),
                                     _masked_mse], ids=["ignore_index", "class_weights", "masked_mse"])
def test_row_blocks_give_each_batch_its_own_value(loss_fn):
    model = _mlp8()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(1100, 8, generator=g), torch.randint(0, 3, (1100,), generator=g)
    y[:530] = -100 if loss_fn is not _masked_mse else 0  # the first block (512 rows) ignored whole
    if loss_fn is _masked_mse:
        y[530:] = torch.randint(0, 3, (570,), generator=g)
    else:
        y[600:700] = -100
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([-1.0, 0.0, 1.0])
    want = _reference(model, loss_fn, [(x, y)], d, [coords])
    default = grid(model, loss_fn, (x, y), d, coords, progress=False).loss  # CPU default: 512-row blocks where exact
    torch.testing.assert_close(default, want, rtol=1e-5, atol=1e-6)
    if loss_fn is not _masked_mse:  # recognised cross-entropy combines its blocks exactly, any split
        small = grid(model, loss_fn, (x, y), d, coords, batch_rows=16, progress=False).loss
        torch.testing.assert_close(small, want, rtol=1e-5, atol=1e-6)


class _TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x, w):  # w: a weight shared by the rows, [8] or 0-dim
        return self.lin(x * w)


# the default row blocks sliced every input along its first dimension: a shared [8] weight, a 0-dim
# scale or targets flattened over tokens crashed on any batch over 512 rows
@pytest.mark.parametrize("case", ["shared_vector", "scalar", "tokens"])
def test_inputs_without_the_batch_rows_are_not_split(case):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if case == "tokens":
        class Tokens(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)

            def forward(self, x):  # [B, T, 4] -> [B * T, 3]
                return self.lin(x).reshape(-1, 3)

        model = Tokens()
        x, y = torch.randn(100, 8, 4, generator=g), torch.randint(0, 3, (800,), generator=g)
        data = (x, y)
    else:
        model = _TwoArgs()
        w = torch.rand(8, generator=g) if case == "shared_vector" else torch.tensor(1.5)
        x, y = torch.randn(600, 8, generator=g), torch.randint(0, 3, (600,), generator=g)
        data = ((x, w), y)
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([-0.5, 0.5])
    got = grid(model, nn.CrossEntropyLoss(), data, d, coords, progress=False).loss

    def run(m):
        inputs = data[0] if isinstance(data[0], tuple) else (data[0],)
        return float(nn.CrossEntropyLoss()(m(*inputs), data[1]))

    for k, a in enumerate(coords):
        m = copy.deepcopy(model).eval()
        ParamLayout(m).write_(ParamLayout(m).flatten() + a * d[0], m)
        with torch.no_grad():
            assert abs(float(got[k]) - run(m)) <= 1e-5


# uint8 class indices (which F.cross_entropy takes) failed in gather(); int32 (which it refuses)
# was taken silently by the fast path
def test_cross_entropy_targets_of_other_integer_dtypes_are_the_loss_own():
    model = _mlp8()
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([-1.0, 1.0])
    want = grid(model, nn.CrossEntropyLoss(), (x, y), d, coords, progress=False).loss
    got = grid(model, nn.CrossEntropyLoss(), (x, y.to(torch.uint8)), d, coords, progress=False).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match=r"loss_fn is a cross-entropy and the targets are torch.int32: class indices "
                                        r"must be int64 or uint8"):
        grid(model, nn.CrossEntropyLoss(), (x, y.to(torch.int32)), d, coords, progress=False)


class _PairInputs(torch.utils.data.Dataset):  # items ((x, w), y): the default collation makes [x, w] a list
    def __init__(self, x, w, y):
        self.x, self.w, self.y = x, w, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.w[i]), self.y[i]


# a DataLoader over a dataset of ((inputs...), target) items was refused: "data item 0 must be an
# (inputs, targets) pair of tensors ..., got a list of 2"
def test_dataloader_of_several_inputs():
    from torch.utils.data import DataLoader

    from pyfastbayes.curvature import hessian

    model = _TwoArgs()
    g = torch.Generator().manual_seed(6)
    x, w, y = torch.randn(20, 8, generator=g), torch.rand(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    loader = DataLoader(_PairInputs(x, w, y), batch_size=8)
    d = random_directions(model, 1, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([-1.0, 0.0, 1.0])
    want = grid(model, nn.CrossEntropyLoss(), [((x[:8], w[:8]), y[:8]), ((x[8:16], w[8:16]), y[8:16]),
                                               ((x[16:], w[16:]), y[16:])], d, coords, progress=False).loss
    torch.testing.assert_close(grid(model, nn.CrossEntropyLoss(), loader, d, coords, progress=False).loss, want)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    H = hessian(model, nn.CrossEntropyLoss(), loader)
    torch.testing.assert_close(H @ v, hessian(model, nn.CrossEntropyLoss(), ((x, w), y)) @ v, rtol=1e-5, atol=1e-6)


def test_pca_directions_of_many_float32_parameters():
    """The rank rule S[0] max(T, P) eps refused every direction from P ~ 1 / eps (8.4 M float32
    parameters): a clean float32 line with a wiggle across 9 M parameters gives both directions
    (aligned with the float64 answer), and an exact line is still refused a second direction."""
    torch.manual_seed(0)
    P, T = 9_000_000, 5
    u = torch.randn(P)
    u /= u.norm()
    v = torch.randn(P)
    v -= (v @ u) * u
    v /= v.norm()
    theta0 = torch.randn(P)  # rows far from 0: their rounding is what a spurious direction would come from
    t = torch.arange(T, dtype=torch.float32)
    traj = theta0 + t[:, None] * u * 10 + torch.tensor([0.0, 1, 0, -1, 0])[:, None] * v * 1.5
    dirs, ratio = pca_directions(traj, 2)
    assert float((dirs[0].double() @ u.double()).abs()) > 0.999 and float((dirs[1].double() @ v.double()).abs()) > 0.999
    assert ratio.sum().item() == pytest.approx(1.0, abs=1e-6) and ratio[1].item() == pytest.approx(0.0036, rel=0.01)
    del dirs, traj
    line = theta0 + t[:, None] * u * 10
    assert pca_directions(line, 1)[1].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="spans only 1 direction"):
        pca_directions(line, 2)
