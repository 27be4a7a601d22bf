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


def _points(points) -> list[tuple[str, tuple[float, float]]]:
    """plot_contour's ``points`` (None or a dict label -> (alpha, beta)) as (label, (alpha, beta))
    pairs; TypeError for anything else."""
    if points is None:
        return []
    if not isinstance(points, Mapping):
        raise TypeError("points must be a dict label -> (alpha, beta), e.g. {'SGD': (0, 0), 'SWA': (1, 0)}, got "
                        f"{type(points).__name__}")
    out = []
    for name, xy in points.items():
        try:
            pa, pb = xy
            out.append((name, (float(pa), float(pb))))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"points[{name!r}] must be a pair (alpha, beta) of numbers, got {xy!r}") from None
    return out


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
    def _values(self, metric: str | None) -> tuple[np.ndarray, str]:
        if metric is None:
            return _np(self.loss), "loss"
        if metric not in self.metrics:
            raise ValueError(f"metric must be None (the loss) or one of {sorted(self.metrics)}, got {metric!r}")
        return _np(self.metrics[metric]), metric

    def _need(self, ndim: int, what: str) -> None:
        if self.ndim != ndim:
            other = "plot_line" if self.ndim == 1 else "plot_contour or plot_surface"
            raise ValueError(f"{what} needs a {ndim}-D landscape, this one is {self.ndim}-D: use {other}")

    def plot_line(self, ax=None, metric: str | None = None, **kwargs):
        """Loss (or ``metric``) along a 1-D line against the offsets; returns the matplotlib axes.
        ``kwargs`` go to ``ax.plot``."""
        self._need(1, "plot_line")
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        values, label = self._values(metric)
        ax.plot(_np(self.coords[0]), values, **kwargs)
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        return ax

    def plot_contour(self, ax=None, points: dict | None = None, metric: str | None = None, levels: int = 30,
                     filled: bool = False, **kwargs):
        """Contour plot of the 2-D surface (alphas on x, betas on y); returns the axes.

        Args:
            ax: the matplotlib axes to draw on (None: a new figure's).
            points: label -> (alpha, beta) to mark and label (e.g. {'SGD': (0, 0), 'SWA': (1, 0)}).
            metric: None for the loss, else a key of :attr:`metrics`.
            levels, filled, kwargs: passed to ``ax.contour`` / ``ax.contourf``.
        """
        self._need(2, "plot_contour")
        marks = _points(points)  # checked before anything is drawn
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        values, label = self._values(metric)
        a, b = _np(self.coords[0]), _np(self.coords[1])
        # values are [n1, n2] indexed (alpha, beta): matplotlib wants Z[y, x], hence the transpose
        cs = (ax.contourf if filled else ax.contour)(a, b, values.T, levels=levels, **kwargs)
        if not filled:
            ax.clabel(cs, inline=True, fontsize=7)
        for name, (pa, pb) in marks:
            ax.plot([float(pa)], [float(pb)], marker="o", linestyle="none")
            ax.annotate(str(name), (float(pa), float(pb)), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_title(label)
        return ax

    def plot_surface(self, ax=None, metric: str | None = None, **kwargs):
        """3-D surface of the 2-D landscape; returns the (3-D) axes. ``kwargs`` go to
        ``ax.plot_surface``."""
        self._need(2, "plot_surface")
        import matplotlib.pyplot as plt

        if ax is None:
            ax = plt.figure().add_subplot(projection="3d")
        values, label = self._values(metric)
        A, B = np.meshgrid(_np(self.coords[0]), _np(self.coords[1]), indexing="ij")
        kwargs.setdefault("cmap", "viridis")
        ax.plot_surface(A, B, values, **kwargs)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_zlabel(label)
        return ax
