"""Loss landscapes on a line or a plane: :func:`grid` and :func:`interpolate`.

Engine: the points are evaluated in chunks; the parameters of all c points of a chunk are built at
once (thetas [c, P] = theta0 + coords [c, m] @ directions [m, P], one addmm into a preallocated
buffer), then the data is walked ONCE per chunk and every batch goes through the model for all c
points together (``torch.vmap`` over ``torch.func.functional_call``; the model's own parameters are
never written). The model runs in eval mode (BatchNorm running statistics, no dropout); every
submodule's own mode is restored afterwards. Each point's value is the mean over all examples
(batch means weighted by batch size), accumulated in float64.

bn='recompute' adds a first walk per chunk with the BatchNorm layers in train mode and their
running statistics as per-point buffers [c, ...] vmapped with the points (momentum None: the
cumulative average over the batches), then the evaluation walk reads those buffers. Under
torch.distributed the points are split across the ranks and one all_reduce gathers the surface.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops
from ..calibration._checks import check_int
from .._distributed import distributed_active
from .._memory import allocation_cache
from .._warnings import warn_user
from ..curvature._model_data import as_batches, iterate, shuffles
from ..nn import ModeGuard
from ..nn.calls import buffers_kept
from ..nn.batchnorm import bn_modules
from ..nn.inputs import dtype_mismatch
from ..nn.rows import row_tensors, take_rows
from ..nn.stateless import functional_call
from . import _batched, _first_layer
from ._losses import point_sums, refuse_sum, row_separable
from ._pairs import same_fixed_tensors, warn_other_statistics
from .directions import layout_of
from .result import LandscapeResult

__all__ = ["grid", "interpolate"]

BN_MODES = ("eval", "recompute")
_POINT_BYTES = 256 << 20  # default chunk: the thetas [c, P] of one chunk stay under this size
_MAX_POINTS = 64           # ... and at most this many points (activations grow with c too)


def default_chunk(layout, n_pts: int, cpu_points: int | None = None) -> int:
    """Points per chunk by default: their parameters under 256 MiB (and, on CUDA, under a quarter of
    the free memory), at most ``cpu_points`` on the CPU (default 32, :func:`cpu_tiles`) and 64 on
    CUDA, at most ``n_pts``."""
    P, device = layout.numel, torch.device(layout.device)
    size = torch.empty((), dtype=layout.dtype).element_size()
    cap = (cpu_points or _CPU_POINTS) if device.type == "cpu" else _MAX_POINTS
    c = max(1, min(n_pts, cap, _POINT_BYTES // (P * size)))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        c = max(1, min(c, free // 4 // (P * size)))
    return c


def _points(theta0: Tensor, directions: Tensor, coords: Tensor, out: Tensor) -> Tensor:
    """out [c, P] = theta0 [P] + coords [c, m] @ directions [m, P], written into ``out`` by the fused
    op ``landscape_points_`` (each output element once; coords float64 so offsets are exact)."""
    return ops.landscape_points_(theta0, directions, coords, out)


_CPU_POINTS = 32              # default points per chunk on the CPU
_CPU_ROWS = 256               # default rows per block on the CPU
_CPU_CONV_TILE = (8, 2048)    # ... for a model with convolutions (points, rows)


def cpu_tiles(model: nn.Module) -> tuple[int, int]:
    """(points per chunk, rows per block) by default on the CPU. Linear layers run all points of a
    chunk as one bmm per block: 32 points x 256 rows keep a 128-wide layer's activations [32, 256,
    128] at 4 MiB, near the cache, and beat 512 rows by 6-9 % on the digits MLP grid (2 AMD EPYC
    cores; the bmm at ~190 GFLOP/s on 2 MiB outputs, ~145 on 8 MiB). Convolutions run one per point
    over the block's rows, and oneDNN wants rows: 8 points x whole batches (up to 2048 rows) beat
    32 x 512 by 5-12 % on the digits CNN grid (32 x 256: 15-30 % slower)."""
    if any(type(m) is nn.Conv2d for m in model.modules()):
        return _CPU_CONV_TILE
    return _CPU_POINTS, _CPU_ROWS


def _row_blocks(x, y: Tensor, nb: int, r: int | None):
    """(inputs, targets, rows) of consecutive blocks of at most r rows of one batch (r None: the
    batch); the whole batch also when an input or the targets do not have the batch's nb rows in
    their first dimension (a weight or a scalar shared by the rows, targets flattened over tokens).
    A shared input whose first dimension happens to equal nb cannot be told from a batched one: it
    is split too (grid's batch_rows docstring says so)."""
    # a dict batch's tensors (HuggingFace style) are its inputs; its other values go with every block
    args = x if isinstance(x, tuple) else (x,)
    parts = [v for a in args for v in (row_tensors(a) if isinstance(a, Mapping) else (a,))]
    if r is None or nb <= r or not all(torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == nb for a in (*parts, y)):
        yield x, y, nb
        return
    for i in range(0, nb, r):
        xr = tuple(take_rows(a, slice(i, i + r)) for a in x) if isinstance(x, tuple) else take_rows(x, slice(i, i + r))
        yield xr, y[i:i + r], min(r, nb - i)


def _failed_forward(err: BaseException, x, dtype: torch.dtype, model: nn.Module | None = None) -> BaseException:
    """The error to raise for ``err`` from a forward on inputs ``x``: the TypeError of
    :func:`~pyfastbayes.nn.inputs.dtype_mismatch` naming ``data`` when the dtypes explain it; else,
    given the ``model`` (its own layers back in place), the error of its plain forward on ``x`` at
    its own parameters in eval mode, where that fails too (the batched walk's message speaks of the
    points' dimension: "batch2 tensor ... [9, 5]" for inputs of the wrong width); else ``err``."""
    named = dtype_mismatch(x, dtype, err, name="data")
    if named is not None or model is None or isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return named or err  # (out of memory: no second forward while the failed one's tensors are alive)
    try:
        with torch.no_grad(), ModeGuard(model, False), buffers_kept(model):  # no buffer written (RNG positions)
            model(*(x if isinstance(x, tuple) else (x,)))
    except Exception as plain:  # noqa: BLE001  (the model's own words for what is wrong)
        return plain
    return err


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
        refuse_sum(f, f"metrics[{k!r}]")
    return dict(metrics)


def _per_point(layout, thetas: Tensor) -> dict[str, Tensor]:
    """name -> [c, *shape] per-point parameters of thetas [c, P] (views where the dtypes agree)."""
    c = thetas.shape[0]
    return {n: thetas[:, o:o + math.prod(s)].view(c, *s).to(d)
            for n, s, d, o in zip(layout.names, layout.shapes, layout.dtypes, layout.offsets)}


def _unbatched(batches):
    """The batches of an iterator, each fetched with functorch off: the walk runs inside the vmap
    over the points, whose randomness='error' would refuse a shuffling sampler's randperm or a
    random transform of the data (the data is the same for every point)."""
    while True:
        with torch._C._DisableFuncTorch():
            b = next(batches, None)
        if b is None:
            return
        yield b


class _Loop(nn.Module):
    """Holds the model as ``net`` so that ONE ``functional_call`` (one vmap level) covers the walk
    over all blocks of the data: ``forward(*args)`` is ``body(net, *args)``."""

    def __init__(self, net: nn.Module, body):
        super().__init__()
        self.net, self.body = net, body

    def forward(self, *args):
        return self.body(self.net, *args)


def _walk(model: nn.Module, layout, thetas: Tensor, data, rows: int | None, shortcut, buffers: dict, shared: dict,
          fns, on_batch=None, labels=None, output_fn=None, plan=None) -> tuple[Tensor | None, int]:
    """Walk ``data`` once for a chunk of parameter vectors thetas [c, P] (flat, ``layout``'s order):
    returns (sums [len(fns), c] float64, N examples), sums[f, i] the sum over the blocks (at most
    ``rows`` rows of a batch each; None: whole batches) of rows x fns[f](outputs of point i on the
    block, targets); None when ``fns`` is empty (a walk for its side effects on ``buffers``). ONE
    ``torch.vmap`` over the points covers the whole walk (a vmap and a functional_call per block
    cost ~0.5 ms of Python each): every block goes through the model for all c points at once.
    ``buffers``: name -> [c, ...] per-point buffers, vmapped with the points; ``shared``: name ->
    buffers common to the points (not vmapped; in-place updates act on them once per block).
    ``shortcut`` = (first layer, theta0 [P], directions [m, P], coords [c, m]) with thetas = theta0
    + coords @ directions: the first layer's output is combined from its m + 1 products per block
    instead of computed per point (_first_layer.py). ``shortcut`` may also be a function of the first
    batch's inputs returning it (decided on the data without walking it once more).
    ``on_batch(inputs, targets, rows)`` sees each batch first (the data checksum under
    torch.distributed). ``labels``: the names of ``fns`` in error messages (default: 'loss_fn'
    for the first, 'metric i' for the others). A RuntimeError of the forward with floating-point
    inputs of another dtype than the model's becomes a TypeError naming ``data``
    (:func:`~pyfastbayes.nn.inputs.dtype_mismatch`, the first batch's inputs looked at once the walk failed).
    ``output_fn``: applied to the model's outputs before ``fns`` (None: the outputs themselves).
    ``plan`` (a :class:`_Plan`, optional): where torch.vmap cannot batch the model over the points
    (an nn.LSTM: "Batching rule not implemented") but its plain forward runs, the walk is redone one
    point at a time (:func:`_walk_points`, with a warning) and the plan remembers it for the next
    chunks. The caller sets no_grad and the modes."""
    if plan is not None and plan.one_by_one:
        return _walk_points(model, layout, thetas, data, rows, buffers, shared, fns, on_batch, labels, output_fn)
    c = thetas.shape[0]
    params = _per_point(layout, thetas)  # once per chunk
    batches = iter(iterate(data, thetas.device))
    head = next(batches, None)
    if head is None:
        return (thetas.new_zeros(len(fns), c, dtype=torch.float64) if fns else None), 0
    first, mix = None, None
    with ModeGuard(model, False):  # probes in eval mode (a BatchNorm in train mode would update its stats)
        shortcut = shortcut(head[0]) if callable(shortcut) else shortcut
    if shortcut is not None:  # decided on the first batch (no extra walk)
        first, theta0, dirs, coords = shortcut
        # [c, m + 1] weights (1, a_1, ..., a_m) of the products W0 x, D_1 x, ...: per point one row
        dtype = first.module.weight.dtype  # the layer's own (the products and their combination in it)
        mix = torch.cat([torch.ones_like(coords[:, :1]), coords], dim=1).to(dtype)
        params = {k: v for k, v in params.items() if not k.startswith(first.prefix)}
        stacked = first.weights(theta0, dirs, dtype)  # the m + 1 weight sets, once per walk
    n = 0

    def body(net: nn.Module, mix_p: Tensor | None):
        # one point's view of the whole walk (inside the vmap): sums [len(fns)] float64
        nonlocal n
        total = None
        for x, y, nb in itertools.chain([head], _unbatched(batches)):
            if on_batch is not None:
                on_batch(x, y, nb)
            sums = None  # [len(fns), 2]: (sum, count) over the batch's blocks, each fn's batch value sum / count
            for block, (xr, yr, nr) in enumerate(_row_blocks(x, y, nb, rows)):
                if first is None:
                    out = net(*_args(xr))
                else:  # [rows, m + 1, F]: once for the chunk's points (kept for the next chunks where it can)
                    parts, shape = first.cached_parts(x, block, xr, stacked)
                    # the first layer's combined output, with the activation after it if that is fused
                    _first_layer.hold(lambda act: _batched.combine(parts, mix_p, act, shape))
                    out = net(xr)
                if output_fn is not None:
                    out = output_fn(out)
                if fns:
                    s = point_sums(fns, out, yr, labels)
                    sums = s if sums is None else sums + s
            if fns:  # batch means weighted by the batch's rows
                v = sums[:, 0] / sums[:, 1] * nb
                total = v if total is None else total + v
            n += nb
        return total if total is not None else torch.zeros((), dtype=torch.float64, device=thetas.device)

    # the per-point / shared buffers as they start (the BatchNorm statistics of bn='recompute', small):
    # a walk that fails and is redone one point at a time starts again from them
    start = {k: v.clone() for k, v in {**buffers, **shared}.items()} if plan is not None else {}
    with _batched.swapped(model, conv=thetas.device.type == "cpu") as net, \
            (first.swapped(net) if first is not None else contextlib.nullcontext()):
        loop = _Loop(net, body)
        names = {f"net.{k}": v for k, v in {**params, **buffers}.items()}
        fixed = {f"net.{k}": v for k, v in shared.items()}

        def one(point: dict, mix_p):
            return functional_call(loop, {**point, **fixed}, (mix_p,))

        try:
            sums = torch.vmap(one, in_dims=(0, None if mix is None else 0))(names, mix)
        except Exception as err:  # explained below, once the model's own layers are back
            failure = err
        else:
            failure = None
    if failure is not None:
        wrong = _failed_forward(failure, head[0], layout.dtype, model)
        if wrong is not failure:
            raise wrong from failure
        if plan is None or not _unbatchable(failure):
            raise failure
        plan.one_by_one = True  # the plain forward runs: torch.vmap is what cannot batch the model
        if hasattr(on_batch, "reset"):
            on_batch.reset()  # the failed walk showed it some batches already
        for k, v in start.items():  # ... and may have updated some statistics in place
            (buffers[k] if k in buffers else shared[k]).copy_(v)
        warn_user(f"landscape: torch.vmap cannot batch {_culprit(failure, fns, labels, output_fn)} over the points ("
                  f"{str(failure).splitlines()[0][:160]}); evaluating one point at a time instead (same values, "
                  "much slower: every point runs the model on every batch)", RuntimeWarning)
        return _walk_points(model, layout, thetas, data, rows, buffers, shared, fns, on_batch, labels, output_fn)
    return (sums.T.contiguous() if fns else None), n


def _culprit(err: BaseException, fns, labels, output_fn) -> str:
    """Who raised ``err`` inside the vmap, for the fallback warning: 'loss_fn', a metric's label or
    'output_fn' when a frame of the traceback runs its code (a metric calling ``.item()``), else
    'this model'."""
    def code(fn):
        f = fn.func if isinstance(fn, functools.partial) else fn
        f = f.forward if isinstance(f, nn.Module) else f
        return getattr(getattr(f, "__func__", f), "__code__", None)
    names = list(labels) if labels is not None else ["loss_fn", *(f"metric {i}" for i in range(1, len(fns)))]
    owners = {code(fn): name for fn, name in zip(fns, names)}
    if output_fn is not None:
        owners[code(output_fn)] = "output_fn"
    owners.pop(None, None)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in owners:
            return owners[tb.tb_frame.f_code]
        tb = tb.tb_next
    return "this model"


def _args(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


# how torch.vmap says it cannot batch an operation or a use of a tensor (not errors of the model or the data)
_VMAP_LIMITS = ("Batching rule not implemented", "We could not generate a fallback", "vmap: ")


def _unbatchable(err: BaseException) -> bool:
    """Whether ``err`` is torch.vmap refusing to batch something the plain forward runs (an
    operation without a batching rule, data-dependent control flow, ``.item()``, an in-place write
    into an unbatched tensor, random numbers)."""
    return isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError) and any(
        s in str(err) for s in _VMAP_LIMITS)


def _walk_points(model: nn.Module, layout, thetas: Tensor, data, rows: int | None, buffers: dict, shared: dict, fns,
                 on_batch=None, labels=None, output_fn=None) -> tuple[Tensor | None, int]:
    """:func:`_walk` without torch.vmap: each block of each batch goes through the model once per
    point (``functional_call`` with the point's parameters and buffers; no first-layer shortcut, no
    batched stand-ins), the data still read once for the chunk. ``buffers`` [c, ...] are handed to
    point i as views [i] (in-place updates land in them); ``shared`` buffers are copied per point
    (a BatchNorm's batch counter, which the vmapped walk advances once per block for all points)."""
    c = thetas.shape[0]
    params = _per_point(layout, thetas)
    own = [{k: v.clone() for k, v in shared.items()} for _ in range(c)]
    points = [{**{k: v[i] for k, v in params.items()}, **{k: v[i] for k, v in buffers.items()}, **own[i]}
              for i in range(c)]
    total, n = None, 0
    for x, y, nb in iterate(data, thetas.device):
        if on_batch is not None:
            on_batch(x, y, nb)
        if fns:
            sums = thetas.new_zeros(c, len(fns), 2, dtype=torch.float64)  # (sum, count) per point and fn
        for xr, yr, _ in _row_blocks(x, y, nb, rows):
            for i, point in enumerate(points):
                out = functional_call(model, point, _args(xr))
                if output_fn is not None:
                    out = output_fn(out)
                if fns:
                    sums[i] += point_sums(fns, out, yr, labels)
        if fns:
            v = sums[..., 0] / sums[..., 1] * nb  # [c, len(fns)]
            total = v if total is None else total + v
        n += nb
    if not fns:
        return None, n
    return (total.T.contiguous() if total is not None else thetas.new_zeros(len(fns), c, dtype=torch.float64)), n


class _Plan:
    """The grid's data-dependent choices, made once: the first-layer shortcut (a FirstLayer or
    None), on the first batch the first walk reads (in eval mode, before the layers are swapped for
    their batched stand-ins); ``one_by_one``: whether the walks go one point at a time (torch.vmap
    cannot batch the model, :func:`_walk`)."""

    _UNSET = object()

    def __init__(self, model: nn.Module, layout, use_first: bool):
        self.model, self.layout, self.use_first = model, layout, use_first
        self._first = self._UNSET
        self.one_by_one = False  # set by the first walk that finds torch.vmap cannot batch the model

    def shortcut(self, theta0: Tensor, dirs: Tensor, coords: Tensor):
        """A function of the first inputs: (first layer, theta0, dirs, coords) or None."""
        def decide(x):
            if self._first is self._UNSET:
                self._first = _first_layer.find(self.model, self.layout, x) if self.use_first else None
            return None if self._first is None else (self._first, theta0, dirs, coords)
        return decide


def data_sums(model: nn.Module, layout, thetas: Tensor, data, fns, rows: int | None, shortcut=None, buffers: dict | None = None,
              on_batch=None, labels=None, output_fn=None, plan=None) -> tuple[Tensor, int]:
    """One pass over ``data`` for a chunk of parameter vectors thetas [c, P] (flat, ``layout``'s
    order): returns (sums [len(fns), c] float64, N), sums[f, i] = sum over the blocks of rows x
    fns[f](model at thetas[i] on the block, targets), i.e. N times the mean over the data. Blocks
    of at most ``rows`` rows (None: whole batches); ``shortcut`` as in :func:`_walk`; ``buffers``
    name -> [c, ...]: per-point buffers (the BatchNorm statistics of bn='recompute'); ``on_batch``,
    ``labels``, ``output_fn`` and ``plan`` as in :func:`_walk`. The caller sets no_grad and the model's mode."""
    sums, n = _walk(model, layout, thetas, data, rows, shortcut, buffers or {}, {}, fns, on_batch, labels, output_fn,
                    plan)
    if n == 0:
        raise ValueError("data has no examples (no rows in any batch): the mean loss is undefined")
    return sums, n


def recompute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the BatchNorm layers whose statistics bn='recompute' refreshes: those
    tracking running statistics (the others use batch statistics in eval mode anyway)."""
    ids = {id(m) for m in bn_modules(model)}
    layers = [(n, m) for n, m in model.named_modules() if id(m) in ids]
    if layers and any(isinstance(m, nn.SyncBatchNorm) for _, m in layers) and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        raise ValueError("bn='recompute' with a SyncBatchNorm layer under torch.distributed: in train mode it would "
                         "average statistics across ranks, which evaluate different points; convert the layers to "
                         "BatchNorm (e.g. a copy of the model with nn.BatchNorm*d modules) first")
    for n, m in layers:
        if isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
            raise ValueError(f"bn='recompute': the lazy BatchNorm {n!r} is not initialised; run the model once first")
    return layers


def bn_statistics(model: nn.Module, layout, thetas: Tensor, data, layers, shortcut=None, plan=None) -> dict:
    """The BatchNorm statistics of bn='recompute' for a chunk of points thetas [c, P]: name ->
    [c, ...] running_mean / running_var of every layer in ``layers`` (:func:`recompute_layers`),
    for each point what one pass over ``data`` in train mode with the cumulative average gives
    (statistics reset, momentum None: the mean over the batches of each batch's mean and unbiased
    variance), all c points in the same vmapped pass. Only the BatchNorm layers are in train mode
    (Dropout and the rest stay in eval mode, so the statistics are deterministic); batches are
    whole (a BatchNorm in train mode normalises with the statistics of the batch it sees).
    ``shortcut`` and ``plan`` as in :func:`_walk`. Momenta and modes are restored, also on error."""
    c, device = thetas.shape[0], thetas.device
    buffers, counts = {}, {}
    for name, m in layers:
        pre = f"{name}." if name else ""
        buffers[pre + "running_mean"] = torch.zeros((c, *m.running_mean.shape), dtype=m.running_mean.dtype,
                                                    device=device)
        buffers[pre + "running_var"] = torch.ones((c, *m.running_var.shape), dtype=m.running_var.dtype,
                                                  device=device)
        # the batch count is the same for every point: one shared counter, read by momentum=None
        counts[pre + "num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=device)
    saved = [(m, m.momentum, m.training) for _, m in layers]
    fewest = [None]  # the fewest rows of a batch seen (a Python int per batch: no device work)

    def rows_seen(x, y, nb: int) -> None:
        fewest[0] = nb if fewest[0] is None else min(fewest[0], nb)
    try:
        for m, _, _ in saved:
            m.momentum, m.training = None, True
        _, n = _walk(model, layout, thetas, data, None, shortcut, buffers, counts, [], rows_seen, plan=plan)
    except ValueError as err:
        # torch's "Expected more than 1 value per channel when training": a BatchNorm's batch
        # statistics of a single row (BatchNorm1d on [1, C]); said in terms of the data
        if fewest[0] == 1 and "value per channel" in str(err):
            raise ValueError("bn='recompute' computes batch statistics, which need batches of at least 2 rows; data "
                             "has a batch of 1 row (use larger batches, or drop_last=True in the DataLoader for a "
                             "1-row last batch)") from err
        raise
    finally:
        for m, momentum, training in saved:
            m.momentum, m.training = momentum, training
    if n == 0:
        raise ValueError("data has no examples (no rows in any batch): the mean loss is undefined")
    return buffers


def _batch_dependent(model: nn.Module) -> bool:
    """Whether the model's eval-mode outputs depend on which rows share a batch (a BatchNorm without
    running statistics normalises with the batch's own): then batches are never split into blocks."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


# ---- distributed -----------------------------------------------------------------------------------------
def _dist_check_same(device, values: list[float], what: str) -> None:
    """Refuse (on every rank alike) when the ranks passed different ``values`` (one all_reduce of a
    [world, k] table, each rank filling its row)."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, len(values), dtype=torch.float64, device=device)
    table[rank] = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    table = table.cpu()
    if not torch.allclose(table, table[:1].expand_as(table), rtol=1e-9, atol=0):
        bad = [r for r in range(world) if not torch.allclose(table[r], table[0], rtol=1e-9, atol=0)]
        raise ValueError(f"grid under torch.distributed: rank(s) {bad} passed other {what} than rank 0; every rank "
                         "must call grid with the same arguments (it splits the points, not the data)")


def _fingerprint(*tensors: Tensor) -> list[float]:
    """Cheap summaries (sum, sum of |.|, sum of squares) of tensors, to compare them across ranks."""
    out = []
    for t in tensors:
        d = t.detach().double()
        out += [float(d.sum()), float(d.abs().sum()), float(d.square().sum())]
    return out


class _Checksum:
    """[rows, sum of inputs, sum of targets] in float64 over the batches it is shown (on their
    device, no host sync): compared across ranks, which must see the same data."""

    def __init__(self, device):
        self.acc = torch.zeros(3, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Forget the batches seen (a pass that failed and is run again)."""
        self.acc.zero_()

    def __call__(self, x, y: Tensor, nb: int) -> None:
        self.acc[0] += nb
        for a in (x if isinstance(x, tuple) else (x,)):
            if torch.is_tensor(a):
                self.acc[1] += a.detach().double().sum()
        self.acc[2] += y.detach().double().sum()


def grid(model: nn.Module, loss_fn, data, directions: Tensor, coords, *, metrics: dict | None = None,
         output_fn=None, bn: str = "eval", batch_points: int | None = None, batch_rows: int | None = None,
         first_layer: bool | None = None, distributed: bool | None = None, progress: bool = True) -> LandscapeResult:
    """Mean loss (and metrics) of ``model`` at theta0 + offsets along 1 or 2 directions.

    Args:
        model: the network at the centre theta0 (its trainable parameters, P of them).
        loss_fn: (outputs, targets) -> scalar mean over the batch (e.g. ``nn.CrossEntropyLoss()``);
            it must work under ``torch.vmap`` (torch's losses do).
        data: one ``(inputs, targets)`` batch or a re-iterable of them (list, DataLoader); inputs a
            tensor or a tuple (or list: a DataLoader's collation) of positional model arguments.
            Read once per chunk of points (twice with bn='recompute').
        directions: [m, P] floating point and finite, m = 1 or 2 (e.g. from :func:`random_directions`).
        coords: m = 1: a 1-D tensor alphas [n1]; m = 2: a pair (alphas [n1], betas [n2]); at least
            2 offsets per axis. Point (i, j) is theta0 + alphas[i] d1 + betas[j] d2.
        metrics: name -> fn(outputs, targets) -> scalar mean over the batch (e.g. accuracy),
            evaluated at every point like the loss.
        output_fn: applied to the model's outputs before ``loss_fn`` and the metrics (e.g.
            ``lambda out: out.logits`` for a model returning an object, ``lambda out: out.transpose(1, 2)``
            for [N, T, C] logits against [N, T] targets); it runs under ``torch.vmap`` like the loss.
            None (default): the outputs as they are. Keeping ``loss_fn`` one of torch's losses
            (instead of folding this into it) keeps the row blocks of ``batch_rows`` available.
        bn: how BatchNorm layers (those tracking running statistics) normalise at each point.
            ``'eval'``: with the model's own running statistics (the centre's) at every point.
            ``'recompute'``: with statistics recomputed for the point's parameters over ``data``:
            for each point, what you get by loading its weights, resetting every BatchNorm's
            running statistics, setting momentum=None (the cumulative average) and running one
            pass over ``data`` with the BatchNorm layers in train mode, then evaluating in eval mode;
            i.e. each layer's running_mean / running_var is the mean over the batches of each
            batch's mean / unbiased variance of the layer's input, and a layer's input in that pass
            is normalised upstream with batch statistics. Two differences from
            ``torch.optim.swa_utils.update_bn``: only the BatchNorm layers are in train mode in
            the statistics pass (Dropout stays off, so the statistics are deterministic), and the
            model's own buffers and momenta are never written. Batched: per chunk, one statistics
            pass over the data for all its points (per-point buffers vmapped with the points), then
            the evaluation pass; the statistics pass reads whole batches (batch statistics depend on
            the batch), so a chunk holds the activations of c points x one batch.
        batch_points: points per chunk (default: thetas under 256 MiB and, on CUDA, under a quarter
            of the free device memory, at most 64 points; on the CPU 32, or 8 for a model with
            convolutions (:func:`cpu_tiles`); a default chunk that runs out of memory is retried
            with half as many points, with a RuntimeWarning). A chunk of the size you pass that
            runs out of memory raises torch.OutOfMemoryError.
        batch_rows: rows of a data batch evaluated together for the chunk's points (default: on the
            CPU 256 rows, or 2048 for a model with convolutions (:func:`cpu_tiles`: measured on the
            digits MLP and CNN grids); on CUDA the whole batch).
            A batch's value is combined from its blocks as (sum, count) pairs: recognised
            cross-entropy counts the rows it does not ignore; any other fn is taken to be a mean
            over the rows. So the default splits only when the loss and every metric are
            recognised cross-entropy (also with ``ignore_index`` or class weights) or one of
            torch's elementwise mean losses (MSELoss, L1Loss, BCEWithLogitsLoss, ...; no
            ``weight``), and then the result does not depend on it
            beyond rounding; with your own callables (accuracy, a masked or weighted mean) it
            evaluates whole batches unless you pass batch_rows (do so only for means over rows:
            a masked mean would be averaged block by block). Whole batches, whatever is passed,
            when a BatchNorm layer keeps no running statistics (its eval output depends on the
            rows that share a batch), or for a batch whose inputs or targets do not all have its
            rows in their first dimension (an input shared by the rows whose first dimension
            happens to equal the batch size cannot be told apart: pass batch_rows above the
            batch size to keep such batches whole).
        first_layer: use the first-layer shortcut when the model's first layer is an eligible
            Linear / Conv2d (its output at a point combined from m + 1 products per data block, see
            ``_first_layer.py``); False: every point runs the whole model; None (default) or True:
            where eligible (digits MLP on 1 CPU thread: 743 ms with it, 877 ms without). Same
            numbers up to rounding, in both bn modes.
        distributed: None (default): split the points across the processes when torch.distributed
            is initialised; True: insist on it (ValueError if not initialised); False: every
            process evaluates every point on its own. Split: rank r evaluates a contiguous 1/world
            of the points (row-major order) on the FULL ``data`` (every rank passes the same model,
            directions, coords and data: the points are split, not the data; the ranks' parameters,
            directions, coords and a checksum of the data are compared and a mismatch raises on every
            rank), then one all_reduce gathers the surface: every rank returns the full result, equal
            to the single-process one. An error on one rank is raised there and reported on the
            others (no hang). The tensors of the collectives live on the model's device (gloo:
            CPU, NCCL: CUDA).
        progress: a tqdm bar over the chunks (under torch.distributed: rank 0's chunks only).

    Models that torch.vmap cannot batch over the points (an ``nn.LSTM`` / ``nn.GRU``: no batching
    rule; data-dependent control flow; ``.item()``) but whose own forward runs are evaluated one
    point at a time, with a RuntimeWarning: the same values, at the speed of a plain loop.

    Returns:
        :class:`LandscapeResult` with loss [n1] or [n1, n2] (float64) and the metrics.
    """
    layout = layout_of(model)
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES} ('eval': BatchNorm with the model's running statistics; "
                         f"'recompute': statistics recomputed over the data at every point), got {bn!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
    refuse_sum(loss_fn, "loss_fn")
    metrics = _check_metrics(metrics)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be None or callable outputs -> outputs, got {type(output_fn).__name__}")
    if not torch.is_tensor(directions) or not directions.is_floating_point():
        raise TypeError(f"directions must be a floating-point tensor [m, P], got {type(directions).__name__}"
                        + (f" of dtype {directions.dtype}" if torch.is_tensor(directions) else "")
                        + (" (pca_directions returns (directions, explained variance ratios): pass its [0])"
                           if isinstance(directions, tuple) else ""))
    if directions.dim() == 1:
        directions = directions[None]
    if directions.dim() != 2 or directions.shape[0] not in (1, 2):
        raise ValueError(f"directions must be [m, P] with m = 1 or 2, got shape {tuple(directions.shape)}")
    m, P = directions.shape
    if P != layout.numel:
        raise ValueError(f"directions must be [m, P] with P = {layout.numel} (the model's trainable parameters), "
                         f"got {tuple(directions.shape)}")
    if not bool(torch.isfinite(directions).all()):  # [m, P]: checked once, up front
        bad = [i for i in range(m) if not bool(torch.isfinite(directions[i]).all())]
        raise ValueError(f"directions must be finite: row(s) {bad} hold NaN or infinity (every point along them "
                         "would be NaN); check how they were made (e.g. random_directions of a model with NaN "
                         "weights)")
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if first_layer is not None and not isinstance(first_layer, bool):  # "no" would read as True
        raise TypeError(f"first_layer must be None, True or False, got {first_layer!r}")
    dist_on = distributed_active(distributed)
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
    tile = cpu_tiles(model)
    c = default_chunk(layout, n_pts, tile[0]) if batch_points is None else min(check_int(batch_points, "batch_points",
                                                                                        1), n_pts)
    if batch_rows is None:
        r = tile[1] if torch.device(layout.device).type == "cpu" else None
    else:
        r = check_int(batch_rows, "batch_rows", 1)
    if _batch_dependent(model) or (batch_rows is None
                                   and not all(map(row_separable, [loss_fn, *metrics.values()]))):
        r = None  # whole batches: batch statistics, or (by default) a fn whose blocks would not give its batch value
    data = as_batches(data)
    if shuffles(data) and (getattr(data, "drop_last", False) or bn == "recompute"):
        # the data is read again for every chunk of points: a new order then gives each chunk
        # other rows (drop_last) or other batches' statistics (recompute): seams in the surface
        raise ValueError("data is a DataLoader that shuffles, with " + ("drop_last=True" if getattr(
            data, "drop_last", False) else "bn='recompute'") + ": grid reads it again for every chunk of points, "
            "so the chunks would see other rows or other batch statistics; pass a loader with shuffle=False "
            "(the surface's values do not depend on the order)")
    layers = recompute_layers(model) if bn == "recompute" else []

    theta0 = layout.flatten()
    dirs = directions.to(device=device, dtype=dtype)
    names = ["loss", *metrics]
    fns = [loss_fn, *metrics.values()]
    lo, hi = 0, n_pts
    if dist_on:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        # the same arguments everywhere, checked before any work (different grid sizes would also
        # make the final all_reduce's buffers disagree)
        _dist_check_same(device, [n_pts, len(fns), P, m, BN_MODES.index(bn)] + _fingerprint(theta0, dirs, pts),
                         "grid sizes, metrics, bn mode, parameters, directions or coords")
        lo, hi = n_pts * rank // world, n_pts * (rank + 1) // world
        progress = progress and rank == 0
    pts_dev = pts.to(device=device, dtype=torch.float64)
    means = torch.zeros(len(names), n_pts, dtype=f64, device=device)
    checksum = _Checksum(device) if dist_on else None
    total, error = None, None
    try:
        if hi > lo:
            total = _evaluate(model, layout, theta0, dirs, pts_dev, lo, hi, c, r, data, fns, layers, means,
                              first_layer, checksum, progress, adaptive=batch_points is None,
                              labels=["loss_fn", *(f"metrics[{k!r}]" for k in metrics)], output_fn=output_fn)
    except Exception as e:  # under torch.distributed: reported to the other ranks, raised after the gather
        if not dist_on:
            raise
        error = e
    if dist_on:
        means, counts, sums = _gather(means, total, error, checksum)
        if error is not None:
            raise error
        failed = [i for i, k in enumerate(counts) if k < 0]
        if failed:
            raise RuntimeError(f"grid failed on rank(s) {failed} (see the error raised there); no surface")
        seen = [i for i, k in enumerate(counts) if k > 0]
        ref = seen[0] if seen else 0
        if any(counts[i] != counts[ref] or not torch.allclose(sums[i], sums[ref], rtol=1e-9, atol=0) for i in seen):
            raise ValueError(f"grid under torch.distributed: the ranks saw different data (examples per rank "
                             f"{[int(k) for k in counts]}); every rank must pass the full data set (the points are "
                             "split, not the data: no DistributedSampler)")
    shape = tuple(len(a) for a in axes)
    res = means.cpu().reshape(len(names), *shape)
    return LandscapeResult(axes, res[0], {k: res[i + 1] for i, k in enumerate(metrics)})


def _evaluate(model, layout, theta0, dirs, pts_dev, lo: int, hi: int, c: int, r, data, fns, layers, means,
              first_layer, checksum, progress, adaptive: bool = False, labels=None, output_fn=None) -> int:
    """Points lo:hi of pts_dev, in chunks of c: their means over ``data`` written into means[:, lo:hi];
    returns the number of examples (the same on every pass, else ValueError). ``adaptive`` (the
    default chunk size): a chunk that runs out of memory (torch.OutOfMemoryError, CPU or CUDA) is
    retried with half as many points, down to one, with a warning; with a chunk size the caller
    chose, the error is raised with a hint."""
    device, dtype = theta0.device, theta0.dtype
    thetas = torch.empty(min(c, hi - lo), theta0.numel(), dtype=dtype, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="landscape", total=hi - lo, unit="pt", leave=False)
    total = None
    # CPU: the blocks' activations (MBs, the same shapes block after block) reuse warm memory.
    # buffers_kept: a forward that updates a buffer in place (a counter, a Bayesian layer's RNG
    # position) runs on the model's own buffers in the walk; they are put back afterwards
    try:
        with torch.no_grad(), ModeGuard(model, False), allocation_cache(torch.device(device).type == "cpu"), \
                buffers_kept(model):
            plan = _Plan(model, layout, first_layer is not False)
            s = lo
            while s < hi:
                e = min(s + c, hi)
                try:
                    th = _points(theta0, dirs, pts_dev[s:e], thetas[:e - s])
                    sc = plan.shortcut(theta0, dirs, pts_dev[s:e])
                    bufs = bn_statistics(model, layout, th, data, layers, sc, plan) if layers else None
                    sums, n = data_sums(model, layout, th, data, fns, r, sc, bufs,
                                        checksum if total is None else None, labels, output_fn, plan)
                except torch.OutOfMemoryError:
                    if not adaptive or c == 1:
                        raise _oom_hint(c, adaptive) from None
                    c = max(1, c // 2)
                    _oom_retry(c, device, checksum if total is None else None)
                    continue
                if total is not None and n != total:
                    raise ValueError(f"data gave {n} examples on one pass and {total} on another: every pass must "
                                     "see the same data (a stream that changes length)")
                total = n
                means[:, s:e] = sums / n
                if bar is not None:
                    bar.update(e - s)
                s = e
    finally:
        if bar is not None:
            bar.close()
    return total


def _oom_retry(c: int, device, checksum) -> None:
    """Before a chunk is retried with c points: free the cached blocks, forget the partial data
    checksum of the failed first pass, and say so (a RuntimeWarning)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if checksum is not None:
        checksum.reset()
    warn_user(f"landscape.grid: a chunk of points ran out of memory; retrying with {c} points per chunk "
              "(pass batch_points= to choose it yourself)", RuntimeWarning)


def _oom_hint(c: int, adaptive: bool) -> Exception:
    fix = ("even one point at a time does not fit: use smaller data batches (or batch_rows=) or a smaller model"
           if adaptive else f"batch_points={c} does not fit: lower it, or leave it None to let grid adapt")
    return torch.OutOfMemoryError(f"landscape.grid ran out of memory: {fix}")


def _gather(means: Tensor, total: int | None, error, checksum: "_Checksum"):
    """One all_reduce (sum) of every rank's means (zero outside its points: the sum is each value
    exactly) with a [world, 4] table of (examples or -1 on error, the data checksum) per rank;
    returns (means, counts [world], checksums [world, 3]) on the CPU."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, 4, dtype=torch.float64, device=means.device)
    if error is not None:
        table[rank, 0] = -1
        means.zero_()  # a failed rank adds nothing
    elif total is not None:
        table[rank, 0] = total
        table[rank, 1:] = checksum.acc
    buf = torch.cat([means.reshape(-1), table.reshape(-1)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = buf.cpu()
    k = means.numel()
    table = buf[k:].view(world, 4)
    return buf[:k].view_as(means), table[:, 0].tolist(), table[:, 1:]


def interpolate(model_a: nn.Module, model_b: nn.Module, steps: int, loss_fn, data, *, metrics: dict | None = None,
                output_fn=None, bn: str = "eval", batch_points: int | None = None, distributed: bool | None = None,
                progress: bool = True) -> LandscapeResult:
    """Mean loss along the straight line from ``model_a`` (offset 0) to ``model_b`` (offset 1).

    Args:
        model_a, model_b: two networks with the same trainable parameters (names, shapes, dtypes);
            ``model_a``'s forward is used at every point; their frozen parameters and buffers must be
            equal (a ValueError otherwise: the line moves only trainable parameters), BatchNorm
            running statistics aside: model_a's under bn='eval' (a RuntimeWarning when model_b's
            differ: the end is then not model_b as it predicts), each point's own recomputed over
            ``data`` under bn='recompute'.
        steps: number of points, >= 2, evenly spaced on [0, 1] (both ends included).
        loss_fn, data, metrics, output_fn, bn, batch_points, distributed, progress: as in :func:`grid`.

    Returns:
        1-D :class:`LandscapeResult`: coords (t [steps],), loss [steps].
    """
    from .directions import directions_to

    steps = check_int(steps, "steps (points on the line, ends included)", 2)
    why = layout_of(model_a, "model_a").difference(layout_of(model_b, "model_b"), "in model_b", "in model_a")
    if why:  # named here: directions_to would call them 'model' and 'others[0]'
        raise ValueError(f"model_b has other trainable parameters than model_a ({why})")
    same_fixed_tensors(model_a, model_b, "the line")
    if bn == "eval":
        warn_other_statistics(model_a, model_b)
    d = directions_to(model_a, [model_b])
    return grid(model_a, loss_fn, data, d, torch.linspace(0, 1, steps, dtype=torch.float64), metrics=metrics,
                output_fn=output_fn, bn=bn, batch_points=batch_points, distributed=distributed, progress=progress)
