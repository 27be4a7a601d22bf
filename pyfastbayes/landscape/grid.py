"""Loss landscapes on a line or a plane: :func:`grid` and :func:`interpolate`.

Engine: the points are evaluated in chunks; the parameters of all c points of a chunk are built at
once (thetas [c, P] = theta0 + coords [c, m] @ directions [m, P], one addmm into a preallocated
buffer), then the data is walked ONCE per chunk and every batch goes through the model for all c
points together (``torch.vmap`` over ``torch.func.functional_call``; the model's own parameters are
never written). The model runs in eval mode (BatchNorm running statistics, no dropout); every
submodule's own mode is restored afterwards. Each point's value is the mean over all examples
(batch means weighted by batch size), accumulated in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import ops
from ..curvature._model_data import as_batches, iterate
from ..nn import ModeGuard
from . import _first_layer
from .directions import layout_of
from .result import LandscapeResult

__all__ = ["grid", "interpolate"]

BN_MODES = ("eval",)
_POINT_BYTES = 256 << 20  # default chunk: the thetas [c, P] of one chunk stay under this size
_MAX_POINTS = 64           # ... and at most this many points (activations grow with c too)


def _points(theta0: Tensor, directions: Tensor, coords: Tensor, out: Tensor) -> Tensor:
    """out [c, P] = theta0 [P] + coords [c, m] @ directions [m, P], written into ``out`` by the fused
    op ``landscape_points_`` (each output element once; coords float64 so offsets are exact)."""
    return ops.landscape_points_(theta0, directions, coords, out)


_CPU_POINT_ROWS = 8_192  # points x rows evaluated together on the CPU (activations stay in cache)


def _row_blocks(x, y: Tensor, nb: int, r: int | None):
    """(inputs, targets, rows) of consecutive blocks of at most r rows of one batch (r None: the batch)."""
    if r is None or nb <= r:
        yield x, y, nb
        return
    for i in range(0, nb, r):
        xr = tuple(a[i:i + r] for a in x) if isinstance(x, tuple) else x[i:i + r]
        yield xr, y[i:i + r], min(r, nb - i)


def _axis(c, name: str, dtype) -> Tensor:
    try:
        t = torch.as_tensor(c, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D tensor (or sequence) of offsets, got {type(c).__name__}") from None
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 offsets, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


def _check_metrics(metrics) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict name -> fn(outputs, targets) -> scalar, got {type(metrics).__name__}")
    for k, f in metrics.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"metrics keys must be non-empty strings, got {k!r}")
        if not callable(f):
            raise TypeError(f"metrics[{k!r}] must be callable (outputs, targets) -> scalar mean")
    return dict(metrics)


def data_sums(model: nn.Module, layout, thetas: Tensor, data, fns, rows: int | None,
              shortcut: tuple | None = None) -> tuple[Tensor, int]:
    """One pass over ``data`` for a chunk of parameter vectors thetas [c, P] (flat, ``layout``'s
    order): returns (sums [len(fns), c] float64, N), sums[f, i] = sum over the batches of rows x
    fns[f](model at thetas[i] on the batch, targets), i.e. N times the mean over the data. Every
    batch is read once for all c points (``torch.vmap`` over ``functional_call``), in blocks of at
    most ``rows`` rows (None: whole batches). ``shortcut`` = (first layer, theta0 [P], directions
    [m, P], coords [c, m]) with thetas = theta0 + coords @ directions: the first layer's output is
    combined from its m + 1 products per block instead of computed per point (_first_layer.py).
    The caller sets no_grad and the model's mode."""
    f64 = torch.float64

    def outputs_to_values(out, y: Tensor) -> Tensor:
        if not torch.is_tensor(out):
            raise TypeError(f"the model must return a tensor of outputs, got {type(out).__name__}")
        return torch.stack([torch.as_tensor(f(out, y), dtype=out.dtype, device=out.device).reshape(()).to(f64)
                            for f in fns])

    def values(theta: Tensor, x, y: Tensor) -> Tensor:
        return outputs_to_values(functional_call(model, layout.unflatten(theta), x if isinstance(x, tuple) else (x,)), y)

    if shortcut is not None:
        first, theta0, dirs, coords = shortcut
        mix = coords.to(thetas.dtype)

        def values_first(theta: Tensor, h: Tensor, x, y: Tensor) -> Tensor:
            _first_layer.hold(h)
            params = {k: v for k, v in layout.unflatten(theta).items() if not k.startswith(first.prefix)}
            return outputs_to_values(functional_call(model, params, (x,)), y)

        batched_first = torch.vmap(values_first, in_dims=(0, 0, None, None))
    batched = torch.vmap(values, in_dims=(0, None, None))
    sums = torch.zeros(len(fns), thetas.shape[0], dtype=f64, device=thetas.device)
    n = 0
    for x, y, nb in iterate(data, thetas.device):
        for xr, yr, nr in _row_blocks(x, y, nb, rows):
            if shortcut is None:
                sums.add_(batched(thetas, xr, yr).t(), alpha=nr)
                continue
            O = first.outputs(xr, theta0, dirs)  # [m + 1, rows, ...]: once for the chunk's points
            h = O[0] + torch.tensordot(mix, O[1:], dims=1)  # [c, rows, ...]
            with first.swapped(model):
                sums.add_(batched_first(thetas, h, xr, yr).t(), alpha=nr)
        n += nb
    if n == 0:
        raise ValueError("data has no examples (no rows in any batch): the mean loss is undefined")
    return sums, n


def grid(model: nn.Module, loss_fn, data, directions: Tensor, coords, *, metrics: dict | None = None,
         bn: str = "eval", batch_points: int | None = None, batch_rows: int | None = None,
         first_layer: bool | None = None, progress: bool = True) -> LandscapeResult:
    """Mean loss (and metrics) of ``model`` at theta0 + offsets along 1 or 2 directions.

    Args:
        model: the network at the centre theta0 (its trainable parameters, P of them).
        loss_fn: (outputs, targets) -> scalar mean over the batch (e.g. ``nn.CrossEntropyLoss()``);
            it must work under ``torch.vmap`` (torch's losses do).
        data: one ``(inputs, targets)`` batch or a re-iterable of them (list, DataLoader); inputs a
            tensor or a tuple of positional model arguments. Read once per chunk of points.
        directions: [m, P] floating point, m = 1 or 2 (e.g. from :func:`random_directions`).
        coords: m = 1: a 1-D tensor alphas [n1]; m = 2: a pair (alphas [n1], betas [n2]); at least
            2 offsets per axis. Point (i, j) is theta0 + alphas[i] d1 + betas[j] d2.
        metrics: name -> fn(outputs, targets) -> scalar mean over the batch (e.g. accuracy),
            evaluated at every point like the loss.
        bn: ``'eval'`` (BatchNorm with the centre's running statistics at every point); the only
            mode supported so far.
        batch_points: points per chunk (default: thetas under 256 MiB, at most 64 points).
        batch_rows: rows of a data batch evaluated together for the chunk's points (default: on the
            CPU, 8 192 point-rows per block, e.g. 64 points x 128 rows, so the chunk's activations
            stay in cache: ~1.5x faster than whole batches of 1797 digits; on CUDA the whole batch).
            Blocks are weighted by their rows, so the result does not depend on it beyond rounding.
        first_layer: use the first-layer shortcut when the model's first layer is an eligible
            Linear / Conv2d (its output at a point combined from m + 1 products per data block, see
            ``_first_layer.py``); False: every point runs the whole model; None (default): on CUDA
            only (on 2 CPU cores it measured no faster for the digits MLP: the vmapped first-layer
            GEMM is cheap there next to writing the combined [c, rows, out] output). Same numbers
            up to rounding.
        progress: a tqdm bar over the chunks.

    Returns:
        :class:`LandscapeResult` with loss [n1] or [n1, n2] (float64) and the metrics.
    """
    layout = layout_of(model)
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES} (BatchNorm in eval mode with the model's running "
                         f"statistics), got {bn!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
    metrics = _check_metrics(metrics)
    if not torch.is_tensor(directions) or not directions.is_floating_point():
        raise TypeError(f"directions must be a floating-point tensor [m, P], got {type(directions).__name__}"
                        + (f" of dtype {directions.dtype}" if torch.is_tensor(directions) else ""))
    if directions.dim() == 1:
        directions = directions[None]
    if directions.dim() != 2 or directions.shape[0] not in (1, 2):
        raise ValueError(f"directions must be [m, P] with m = 1 or 2, got shape {tuple(directions.shape)}")
    m, P = directions.shape
    if P != layout.numel:
        raise ValueError(f"directions must be [m, P] with P = {layout.numel} (the model's trainable parameters), "
                         f"got {tuple(directions.shape)}")
    dtype, device = layout.dtype, layout.device
    f64 = torch.float64
    if m == 1:
        axes = (_axis(coords, "coords", f64),)
        pts = axes[0][:, None]
    else:
        if torch.is_tensor(coords) or not isinstance(coords, (tuple, list)) or len(coords) != 2:
            raise TypeError("coords must be a pair (alphas, betas) of 1-D tensors for 2 directions")
        axes = (_axis(coords[0], "coords[0] (alphas)", f64), _axis(coords[1], "coords[1] (betas)", f64))
        A, B = torch.meshgrid(*axes, indexing="ij")
        pts = torch.stack([A.reshape(-1), B.reshape(-1)], dim=1)  # [n1 * n2, 2], row-major (alpha, beta)
    n_pts = pts.shape[0]
    if batch_points is None:
        c = max(1, min(n_pts, _MAX_POINTS, _POINT_BYTES // (P * torch.empty((), dtype=dtype).element_size())))
    else:
        if isinstance(batch_points, bool) or not isinstance(batch_points, int) or batch_points < 1:
            raise ValueError(f"batch_points must be a positive int or None, got {batch_points!r}")
        c = min(batch_points, n_pts)
    if batch_rows is None:
        r = max(1, _CPU_POINT_ROWS // c) if torch.device(layout.device).type == "cpu" else None
    elif isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int or None, got {batch_rows!r}")
    else:
        r = batch_rows
    data = as_batches(data)

    theta0 = layout.flatten()
    dirs = directions.to(device=device, dtype=dtype)
    pts_dev = pts.to(device=device, dtype=torch.float64)
    thetas = torch.empty(c, P, dtype=dtype, device=device)
    names = ["loss", *metrics]
    fns = [loss_fn, *metrics.values()]
    sums = torch.zeros(len(names), n_pts, dtype=f64, device=device)
    starts = range(0, n_pts, c)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="landscape", total=len(starts), leave=False)
    total = None
    with torch.no_grad(), ModeGuard(model, False):
        first = None
        if first_layer or (first_layer is None and torch.device(device).type == "cuda"):
            example = next(iter(iterate(data, device)), None)
            first = _first_layer.find(model, layout, example[0]) if example is not None else None
        for s in starts:
            e = min(s + c, n_pts)
            th = _points(theta0, dirs, pts_dev[s:e], thetas[:e - s])
            sc = None if first is None else (first, theta0, dirs, pts_dev[s:e])
            sums[:, s:e], n = data_sums(model, layout, th, data, fns, r, sc)
            if total is not None and n != total:
                raise ValueError(f"data gave {n} examples on one pass and {total} on another: every pass must see "
                                 "the same data (a DataLoader with drop_last and shuffling changes nothing, but a "
                                 "stream that changes length does)")
            total = n
    sums.div_(total)
    shape = tuple(len(a) for a in axes)
    res = sums.cpu().reshape(len(names), *shape)
    return LandscapeResult(axes, res[0], {k: res[i + 1] for i, k in enumerate(metrics)})


def interpolate(model_a: nn.Module, model_b: nn.Module, steps: int, loss_fn, data, *, metrics: dict | None = None,
                bn: str = "eval", batch_points: int | None = None, progress: bool = True) -> LandscapeResult:
    """Mean loss along the straight line from ``model_a`` (offset 0) to ``model_b`` (offset 1).

    Args:
        model_a, model_b: two networks with the same trainable parameters (names, shapes, dtypes);
            ``model_a``'s buffers (BatchNorm statistics) are used at every point.
        steps: number of points, >= 2, evenly spaced on [0, 1] (both ends included).
        loss_fn, data, metrics, bn, batch_points, progress: as in :func:`grid`.

    Returns:
        1-D :class:`LandscapeResult`: coords (t [steps],), loss [steps].
    """
    from .directions import directions_to

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (points on the line, ends included), got {steps!r}")
    d = directions_to(model_a, [model_b])
    return grid(model_a, loss_fn, data, d, torch.linspace(0, 1, steps, dtype=torch.float64), metrics=metrics,
                bn=bn, batch_points=batch_points, progress=progress)
