"""The lecture's loss-landscape pictures on the demo's digits (issue 11), drawn by
``python -m pyfastbayes demo`` into the report folder, their numbers returned for results.json:

1. ``mode_connectivity.png`` (Garipov et al. 2018): the plane through three independently trained
   MLPs with the straight lines between them (the training loss rises between two solutions) and,
   in the plane of two of them and the trained bend, a quadratic Bezier curve whose loss stays low.
2. ``swa_plane.png`` (Izmailov et al. 2018, fig. 1): SGD at a constant high learning rate from the
   MAP (:data:`SWA_LR`), the plane through the SWA solution (the SWAG mean), the last SGD iterate and
   an early one, with every SGD iterate and some SWAG draws projected onto it; along the line
   through SWA and SGD, the region where the loss stays below the higher of their losses + RISE and
   how far each point is from its edge (the paper's picture: SGD near the edge, SWA central); the
   width of the low-loss region along filter-normalised random directions from each.
3. ``residual_slices.png`` (Li et al. 2018): 1-D slices of the training loss along filter-normalised
   random directions (``ignore='biasbn'``) for a deep MLP with residual connections and the same
   MLP (same initial weights) without them, each trained briefly.

Every loss value comes from :mod:`pyfastbayes.landscape` (``grid``, ``interpolate``,
``BezierCurve.fit/evaluate``); the plots are ``LandscapeResult.plot_contour``/``plot_line`` with the
paths, iterates and draws drawn on the returned axes here. Losses are the mean cross-entropy over
the training split (no prior term), the quantity the papers plot.
"""
from __future__ import annotations

import copy
import os
import time

import torch
from torch import Tensor, nn

from .landscape import (BezierCurve, LandscapeResult, directions_to, grid, interpolate, project_trajectory,
                        random_directions)
from .nn import ParamLayout

__all__ = ["plane_through", "low_loss_interval", "ResidualMLP", "mode_connectivity", "swa_plane",
           "residual_slices", "landscape_demo", "print_summary", "markdown"]


# ------------------------------------------------------------------------------------------
# geometry helpers
# ------------------------------------------------------------------------------------------
def plane_through(points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The plane through three points of parameter space (Garipov et al.'s construction).

    Args:
        points: [3, P] floating point, the flat parameters of three models (not collinear).

    Returns:
        (origin [P] = points[0], directions [2, P] orthonormal: d1 along points[1] - points[0], d2
        the part of points[2] - points[0] orthogonal to d1, coords [3, 2] float64) with
        origin + coords[i] @ directions == points[i] up to rounding; the coordinates are Euclidean
        distances in parameter space ((0, 0), (|p1 - p0|, 0), (., > 0)). Gram-Schmidt in float64,
        the directions returned in the points' dtype.
    """
    if not torch.is_tensor(points) or not points.is_floating_point() or points.dim() != 2 or points.shape[0] != 3:
        raise ValueError(f"points must be a floating-point tensor [3, P], got "
                         f"{tuple(points.shape) if torch.is_tensor(points) else type(points).__name__}")
    x = points.double()
    u = x[1] - x[0]
    v = x[2] - x[0]
    nu = u.norm()
    if not nu > 0:
        raise ValueError("points[0] and points[1] coincide: no plane through them")
    d1 = u / nu
    w = v - (v @ d1) * d1
    nw = w.norm()
    # collinear (to rounding): the third point adds no second direction
    if not nw > 1e-9 * max(float(nu), float(v.norm())):
        raise ValueError("the three points are collinear: they span a line, not a plane")
    d2 = w / nw
    coords = torch.tensor([[0.0, 0.0], [float(nu), 0.0], [float(v @ d1), float(nw)]], dtype=torch.float64)
    return points[0].clone(), torch.stack([d1, d2]).to(points.dtype), coords


def loss_at(offsets: Tensor, loss: Tensor, at: float) -> float:
    """The loss [n] along a slice at offsets [n] (increasing), interpolated linearly at ``at``."""
    a, f = offsets.double().cpu(), loss.double().cpu()
    j = int(torch.searchsorted(a, torch.tensor(at, dtype=torch.float64), right=True).clamp(1, len(a) - 1))
    return float(f[j - 1] + (at - a[j - 1]) / (a[j] - a[j - 1]) * (f[j] - f[j - 1]))


def low_loss_interval(offsets: Tensor, loss: Tensor, at: float, rise: float | None = None, *,
                      level: float | None = None) -> tuple[float, float, bool]:
    """The interval around offset ``at`` along a 1-D slice where the loss stays below loss(at) + rise
    (or below ``level``).

    Args:
        offsets: [n] increasing; loss: [n] along the slice; at: an offset inside the slice (the
            loss there is interpolated linearly); rise: > 0; level: instead of ``rise``, the
            threshold itself (above the loss at ``at``).

    Returns:
        (left, right, censored): the offsets where the linearly interpolated loss first exceeds
        loss(at) + rise on each side; censored is True when one side never does inside the slice
        (that side is then the slice's end, and the width right - left a lower bound).
    """
    a = offsets.double().cpu()
    f = loss.double().cpu()
    if a.dim() != 1 or a.shape != f.shape or len(a) < 2 or not bool((a[1:] > a[:-1]).all()):
        raise ValueError("offsets must be increasing [n], n >= 2, and loss [n] of the same shape")
    if not (a[0] <= at <= a[-1]):
        raise ValueError(f"at = {at} lies outside the slice [{float(a[0])}, {float(a[-1])}]")
    if (rise is None) == (level is None):
        raise ValueError("pass exactly one of rise (above the loss at `at`) and level")
    # the slice with the point `at` inserted (its loss interpolated linearly), walked outwards
    f_at = loss_at(a, f, at)
    if level is None:
        if not rise > 0:
            raise ValueError(f"rise must be > 0, got {rise}")
        level = f_at + rise
    elif not level > f_at:
        raise ValueError(f"level = {level} must lie above the loss at `at` ({f_at})")
    xs = a.tolist()
    fs = f.tolist()
    right_side = [(at, f_at)] + [(x, v) for x, v in zip(xs, fs) if x > at]
    left_side = [(at, f_at)] + [(x, v) for x, v in zip(reversed(xs), reversed(fs)) if x < at]

    def edge(side) -> tuple[float, bool]:
        for (x0, v0), (x1, v1) in zip(side, side[1:]):
            if v1 > level:  # v0 <= level < v1: the crossing on this segment
                return x0 + (level - v0) / (v1 - v0) * (x1 - x0), False
        return side[-1][0], True

    (left, c_left), (right, c_right) = edge(left_side), edge(right_side)
    return left, right, c_left or c_right


def _widths(model: nn.Module, train, direction: Tensor, at: dict, reach: float, n: int, progress: bool,
            shared: bool = False):
    """The training loss (``train``: one (inputs, targets) batch) along model + s * direction on n
    offsets s from min(at) - reach to max(at) + reach, and :func:`low_loss_interval` around each
    named offset of ``at``: below its own loss + :data:`RISE`, or with ``shared``, below the one
    level max over the points of their loss + RISE (the region they share); the reach is doubled (at
    most 6 times) while an interval runs into the slice's end. Returns (the 1-D
    :class:`LandscapeResult`, name -> (left, right, censored), the shared level or None)."""
    for _ in range(7):
        s = torch.linspace(min(at.values()) - reach, max(at.values()) + reach, n, dtype=torch.float64)
        res = grid(model, nn.CrossEntropyLoss(), train, direction, s, progress=progress)
        level = max(loss_at(s, res.loss, x) for x in at.values()) + RISE if shared else None
        ivs = {name: low_loss_interval(s, res.loss, x, None if shared else RISE, level=level)
               for name, x in at.items()}
        if not any(c for _, _, c in ivs.values()):
            break
        reach *= 2
    return res, ivs, level


def _model_at(template: nn.Module, flat: Tensor) -> nn.Module:
    """A copy of ``template`` with its trainable parameters set to ``flat`` [P]."""
    m = copy.deepcopy(template)
    ParamLayout(m).write_(flat)
    return m.eval()


def _axes_around(pts: Tensor, n: int, scale: float) -> tuple[Tensor, Tensor]:
    """Square grid axes (alphas [n], betas [n]) centred on the points [k, 2], half-side ``scale``
    x half their larger extent."""
    lo, hi = pts.min(0).values, pts.max(0).values
    mid = (lo + hi) / 2
    half = scale * float((hi - lo).max()) / 2
    return tuple(torch.linspace(float(mid[k]) - half, float(mid[k]) + half, n, dtype=torch.float64) for k in range(2))


def _train_batches(data, seed: int, batch: int = 64) -> list[tuple[Tensor, Tensor]]:
    """The training split as a fixed list of shuffled minibatches (for ``BezierCurve.fit``)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=g).to(data.x_train.device)
    return [(data.x_train[b], data.y_train[b]) for b in idx.split(batch)]


def _contour(res: LandscapeResult, ax, points: dict, lo: float, hi: float, title: str):
    """Filled contour of the loss on log-spaced levels from ``lo`` to ``hi`` (values outside in the
    end colours), the named points marked (``plot_contour``), a colour bar; returns the axes."""
    import numpy as np
    from matplotlib.colors import LogNorm

    lo = max(lo, 1e-5)
    hi = max(hi, lo * 1.5)
    res.plot_contour(ax=ax, points=points, levels=np.geomspace(lo, hi, 25), filled=True, norm=LogNorm(lo, hi),
                     extend="both", cmap="viridis")
    for line in ax.lines:  # plot_contour's markers: white, readable on the dark minima
        line.set_color("white")
        line.set_markeredgecolor("black")
    for text in ax.texts:
        text.set_color("white")
    ax.figure.colorbar(ax.collections[0], ax=ax, shrink=0.8, format="%.2g")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("d1 (parameter-space distance)")
    ax.set_ylabel("d2")
    return ax


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------------------------
# picture 1: mode connectivity
# ------------------------------------------------------------------------------------------
def mode_connectivity(out: str, data, solutions: list[nn.Module], quick: bool, seed: int, progress: bool) -> dict:
    """Straight lines between three trained networks and a trained quadratic Bezier curve between
    the first two; draws ``out``/mode_connectivity.png and returns the numbers."""
    import matplotlib.pyplot as plt

    ce = nn.CrossEntropyLoss()
    train = (data.x_train, data.y_train)
    steps = 11 if quick else 25
    n = 9 if quick else 17
    layout = ParamLayout(solutions[0])
    flats = torch.stack([layout.flatten(m) for m in solutions])
    pairs = [(0, 1), (1, 2), (0, 2)]
    lines = {f"{i}-{j}": interpolate(solutions[i], solutions[j], steps, ce, train, progress=progress) for i, j in pairs}
    t = time.perf_counter()
    curve = BezierCurve(solutions[0], solutions[1], n_bends=1)
    history = curve.fit(ce, _train_batches(data, seed + 11), epochs=4 if quick else 20, lr=1e-2,
                        generator=torch.Generator().manual_seed(seed + 12), progress=progress)
    fit_s = time.perf_counter() - t
    ts = torch.linspace(0, 1, steps, dtype=torch.float64)
    on_curve = curve.evaluate(ts, ce, train)

    # plane A: through the three solutions; plane B: through solutions 0, 1 and the bend (where the
    # quadratic Bezier curve lies exactly)
    origin_a, dirs_a, pts_a = plane_through(flats)
    axes_a = _axes_around(pts_a, n, 1.4)
    plane_a = grid(_model_at(solutions[0], origin_a), ce, train, dirs_a, axes_a, progress=progress)
    bend = curve.bends[0].detach()
    origin_b, dirs_b, pts_b = plane_through(torch.stack([flats[0], flats[1], bend]))
    dense = torch.linspace(0, 1, 101, dtype=torch.float64)
    with torch.no_grad():
        path_b = project_trajectory(torch.stack([curve.point(float(s)) for s in dense]), origin_b, dirs_b)
    axes_b = _axes_around(torch.cat([pts_b, path_b]), n, 1.4)
    plane_b = grid(_model_at(solutions[0], origin_b), ce, train, dirs_b, axes_b, progress=progress)

    ends = [float(lines["0-1"].loss[0]), float(lines["0-1"].loss[-1]), float(lines["1-2"].loss[-1])]
    res = {
        "solution_train_loss": ends,
        "distances": {k: float((flats[j] - flats[i]).norm()) for k, (i, j) in zip(lines, pairs)},
        "line_max_loss": {k: float(r.loss.max()) for k, r in lines.items()},
        "line_t": ts.tolist(),
        "line_loss": {k: r.loss.tolist() for k, r in lines.items()},
        "curve_max_loss": float(on_curve["loss"].max()),
        "curve_loss": on_curve["loss"].tolist(),
        "curve_ends_loss": [float(on_curve["loss"][0]), float(on_curve["loss"][-1])],
        "curve_fit_loss": history.tolist(),
        "curve_fit_s": fit_s,
        "plane_grid": [n, n],
        "plane_solutions_loss_min": float(plane_a.loss.min()),
        "plane_solutions_coords": pts_a.tolist(),
    }

    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(15, 4.6))
    # one colour scale for both planes: from the lowest value of either to 3x the highest barrier
    lo, hi = min(float(plane_a.loss.min()), float(plane_b.loss.min())), 3 * max(res["line_max_loss"].values())
    _contour(plane_a, ax_a, {f"w{i}": tuple(pts_a[i].tolist()) for i in range(3)}, lo, hi,
             "training loss in the plane of three solutions\n(straight lines between them)")
    for i, j in pairs:
        ax_a.plot(pts_a[[i, j], 0], pts_a[[i, j], 1], color="tab:red", lw=1.2, ls="--")
    _contour(plane_b, ax_b, {"w0": tuple(pts_b[0].tolist()), "w1": tuple(pts_b[1].tolist()),
                             "bend": tuple(pts_b[2].tolist())}, lo, hi,
             "plane of w0, w1 and the trained bend\n(Bezier curve solid, straight line dashed)")
    ax_b.plot(path_b[:, 0], path_b[:, 1], color="white", lw=2)
    ax_b.plot(pts_b[:2, 0], pts_b[:2, 1], color="tab:red", lw=1.2, ls="--")
    for k, r in lines.items():
        ax_c.plot(ts, r.loss, ls="--", marker="o", ms=3, label=f"straight line w{k[0]} -> w{k[2]}")
    ax_c.plot(ts, on_curve["loss"], lw=2, marker="o", ms=3, color="k", label="Bezier curve w0 -> w1")
    ax_c.set(yscale="log", xlabel="t", ylabel="training loss (mean NLL)",
             title="loss along the paths (Garipov et al. 2018)")
    ax_c.legend(fontsize=8)
    path = os.path.join(out, "mode_connectivity.png")
    _save(fig, path)
    res["picture"] = path
    return res


# ------------------------------------------------------------------------------------------
# picture 2: SWA in the plane of the SGD iterates
# ------------------------------------------------------------------------------------------
RISE = 0.1  # the width of a low-loss region: where the training loss stays within RISE of the point's
# SGD's constant learning rate for the SWA picture: Izmailov et al. run SWA at a high constant rate
# (their fig. 1); at the table's SWAG rate (0.05) the iterates stay 0.47 apart in a region ~11 wide.
# 0.1, 0.2 and 0.3 (3 data orders each) all put SWA nearer the centre of the line's low-loss region
# than SGD (edge distance 1.1-2.8x SGD's; at 0.05: 1.1x)
SWA_LR = 0.2


def swa_plane(out: str, data, sgd_model: nn.Module, swag, iterates: list[Tensor], quick: bool, seed: int,
              progress: bool, lr: float = SWA_LR) -> dict:
    """The plane through SWA, the last SGD iterate and the first one of the SWAG run (the SGD
    iterates and SWAG draws projected onto it); along the line through SWA and SGD the low-loss
    region they share (loss below the higher of their two losses + RISE) and each point's distance
    to its nearer edge (``margin``); the widths of the low-loss region around each along random
    directions; draws ``out``/swa_plane.png and returns the numbers."""
    import matplotlib.pyplot as plt

    ce = nn.CrossEntropyLoss()
    train, test = (data.x_train, data.y_train), (data.x_test, data.y_test)
    n = 9 if quick else 21
    layout = ParamLayout(sgd_model)
    swa = swag.mean.to(layout.dtype)
    its = torch.stack([t.to(layout.dtype) for t in iterates])  # [epochs, P]
    sgd = its[-1]
    origin, dirs, pts = plane_through(torch.stack([swa, sgd, its[0]]))
    draws = swag.sample(8 if quick else 20, generator=torch.Generator().manual_seed(seed + 21)).to(layout.dtype)
    it_xy, draw_xy = project_trajectory(its, origin, dirs), project_trajectory(draws, origin, dirs)
    axes = _axes_around(torch.cat([pts, it_xy]), n, 2.5)
    swa_model = _model_at(sgd_model, swa)
    plane = grid(swa_model, ce, train, dirs, axes, progress=progress)

    # along the line through SWA (offset 0) and SGD (offset d), in parameter-space distance: the region
    # both share and how central each is in it; along filter-normalised random directions from each
    # point (Li et al.'s units: a unit step has the size of each filter): the width at its own loss
    d = float((sgd - swa).norm())
    line, line_iv, level = _widths(swa_model, train, directions_to(swa_model, [sgd])[0] / d,
                                   {"SWA": 0.0, "SGD": d}, 8 * d, 41 if quick else 81, progress, shared=True)
    k = 2 if quick else 3
    random_w, slices = {}, {}
    for name, model in (("SWA", swa_model), ("SGD", _model_at(sgd_model, sgd))):
        dirs_r = random_directions(model, k, "filter", "biasbn", generator=torch.Generator().manual_seed(seed + 22))
        ivs = [_widths(model, train, dirs_r[i], {name: 0.0}, 2.0, 21 if quick else 41, progress) for i in range(k)]
        slices[name] = [r for r, _, _ in ivs]
        ivs = [iv[name] for _, iv, _ in ivs]
        random_w[name] = {"mean_width": sum(b - a for a, b, _ in ivs) / k, "censored": sum(c for _, _, c in ivs),
                          "directions": k}

    def losses(flat):
        m = _model_at(sgd_model, flat)
        with torch.no_grad():
            return [float(ce(m(x), y)) for x, y in (train, test)]

    (swa_train, swa_test), (sgd_train, sgd_test) = losses(swa), losses(sgd)
    res = {
        "epochs": len(iterates), "lr": lr, "swa_sgd_distance": d, "rise": RISE,
        "train_loss": {"SWA": swa_train, "SGD": sgd_train}, "test_loss": {"SWA": swa_test, "SGD": sgd_test},
        "line_level": level,
        "line_width": {name: {"left": a, "right": b, "width": b - a, "censored": c,
                              "margin": min(at - a, b - at)}
                       for (name, (a, b, c)), at in zip(line_iv.items(), (0.0, d))},
        "random_width": random_w,
        "line_min_at": float(line.coords[0][int(line.loss.argmin())]),
        "plane_grid": [n, n], "plane_coords": {"SWA": pts[0].tolist(), "SGD": pts[1].tolist(),
                                               "SGD first": pts[2].tolist()},
        "swag_draws": len(draws),
    }

    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(15, 4.6))
    _contour(plane, ax_a, {"SWA": tuple(pts[0].tolist()), "SGD": tuple(pts[1].tolist())}, float(plane.loss.min()),
             float(plane.loss.max()),
             "training loss in the plane of SWA,\nthe last and the first SGD iterate")
    ax_a.plot(it_xy[:, 0], it_xy[:, 1], ".", color="tab:orange", ms=5, label="SGD iterates (projected)")
    ax_a.plot(draw_xy[:, 0], draw_xy[:, 1], "x", color="tab:red", ms=5, label="SWAG draws (projected)")
    ax_a.legend(fontsize=7, loc="lower left")
    line.plot_line(ax=ax_b, color="k")
    ax_b.axhline(level, color="0.5", lw=1, ls="--", label=f"the higher of their losses + {RISE:g}")
    for i, (name, color, at) in enumerate((("SWA", "tab:blue", 0.0), ("SGD", "tab:orange", d))):
        w = res["line_width"][name]
        ax_b.axvline(at, color=color, lw=1)
        edge = w["left"] if at - w["left"] <= w["right"] - at else w["right"]
        y = level * (1.15 + 0.25 * i)  # (log scale) the two distances drawn just above the level
        ax_b.plot([at, edge], [y, y], color=color, lw=3, label=f"{name}: {w['margin']:.2f} to the region's edge"
                  + (" (censored)" if w["censored"] else ""))
    ax_b.set(yscale="log", xlabel="distance from SWA along SWA -> SGD", ylabel="training loss",
             title="the line through SWA and SGD (Izmailov et al. 2018):\nSGD near the edge, SWA central?")
    ax_b.legend(fontsize=7)
    for name, color in (("SWA", "tab:blue"), ("SGD", "tab:orange")):
        for i, r in enumerate(slices[name]):
            r.plot_line(ax=ax_c, color=color, alpha=0.8, label=name if i == 0 else None)
    ax_c.set(yscale="log", xlabel="alpha (filter-normalised direction)", ylabel="training loss",
             title=f"{k} random directions from each\n(mean width: SWA {random_w['SWA']['mean_width']:.2f}, "
                   f"SGD {random_w['SGD']['mean_width']:.2f})")
    ax_c.title.set_fontsize(9)
    ax_b.title.set_fontsize(9)
    ax_c.legend(fontsize=8)
    path = os.path.join(out, "swa_plane.png")
    _save(fig, path)
    res["picture"] = path
    return res


# ------------------------------------------------------------------------------------------
# picture 3: residual connections
# ------------------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    """x -> h = relu(W_in x) -> ``depth`` blocks -> W_out h, a block relu(BN(W h)), added to h with
    ``residual`` (h + relu(BN(W h))) and replacing it without: the same parameters, only the skip
    connections differ. BatchNorm as in Li et al.'s ResNets and their no-skip twins: the deep plain
    net trains, the residual sum does not blow up, and the loss is invariant to each filter's scale,
    which is what filter-normalised directions assume."""

    def __init__(self, n_in: int, width: int, depth: int, n_out: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width))
                                     for _ in range(depth)])
        self.out = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h)) if self.residual else torch.relu(block(h))
        return self.out(h)


RES_WIDTH, RES_DEPTH = 64, 10  # a deep narrow MLP: Li et al.'s effect grows with depth


def residual_slices(out: str, data, quick: bool, seed: int, progress: bool) -> dict:
    """Train the MLP with and without residual connections from the same initial weights, slice
    the training loss along filter-normalised random directions; draws ``out``/residual_slices.png
    and returns the numbers: at each net the loss, the mean second difference at alpha = 0 and the
    mean rise at |alpha| = 1 over the directions."""
    import matplotlib.pyplot as plt

    from .demo import ID_CLASSES, _train

    ce = nn.CrossEntropyLoss()
    train = (data.x_train, data.y_train)
    k = 2 if quick else 3
    alphas = torch.linspace(-1.0, 1.0, 21 if quick else 31, dtype=torch.float64)
    h = float(alphas[1] - alphas[0])
    mid = len(alphas) // 2
    torch.manual_seed(seed + 31)
    init = ResidualMLP(data.x_train.shape[1], RES_WIDTH, RES_DEPTH, ID_CLASSES, True).to(data.x_train.device)
    res, slices = {"width": RES_WIDTH, "depth": RES_DEPTH, "directions": k, "epochs": 3 if quick else 10}, {}
    for name, residual in (("residual", True), ("plain", False)):
        model = copy.deepcopy(init)
        model.residual = residual
        _train(model, torch.optim.Adam(model.parameters(), lr=1e-3), data, res["epochs"], seed + 32,
               f"{name} MLP (Adam)", progress, prior_in_loss=False)
        model.eval()
        dirs = random_directions(model, k, "filter", "biasbn", generator=torch.Generator().manual_seed(seed + 33))
        # bn='recompute': at every point the BatchNorm statistics of that point's weights
        slices[name] = [grid(model, ce, train, dirs[i], alphas, bn="recompute", progress=progress) for i in range(k)]
        loss0 = sum(float(r.loss[mid]) for r in slices[name]) / k
        with torch.no_grad():
            acc = float((model(data.x_test).argmax(-1) == data.y_test).double().mean())
        res[name] = {
            "train_loss": loss0, "test_acc": acc,
            "curvature": sum(float(r.loss[mid + 1] + r.loss[mid - 1] - 2 * r.loss[mid]) / h**2
                             for r in slices[name]) / k,
            "rise_at_1": sum(float(r.loss[0] + r.loss[-1]) / 2 - float(r.loss[mid]) for r in slices[name]) / k,
            "max_loss": max(float(r.loss.max()) for r in slices[name]),
            # where the loss stays within RISE of the centre's (censored: not reached at |alpha| = 1)
            "mean_width": sum(b - a for a, b, _ in (low_loss_interval(alphas, r.loss, 0.0, RISE)
                                                    for r in slices[name])) / k,
            "width_censored": sum(low_loss_interval(alphas, r.loss, 0.0, RISE)[2] for r in slices[name]),
        }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, scale in zip(axes, ("linear", "log")):
        for name, color in (("residual", "tab:blue"), ("plain", "tab:red")):
            for i, r in enumerate(slices[name]):
                r.plot_line(ax=ax, color=color, ls="-" if name == "residual" else "--",
                            label=f"{name} (curvature {res[name]['curvature']:.2f})" if i == 0 else None)
        ax.set(yscale=scale, ylabel="training loss", xlabel="alpha (filter-normalised direction, ignore='biasbn')")
        ax.legend(fontsize=8)
    fig.suptitle(f"MLP with {RES_DEPTH} hidden blocks of {RES_WIDTH} (Linear-BatchNorm-ReLU), with and without skip "
                 f"connections, {k} random directions each (Li et al. 2018)", fontsize=10)
    path = os.path.join(out, "residual_slices.png")
    _save(fig, path)
    res["picture"] = path
    return res


# ------------------------------------------------------------------------------------------
# entry
# ------------------------------------------------------------------------------------------
def landscape_demo(out: str, data, quick: bool, seed: int, progress: bool, *, map_model: nn.Module | None = None,
                   map_epochs: int | None = None, sgd_model: nn.Module | None = None, swag=None,
                   iterates: list[Tensor] | None = None, swa_lr: float = SWA_LR) -> dict:
    """The three pictures; returns their numbers (results.json's "landscape") and prints a summary.

    Args:
        out: the report folder; data: the demo's :class:`~pyfastbayes.demo.Digits`.
        map_model: the demo's MAP network, used as the first of the three solutions (None: trained
            here); the other two are trained with the same recipe (``train_map``, ``map_epochs``
            epochs, default 15 quick / 60 full) from seeds seed + 1 and seed + 2.
        sgd_model, swag, iterates: a SWAG run for the SWA picture (``run_swag``: the last SGD
            iterate, the SWAG posterior, the flat parameters after every epoch; its learning rate
            ``swa_lr``); None (default): run here from the MAP at :data:`SWA_LR`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from .demo import run_swag, train_map

    t0 = time.perf_counter()
    epochs = map_epochs or (15 if quick else 60)
    if map_model is None:
        map_model = train_map(data, epochs, seed, progress)
    solutions = [map_model.eval()] + [train_map(data, epochs, seed + k, progress).eval() for k in (1, 2)]
    results, times = {}, {}
    t = time.perf_counter()
    results["mode_connectivity"] = mode_connectivity(out, data, solutions, quick, seed, progress)
    times["mode_connectivity"] = time.perf_counter() - t
    t = time.perf_counter()
    if swag is None or sgd_model is None or not iterates:
        iterates = []
        swag, sgd_model = run_swag(map_model, data, 8 if quick else 50, seed, progress, iterates=iterates,
                                   lr=swa_lr)
    results["swa"] = swa_plane(out, data, sgd_model, swag, iterates, quick, seed, progress, swa_lr)
    times["swa"] = time.perf_counter() - t
    t = time.perf_counter()
    results["residual"] = residual_slices(out, data, quick, seed, progress)
    times["residual"] = time.perf_counter() - t
    results["time_s"] = {**times, "total": time.perf_counter() - t0}
    print_summary(results)
    return results


def print_summary(res: dict) -> None:
    """The "Loss landscapes" section of the demo's output: the numbers and what they say, also when
    it is not what the papers found."""
    mc, sw, rs = res["mode_connectivity"], res["swa"], res["residual"]
    print("\nLoss landscapes (training NLL; pictures mode_connectivity.png, swa_plane.png, residual_slices.png)")
    ends = ", ".join(f"{v:.4f}" for v in mc["solution_train_loss"])
    lines = ", ".join(f"w{k[0]}-w{k[2]} {v:.3f}" for k, v in mc["line_max_loss"].items())
    print(f"  three independently trained MLPs at loss {ends}; max loss on the straight lines between them: {lines}")
    lower = mc["curve_max_loss"] < mc["line_max_loss"]["0-1"]
    print(f"  trained Bezier curve w0-w1: max loss {mc['curve_max_loss']:.4f} "
          + ("(the curve stays low where the straight line rises)" if lower
             else "(NOT lower than the straight line on this run)"))
    tl, te, lw, rw = sw["train_loss"], sw["test_loss"], sw["line_width"], sw["random_width"]
    d = sw["swa_sgd_distance"]
    print(f"  SWA vs the last SGD iterate ({sw['epochs']} epochs at lr {sw['lr']:g}, {d:.2f} apart): train loss "
          f"{tl['SWA']:.4f} vs {tl['SGD']:.4f}, test loss {te['SWA']:.4f} vs {te['SGD']:.4f}; on the line through "
          f"both the loss is lowest at {sw['line_min_at']:+.2f} (SWA at 0, SGD at {d:.2f})")
    m_swa, m_sgd = lw["SWA"]["margin"], lw["SGD"]["margin"]
    print(f"    on that line, the region below {sw['line_level']:.4f} (the higher loss + {sw['rise']:g}): SWA is "
          f"{m_swa:.2f} from its edge, SGD {m_sgd:.2f}"
          + (" (censored)" if lw["SWA"]["censored"] or lw["SGD"]["censored"] else ""))
    print(f"    width where the loss stays within {sw['rise']:g} of the point's own, mean over "
          f"{rw['SWA']['directions']} filter-normalised directions: SWA {rw['SWA']['mean_width']:.3f} vs SGD "
          f"{rw['SGD']['mean_width']:.3f}")
    central = m_swa > 1.02 * m_sgd
    ratio = rw["SWA"]["mean_width"] / rw["SGD"]["mean_width"]
    verdict = ("SWA lies nearer the centre of the low-loss region and SGD nearer its edge (Izmailov et al.'s "
               "picture)" if central else "SWA is NOT nearer the centre of the low-loss region than SGD on this run")
    verdict += ("; along random directions SWA's region is wider" if ratio > 1.02 else
                "; along random directions the widths agree within 2 %" if ratio >= 0.98 else
                "; along random directions SGD's region is wider")
    print("    " + verdict)
    r, p = rs["residual"], rs["plain"]
    print(f"  MLP {rs['depth']} x {rs['width']} with / without skip connections ({rs['directions']} filter-normalised "
          f"directions): train loss {r['train_loss']:.4f} / {p['train_loss']:.4f}, curvature at 0 "
          f"{r['curvature']:.3f} / {p['curvature']:.3f}, rise at |alpha| = 1 {r['rise_at_1']:.3f} / "
          f"{p['rise_at_1']:.3f}, width (rise {RISE:g}) {r['mean_width']:.3f} / {p['mean_width']:.3f}")
    print(f"  ({res['time_s']['total']:.1f} s)")


def markdown(res: dict) -> str:
    """The landscape section of results.md."""
    mc, sw, rs = res["mode_connectivity"], res["swa"], res["residual"]
    lines = ["\n## Loss landscapes (training NLL)\n",
             "| path | max loss |", "|---|---|"]
    lines += [f"| straight line w{k[0]} -> w{k[2]} | {v:.4f} |" for k, v in mc["line_max_loss"].items()]
    lines += [f"| Bezier curve w0 -> w1 | {mc['curve_max_loss']:.4f} |", "",
              f"| solution | train loss | test loss | distance to the edge of the shared low-loss region along "
              f"SWA-SGD (level {sw['line_level']:.4f}) | mean width, random directions (rise {sw['rise']:g}) |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {sw['train_loss'][n]:.4f} | {sw['test_loss'][n]:.4f} | {sw['line_width'][n]['margin']:.3f} | "
              f"{sw['random_width'][n]['mean_width']:.3f} |" for n in ("SWA", "SGD")]
    lines += ["", "| MLP | train loss | curvature at 0 | rise at abs(alpha) = 1 |", "|---|---|---|---|"]
    lines += [f"| {n} | {rs[n]['train_loss']:.4f} | {rs[n]['curvature']:.3f} | {rs[n]['rise_at_1']:.3f} |"
              for n in ("residual", "plain")]
    return "\n".join(lines) + "\n"
