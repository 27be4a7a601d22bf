"""Per-point values of the grid engine's loss and metrics on a chunk's stacked outputs.

The grid engine runs the model for c points at once and gets outputs [c, rows, ...]. A user's
``fn(outputs, targets) -> scalar`` is then mapped over the points with ``torch.vmap``. For the
common classification loss this is slow on the CPU: ``log_softmax`` over a short last dimension
(10 classes) does not vectorise in ATen (0.7 ms for 64 x 128 rows of 10 logits on 2 cores, about
as long as the chunk's hidden-layer GEMMs). So cross-entropy with class-index targets is
recognised (``nn.CrossEntropyLoss`` or ``F.cross_entropy`` with their defaults, any
``ignore_index``) and computed with the classes in the middle, [c, C, rows], where the reduction
over classes is vectorised along the rows (with class weights: through
``F.cross_entropy(reduction='sum')``). Everything else is called as it is (inside the grid's vmap
over the points).

Values come as (sum, count) pairs (:func:`point_sums`) so that a batch split into blocks of rows
gives the batch's own value: recognised cross-entropy counts the rows it does not ignore (by their
class weights), so its blocks combine exactly whatever ``ignore_index`` removes; any other fn is
taken as a mean over the rows (value x rows, rows). The engine splits batches by default only
when every fn is one whose value is such a mean (:func:`row_separable`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cross_entropy_spec(fn) -> tuple[int, Tensor | None] | None:
    """(ignore_index, class weight or None) when ``fn`` is mean-reduced, unsmoothed cross-entropy
    (``nn.CrossEntropyLoss`` or ``F.cross_entropy`` with its defaults), else None."""
    if fn is F.cross_entropy:
        return -100, None
    if type(fn) is nn.CrossEntropyLoss and fn.reduction == "mean" and fn.label_smoothing == 0.0:
        return fn.ignore_index, fn.weight
    return None


def _cross_entropy(out: Tensor, y: Tensor, ignore: int, weight: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(sum of the weighted per-row losses, their total weight) of recognised mean cross-entropy on
    ONE point's outputs: its value is sum / weight (each row counted with its class's weight, 1
    without ``weight``; ignored rows not at all; nothing counted: NaN, as F.cross_entropy). Class
    indices y [rows] (int64) for out [rows, C] without class weights: on the transposed logits
    [C, rows] (inside the grid's vmap: [c, C, rows], the reduction over classes vectorised along
    the rows); other shapes, targets and class weights through ``F.cross_entropy(reduction='sum')``;
    None for outputs without a class dimension (the caller then calls the loss itself)."""
    if out.dim() < 2 or not out.is_floating_point() or y.dim() == 0:
        return None
    if y.dtype == torch.uint8:  # class indices F.cross_entropy takes, which gather (its batching rule) does not
        y = y.long()
    if not y.is_floating_point() and y.dim() != out.dim() - 1:  # (inside the vmap torch's check is an assert)
        raise ValueError(f"data: class-index targets of shape {tuple(y.shape)} for outputs {tuple(out.shape)}: "
                         "cross-entropy takes one class index per row, targets [rows]"
                         + (" (flatten [rows, 1] targets: y.view(-1))" if y.dim() == 2 and y.shape[1] == 1 else ""))
    w = None if weight is None else weight.to(device=out.device, dtype=out.dtype)
    if w is not None or out.dim() != 2 or y.dim() != 1 or y.dtype != torch.int64 or y.shape[0] != out.shape[0]:
        total = F.cross_entropy(out, y, weight=w, ignore_index=ignore, reduction="sum")
        if y.is_floating_point():  # class probabilities: the mean is over every position, weighted or not
            return total, torch.tensor(out.numel() // out.shape[1], dtype=torch.float64, device=out.device)
        keep = y != ignore
        if w is None:
            return total, keep.sum()
        return total, (w[torch.where(keep, y, 0)] * keep).sum()
    if y.device.type == "cpu":  # the targets are plain CPU tensors here: no host sync (on CUDA, the gather
        _check_classes(y, ignore, out.shape[1])  # asserts on the device, as F.cross_entropy would)
    keep = y != ignore
    idx = torch.where(keep, y, 0)
    logp = torch.log_softmax(out.t().contiguous(), dim=0)  # [C, rows]
    picked = logp.gather(0, idx.view(1, -1)).squeeze(0) * keep  # [rows]
    return -picked.sum(), keep.sum()


def _check_classes(y: Tensor, ignore: int, classes: int) -> None:
    """ValueError naming the targets when a class index (other than ``ignore``) is outside [0, classes)."""
    bad = (y != ignore) & ((y < 0) | (y >= classes))
    if bool(bad.any()):
        v = int(y[bad][0])
        raise ValueError(f"data: the targets hold class index {v}, outside [0, {classes}) for outputs of {classes} "
                         "classes; check the targets (labels from 0 to C - 1) or the model's number of outputs")


def _check_targets(fn, out: Tensor, y: Tensor, label: str) -> None:
    """TypeError for targets a cross-entropy cannot take: float targets of the shape of class
    indices (torch's own error inside the vmap is about gather's index dtype), integer indices other
    than int64 / uint8 (inside the vmap torch's check is skipped: int32 would be taken)."""
    if _cross_entropy_spec(fn) is not None or type(fn) is nn.CrossEntropyLoss:
        if y.is_floating_point() and out.dim() >= 2 and y.dim() == out.dim() - 1:
            raise TypeError(f"data: {label} is a cross-entropy and the targets are {y.dtype} of shape "
                            f"{tuple(y.shape)}: class indices must be an integer tensor (targets.long()); float "
                            f"targets must be class probabilities of the outputs' shape {tuple(out.shape)}")
        if not y.is_floating_point() and y.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"data: {label} is a cross-entropy and the targets are {y.dtype}: class indices must be "
                            "int64 or uint8, as F.cross_entropy takes them (targets.long())")


def point_sums(fns, out: Tensor, y: Tensor, labels=None) -> Tensor:
    """[len(fns), 2] float64: per fn (sum, count) of ONE point's outputs out [rows, ...] against the
    targets y (called inside the grid's vmap over the points), with fn(out, y) = sum / count:
    recognised cross-entropy (module docstring) its summed losses and the rows it counts, any other
    fn (value x rows, rows), rows = y.shape[0].

    Each fn is ``(outputs, targets) -> scalar mean over the rows``. ``labels``: the names of
    ``fns`` in error messages (default 'loss_fn' for the first, then 'metric i'); a value that is
    not a scalar (e.g. reduction='none') is refused with a ValueError."""
    if not torch.is_tensor(out):
        raise TypeError(f"the model must return a tensor of outputs, got {type(out).__name__} (grid and interpolate "
                        "take output_fn= to pick it, e.g. output_fn=lambda out: out['logits'])")
    rows = y.shape[0] if y.dim() else 1
    pairs = []
    for i, fn in enumerate(fns):
        label = labels[i] if labels is not None else ("loss_fn" if i == 0 else f"metric {i}")
        _check_targets(fn, out, y, label)
        spec = _cross_entropy_spec(fn)
        pair = _cross_entropy(out, y, *spec) if spec is not None else None
        if pair is None:
            v = _scalar(fn(out, y), out, label).to(torch.float64)
            pair = (v * rows, torch.tensor(float(rows), dtype=torch.float64, device=v.device))
        pairs.append(torch.stack([p.to(torch.float64) for p in pair]))
    return torch.stack(pairs)


def point_values(fns, out: Tensor, y: Tensor, labels=None) -> Tensor:
    """[len(fns)] float64: each fn of ONE point's outputs and the targets (sum / count of
    :func:`point_sums`)."""
    sums = point_sums(fns, out, y, labels)
    return sums[:, 0] / sums[:, 1]


_MEAN_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss, nn.BCELoss,
                nn.SoftMarginLoss)
_MEAN_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits,
                   F.binary_cross_entropy, F.soft_margin_loss)


def row_separable(fn) -> bool:
    """True when blocks of a batch's rows give ``fn``'s value on the whole batch exactly through
    :func:`point_sums`: recognised cross-entropy (any ``ignore_index``, class weights), and torch's
    elementwise losses averaged over all elements with their defaults (every row holds as many
    elements), as module instances (reduction='mean', no ``weight``) or functions. A user's own
    callable is not assumed to be a mean over rows (a masked or weighted mean is not)."""
    if _cross_entropy_spec(fn) is not None:
        return True
    if fn in _MEAN_FUNCTIONS:
        return True
    return type(fn) in _MEAN_LOSSES and fn.reduction == "mean" and getattr(fn, "weight", None) is None


def refuse_sum(fn, label: str) -> None:
    """ValueError for a torch loss (module, or functools.partial of a function) set to
    reduction='sum': its value grows with the batch's rows, so a mean over batches weighted by
    rows would depend on the batching (reduction='none' is refused later, by its shape)."""
    red = fn.keywords.get("reduction") if isinstance(fn, functools.partial) else (
        getattr(fn, "reduction", None) if isinstance(fn, nn.modules.loss._Loss) else None)
    if red == "sum":
        raise ValueError(f"{label} has reduction='sum': grid averages each batch's value over the data weighted by "
                         "its rows, which needs the mean over the batch; a sum would make the surface depend on the "
                         "batch size (use reduction='mean')")


def _scalar(value, like: Tensor, label: str) -> Tensor:
    if torch.is_tensor(value) and value.numel() != 1:  # inside the vmap: one point's value
        raise ValueError(f"{label} must return a scalar (the mean over the batch, e.g. reduction='mean'), got "
                         f"a tensor of shape {tuple(value.shape)}")
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(())
