"""Reliability diagram (matplotlib; imported only when called)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._binning import error_from_bins, mode_of, split_stats, uniform_bins
from ._checks import check_n_bins, prepare

__all__ = ["reliability_diagram"]


def _check_ax(ax):
    """``ax`` as None, one Axes, or a tuple of two (a list or a NumPy array of two, as
    ``plt.subplots(1, 2)`` returns, counts as a pair); TypeError / ValueError otherwise, before
    anything is drawn."""
    from matplotlib.axes import Axes

    if ax is None or isinstance(ax, Axes):
        return ax
    if type(ax).__name__ == "ndarray":
        ax = list(ax.ravel())
    if not isinstance(ax, (tuple, list)):
        raise TypeError(f"ax must be None, one matplotlib Axes or a pair of them, got {type(ax).__name__}")
    if len(ax) != 2:
        raise ValueError(f"ax must be one matplotlib Axes or a pair of them, got {len(ax)} items")
    bad = [f"ax[{i}] is {type(a).__name__}" for i, a in enumerate(ax) if not isinstance(a, Axes)]
    if bad:
        raise TypeError(f"ax must be a pair of matplotlib Axes (bars, histogram), but {', '.join(bad)}")
    return tuple(ax)


def _axes(ax):
    """(figure, bars axis, histogram axis, twin) for ``ax`` = None, a pair, or one axis (checked)."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        return fig, ax, ax_hist, False
    if isinstance(ax, tuple):
        return ax[0].figure, ax[0], ax[1], False
    return ax.figure, ax, ax.twinx(), True


def _per_bin(b: Tensor):
    """(accuracy, mean confidence, fraction of points, non-empty mask) per bin, as numpy arrays."""
    cnt, conf_sum, hit_sum = split_stats(b.detach().cpu())  # probabilities that require grad plot too
    nonempty = cnt > 0
    acc = torch.where(nonempty, hit_sum / cnt.clamp_min(1), torch.zeros_like(cnt))
    conf = torch.where(nonempty, conf_sum / cnt.clamp_min(1), torch.zeros_like(cnt))
    frac = cnt / cnt.sum().clamp_min(1)
    return acc.numpy(), conf.numpy(), frac.numpy(), nonempty.numpy()


def reliability_diagram(probs: Tensor, targets: Tensor, n_bins: int = 15, ax=None, from_logits: bool = False,
                        title: str | None = None):
    """Reliability diagram of the top-label confidence (uniform bins, as :func:`ece`); for binary
    [N] probs, of the probability of class 1 against the frequency of class 1 (as :func:`ece`).

    Bars: accuracy (binary [N]: frequency of class 1) per confidence bin, over the diagonal
    (perfect calibration); shaded: the gap between each bin's accuracy and its mean confidence;
    below: the histogram of confidences (fraction of points per bin). ``ax`` may be None (a new
    figure with both panels), a pair (bars axis, histogram axis), or one axis (the histogram then
    sits in its lower quarter, on a twin axis without ticks); a list or NumPy array of two Axes
    (``plt.subplots(1, 2)[1]``) counts as a pair. The ECE is in the legend.

    probs: [N, C], [S, N, C] or [N] (checked as in :func:`ece`); targets: [N]. Returns the
    matplotlib Figure; never calls ``show()``.
    """
    import numpy as np

    n_bins = check_n_bins(n_bins)
    ax = _check_ax(ax)
    prep = prepare(probs, targets, from_logits=from_logits, validate=False)  # values: in the binning pass
    b = uniform_bins(prep, n_bins, from_logits, mode_of(prep, False), True).detach()  # a picture: no graph
    y_label, x_label = ("frequency of class 1", "probability of class 1") if prep.binary else \
        ("accuracy", "confidence")
    acc, conf, frac, m = _per_bin(b)
    err = float(error_from_bins(b.cpu(), "l1"))
    width = 1.0 / n_bins
    left = np.arange(n_bins, dtype=np.float64) * width
    fig, ax, ax_hist, twin = _axes(ax)
    ax.bar(left[m], acc[m], width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label=f"{y_label} (ECE = {err:.4f})")
    lo, hi = np.minimum(acc, conf), np.maximum(acc, conf)
    ax.bar(left[m], (hi - lo)[m], bottom=lo[m], width=width, align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", label=f"gap to mean {x_label}")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(y_label)
    ax.legend(loc="upper left", fontsize="small")
    if title:
        ax.set_title(title)
    ax_hist.bar(left, frac, width=width, align="edge", color="tab:gray", alpha=0.5)
    ax_hist.set_ylabel("fraction of points")
    ax_hist.set_xlim(0, 1)
    if twin:  # keep the histogram in the lower quarter, under the bars
        ax_hist.set_ylim(0, 4 * max(float(frac.max()), 1e-12))
        ax_hist.set_yticks([])
        ax_hist.set_ylabel("")
        ax.set_xlabel(f"{x_label} (grey: histogram)")
    else:
        ax_hist.set_xlabel(x_label)
    return fig
