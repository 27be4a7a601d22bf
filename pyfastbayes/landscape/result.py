"""The values of a loss landscape on a grid (:class:`LandscapeResult`): saving, loading, plots."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["LandscapeResult"]


def _float64(value, name: str) -> Tensor:
    """``value`` as a float64 CPU tensor; TypeError naming ``name`` when it holds no numbers."""
    try:
        return torch.as_tensor(value, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor (or array) of numbers, got {type(value).__name__}") from None


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def _points(points, ndim: int = 2) -> list[tuple[str, np.ndarray]]:
    """The plots' ``points`` as (label, offsets [k, ndim]) pairs: None or a dict label -> one point
    ((alpha, beta) on a plane, alpha on a line) or several ([k, 2] / [k] numbers, e.g. SWAG draws
    projected onto the plane); TypeError for anything else."""
    one = "(alpha, beta)" if ndim == 2 else "alpha"
    if points is None:
        return []
    if not isinstance(points, Mapping):
        example = "{'SGD': (0, 0), 'SWA': (1, 0)}" if ndim == 2 else "{'SGD': 0.0, 'SWA': 1.0}"
        raise TypeError(f"points must be a dict label -> {one} or several of them, e.g. {example}, got "
                        f"{type(points).__name__}")
    out = []
    for name, xy in points.items():
        try:
            arr = _np(xy).astype(np.float64).reshape(-1, ndim)
        except (TypeError, ValueError, RuntimeError):
            arr = None
        if arr is None or arr.size == 0 or (ndim == 2 and _np(xy).shape[-1:] != (2,)) or not np.isfinite(arr).all():
            raise TypeError(f"points[{name!r}] must be {one} or [k, {ndim}] finite numbers, got {xy!r}"
                            if ndim == 2 else f"points[{name!r}] must be an offset alpha or a sequence of them "
                            f"(finite numbers), got {xy!r}")
        out.append((name, arr))
    return out


def _check_inside(axes: list[np.ndarray], pts: np.ndarray, name) -> None:
    """ValueError naming the label ``name`` when a point of pts [k, len(axes)] lies outside the
    grid (axes increasing): a plot marks points where it has values, never extrapolated ones."""
    out = np.zeros(len(pts), dtype=bool)
    for i, ax in enumerate(axes):
        tol = 1e-9 * (ax[-1] - ax[0])  # an end point computed in float32 (e.g. a projection) still counts
        out |= (pts[:, i] < ax[0] - tol) | (pts[:, i] > ax[-1] + tol)
    if out.any():
        span = ", ".join(f"{n} in [{ax[0]:g}, {ax[-1]:g}]" for n, ax in zip(("alpha", "beta"), axes))
        raise ValueError(f"points[{name!r}] lies outside the grid ({span}): a plot marks points on the grid only "
                         "(evaluate a larger grid to show it)")


def _interp2(a: np.ndarray, b: np.ndarray, values: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """values [n1, n2] on the grid a x b (both increasing), bilinearly interpolated at pts [k, 2]
    (inside the grid)."""
    i = np.clip(np.searchsorted(a, pts[:, 0], side="right") - 1, 0, len(a) - 2)
    j = np.clip(np.searchsorted(b, pts[:, 1], side="right") - 1, 0, len(b) - 2)
    u = (pts[:, 0] - a[i]) / (a[i + 1] - a[i])
    v = (pts[:, 1] - b[j]) / (b[j + 1] - b[j])
    return ((1 - u) * (1 - v) * values[i, j] + u * (1 - v) * values[i + 1, j] + (1 - u) * v * values[i, j + 1]
            + u * v * values[i + 1, j + 1])


def _mark(ax, name, xs: list[np.ndarray]) -> None:
    """Draw the points of one label: one point as a dot with its label beside it, several as crosses
    under one legend entry."""
    if len(xs[0]) == 1:
        ax.plot(*xs, marker="o", linestyle="none")
        at = tuple(float(x[0]) for x in xs)
        if len(at) == 2:
            ax.annotate(str(name), at, textcoords="offset points", xytext=(4, 4))
        else:
            ax.text(*at, f" {name}")
    else:
        ax.plot(*xs, marker="x", linestyle="none", label=str(name))
        ax.legend(fontsize=8)


@dataclass
class LandscapeResult:
    """Loss (and metrics) on a 1-D line or a 2-D grid of offsets along one or two directions.

    Attributes:
        coords: tuple of 1-D float64 tensors, one per direction: (alphas [n1],) or (alphas [n1],
            betas [n2]); point (i, j) is theta0 + alphas[i] * d1 + betas[j] * d2.
        loss: float64 [n1] or [n1, n2] (the mean loss over all data at each point).
        metrics: name -> float64 tensor of the loss's shape.
    """
    coords: tuple
    loss: Tensor
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if torch.is_tensor(self.coords) or not isinstance(self.coords, (tuple, list)):
            raise TypeError("coords must be a tuple of 1-D tensors, (alphas,) or (alphas, betas), got "
                            f"{type(self.coords).__name__} (wrap a single axis as (alphas,))")
        if not isinstance(self.metrics, Mapping):
            raise TypeError("metrics must be a dict name -> tensor of the loss's shape, got "
                            f"{type(self.metrics).__name__}")
        for k in self.metrics:
            if not isinstance(k, str) or not k:
                raise TypeError(f"metrics keys must be non-empty strings (they name the saved arrays), got {k!r}")
        self.coords = tuple(_float64(c, f"coords[{i}]") for i, c in enumerate(self.coords))
        self.loss = _float64(self.loss, "loss")
        self.metrics = {k: _float64(v, f"metrics[{k!r}]") for k, v in self.metrics.items()}
        if len(self.coords) not in (1, 2) or any(c.dim() != 1 for c in self.coords):
            raise ValueError(f"coords must be 1 or 2 one-dimensional tensors, got shapes "
                             f"{[tuple(c.shape) for c in self.coords]}")
        shape = tuple(len(c) for c in self.coords)
        for name, v in [("loss", self.loss)] + [(f"metrics[{k!r}]", v) for k, v in self.metrics.items()]:
            if tuple(v.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (the lengths of coords), got {tuple(v.shape)}")

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a surface."""
        return len(self.coords)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write an ``.npz`` file: ``coords_0`` (, ``coords_1``), ``loss``, ``metric_<name>``."""
        arrays = {f"coords_{i}": _np(c) for i, c in enumerate(self.coords)}
        arrays["loss"] = _np(self.loss)
        arrays.update({f"metric_{k}": _np(v) for k, v in self.metrics.items()})
        with open(path, "wb") as f:  # an open file: np.savez does not append '.npz' to the name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "LandscapeResult":
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "loss" not in keys or "coords_0" not in keys:
                raise ValueError(f"{path} is not a saved LandscapeResult (needs 'loss' and 'coords_0', "
                                 f"has {sorted(keys)})")
            coords = tuple(torch.from_numpy(z[f"coords_{i}"]) for i in range(2) if f"coords_{i}" in keys)
            metrics = {k[len("metric_"):]: torch.from_numpy(z[k]) for k in z.files if k.startswith("metric_")}
            return cls(coords, torch.from_numpy(z["loss"]), metrics)

    # ---- plots ----------------------------------------------------------------------------------
    def _sorted(self, metric: str | None) -> tuple[list[np.ndarray], np.ndarray, str]:
        """(axes, values, label) for the plots: each axis in increasing order (grid takes offsets in
        any order; drawn as given, a line would zigzag and a surface fold) with the values [n1] /
        [n1, n2] of the loss or ``metric`` permuted alike; repeated offsets are refused."""
        if metric is None:
            values, label = _np(self.loss), "loss"
        elif metric not in self.metrics:
            raise ValueError(f"metric must be None (the loss) or one of {sorted(self.metrics)}, got {metric!r}")
        else:
            values, label = _np(self.metrics[metric]), metric
        axes = []
        for i, c in enumerate(self.coords):
            a = _np(c)
            order = np.argsort(a, kind="stable")
            a = a[order]
            if len(a) > 1 and not (np.diff(a) > 0).all():
                raise ValueError(f"coords[{i}] repeats an offset: a plot needs distinct offsets along each axis")
            values = np.take(values, order, axis=i)
            axes.append(a)
        return axes, values, label

    def _need(self, ndim: int, what: str) -> None:
        if self.ndim != ndim:
            other = "plot_line" if self.ndim == 1 else "plot_contour or plot_surface"
            raise ValueError(f"{what} needs a {ndim}-D landscape, this one is {self.ndim}-D: use {other}")

    def plot_line(self, ax=None, metric: str | None = None, points: dict | None = None, **kwargs):
        """Loss (or ``metric``) along a 1-D line against the offsets (drawn in increasing order,
        whatever order grid was given); returns the matplotlib axes. ``points``: label -> an
        offset alpha (or a sequence of them) to mark on the curve (its value there interpolated
        linearly; e.g. {'SWA': 0.0, 'SGD': 1.0}; offsets outside the line raise ValueError);
        ``kwargs`` go to ``ax.plot``."""
        self._need(1, "plot_line")
        marks = _points(points, 1)  # checked before anything is drawn
        (a,), values, label = self._sorted(metric)
        for name, pts in marks:
            _check_inside([a], pts, name)
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        ax.plot(a, values, **kwargs)
        for name, pts in marks:
            _mark(ax, name, [pts[:, 0], np.interp(pts[:, 0], a, values)])
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        return ax

    def plot_contour(self, ax=None, points: dict | None = None, metric: str | None = None, levels: int = 30,
                     filled: bool = False, **kwargs):
        """Contour plot of the 2-D surface (alphas on x, betas on y); returns the axes.

        Args:
            ax: the matplotlib axes to draw on (None: a new figure's).
            points: label -> (alpha, beta) to mark and label (e.g. {'SGD': (0, 0), 'SWA': (1, 0)}), or
                label -> [k, 2] offsets marked as crosses under one legend entry (e.g. SWAG draws
                projected onto the plane with :func:`~pyfastbayes.landscape.project_trajectory`);
                points outside the grid raise ValueError.
            metric: None for the loss, else a key of :attr:`metrics`.
            levels, filled, kwargs: passed to ``ax.contour`` / ``ax.contourf``.
        """
        self._need(2, "plot_contour")
        marks = _points(points)  # checked before anything is drawn
        (a, b), values, label = self._sorted(metric)
        for name, pts in marks:
            _check_inside([a, b], pts, name)
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        # values are [n1, n2] indexed (alpha, beta): matplotlib wants Z[y, x], hence the transpose
        cs = (ax.contourf if filled else ax.contour)(a, b, values.T, levels=levels, **kwargs)
        if not filled:
            ax.clabel(cs, inline=True, fontsize=7)
        for name, pts in marks:
            _mark(ax, name, [pts[:, 0], pts[:, 1]])
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_title(label)
        return ax

    def plot_surface(self, ax=None, metric: str | None = None, points: dict | None = None, **kwargs):
        """3-D surface of the 2-D landscape; returns the (3-D) axes. ``points`` as in
        :meth:`plot_contour` (marked on the surface, at its bilinearly interpolated height; points
        outside the grid raise ValueError); ``kwargs`` go to ``ax.plot_surface``."""
        self._need(2, "plot_surface")
        marks = _points(points)
        (a, b), values, label = self._sorted(metric)
        for name, pts in marks:
            _check_inside([a, b], pts, name)
        heights = [_interp2(a, b, values, pts) for _, pts in marks]
        import matplotlib.pyplot as plt

        if ax is None:
            ax = plt.figure().add_subplot(projection="3d")
        A, B = np.meshgrid(a, b, indexing="ij")
        kwargs.setdefault("cmap", "viridis")
        ax.plot_surface(A, B, values, **kwargs)
        for (name, pts), z in zip(marks, heights):
            _mark(ax, name, [pts[:, 0], pts[:, 1], z])
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_zlabel(label)
        return ax
