"""Per-point values of the grid engine's loss and metrics on a chunk's stacked outputs.

The grid engine runs the model for c points at once and gets outputs [c, rows, ...]. A user's
``fn(outputs, targets) -> scalar`` is then mapped over the points with ``torch.vmap``. For the
common classification loss this is slow on the CPU: ``log_softmax`` over a short last dimension
(10 classes) does not vectorise in ATen (0.7 ms for 64 x 128 rows of 10 logits on 2 cores, about
as long as the chunk's hidden-layer GEMMs). So cross-entropy with class-index targets is
recognised (``nn.CrossEntropyLoss`` or ``F.cross_entropy`` with their defaults, any
``ignore_index``) and computed with the classes in the middle, [c, C, rows], where the
reduction over classes is vectorised along the rows. Everything else is called as it is (inside
the grid's vmap over the points).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cross_entropy_ignore_index(fn) -> int | None:
    """``ignore_index`` when ``fn`` is mean-reduced, unweighted, unsmoothed cross-entropy, else None."""
    if fn is F.cross_entropy:
        return -100
    if type(fn) is nn.CrossEntropyLoss and fn.weight is None and fn.reduction == "mean" \
            and fn.label_smoothing == 0.0:
        return fn.ignore_index
    return None


def _cross_entropy(out: Tensor, y: Tensor, ignore: int) -> Tensor | None:
    """Mean cross-entropy of ONE point's logits out [rows, C] against class indices y [rows] (rows
    whose target is ``ignore`` left out of the mean; no row left: NaN, as F.cross_entropy), computed
    on the transposed logits [C, rows] (inside the grid's vmap: [c, C, rows], the reduction over
    classes vectorised along the rows); None when the shapes are not these (the caller then calls
    the loss itself)."""
    if out.dim() != 2 or y.dim() != 1 or y.is_floating_point() or y.shape[0] != out.shape[0] \
            or out.shape[0] == 0 or not out.is_floating_point():
        return None
    if y.device.type == "cpu":  # the targets are plain CPU tensors here: no host sync (on CUDA, the gather
        _check_classes(y, ignore, out.shape[1])  # asserts on the device, as F.cross_entropy would)
    keep = y != ignore
    idx = torch.where(keep, y, 0)
    logp = torch.log_softmax(out.t().contiguous(), dim=0)  # [C, rows]
    picked = logp.gather(0, idx.view(1, -1)).squeeze(0) * keep  # [rows]
    return -picked.sum() / keep.sum()


def _check_classes(y: Tensor, ignore: int, classes: int) -> None:
    """ValueError naming the targets when a class index (other than ``ignore``) is outside [0, classes)."""
    bad = (y != ignore) & ((y < 0) | (y >= classes))
    if bool(bad.any()):
        v = int(y[bad][0])
        raise ValueError(f"data: the targets hold class index {v}, outside [0, {classes}) for outputs of {classes} "
                         "classes; check the targets (labels from 0 to C - 1) or the model's number of outputs")


def _check_targets(fn, out: Tensor, y: Tensor, label: str) -> None:
    """TypeError for float targets of the shape of class indices given to a recognised cross-entropy
    (torch's own error inside the vmap is about gather's index dtype)."""
    if _cross_entropy_ignore_index(fn) is not None or type(fn) is nn.CrossEntropyLoss:
        if y.is_floating_point() and out.dim() >= 2 and y.dim() == out.dim() - 1:
            raise TypeError(f"data: {label} is a cross-entropy and the targets are {y.dtype} of shape "
                            f"{tuple(y.shape)}: class indices must be an integer tensor (targets.long()); float "
                            f"targets must be class probabilities of the outputs' shape {tuple(out.shape)}")


def point_values(fns, out: Tensor, y: Tensor, labels=None) -> Tensor:
    """[len(fns)] float64: each fn of ONE point's outputs out [rows, ...] and the targets y (called
    inside the grid's vmap over the points).

    Each fn is ``(outputs, targets) -> scalar mean over the rows``; recognised cross-entropy is
    computed with the classes first (module docstring), the others by calling them. ``labels``:
    the names of ``fns`` in error messages (default 'loss_fn' for the first, then 'metric i');
    a value that is not a scalar (e.g. reduction='none') is refused with a ValueError."""
    if not torch.is_tensor(out):
        raise TypeError(f"the model must return a tensor of outputs, got {type(out).__name__}")
    vals = []
    for i, fn in enumerate(fns):
        label = labels[i] if labels is not None else ("loss_fn" if i == 0 else f"metric {i}")
        ignore = _cross_entropy_ignore_index(fn)
        v = _cross_entropy(out, y, ignore) if ignore is not None else None
        if v is None:
            _check_targets(fn, out, y, label)
            v = _scalar(fn(out, y), out, label)
        vals.append(v.to(torch.float64))
    return torch.stack(vals)


def _scalar(value, like: Tensor, label: str) -> Tensor:
    if torch.is_tensor(value) and value.numel() != 1:  # inside the vmap: one point's value
        raise ValueError(f"{label} must return a scalar (the mean over the batch, e.g. reduction='mean'), got "
                         f"a tensor of shape {tuple(value.shape)}")
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(())
