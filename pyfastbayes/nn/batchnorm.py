"""BatchNorm statistics for a set of weights, and the train/eval mode guard.

A weight draw changes the activations, so the BatchNorm running statistics collected while
training do not fit it: :func:`update_bn` recomputes them in one pass over data (as
``torch.optim.swa_utils.update_bn``), :func:`refresh_bn` does the same for weights and buffers
swapped in with ``torch.func.functional_call`` (the posteriors' per-draw refresh), and
:class:`ModeGuard` sets train or eval mode and restores every submodule's own flag afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..calibration._checks import check_int
from .inputs import call_model, dtype_mismatch, iterate_inputs, to_device
from .stateless import functional_call

__all__ = ["update_bn", "refresh_bn", "bn_modules", "bn_keys", "ModeGuard"]


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm, lazy) of ``model`` that track running
    statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def bn_keys(layers, buffers=BN_STATS) -> list[tuple[str, nn.Module, str]]:
    """(state-dict key '<layer>.<buffer>', layer, buffer name) for each of ``layers`` [(name,
    module)] and each of ``buffers`` (default: running mean, running variance, batch count): the
    one spelling of the running statistics' keys. ``bn_keys(model)``: those of :func:`bn_modules`."""
    if isinstance(layers, nn.Module):
        ids = {id(m) for m in bn_modules(layers)}
        layers = [(n, m) for n, m in layers.named_modules() if id(m) in ids]
    return [(f"{n}.{b}" if n else b, m, b) for n, m in layers for b in buffers]


class ModeGuard:
    """Context manager: ``model.train(training)`` on entry; on exit every submodule gets back its
    own train/eval flag (``model.train(flag)`` on exit would overwrite submodules that were in
    another mode than the root, e.g. a frozen BatchNorm kept in eval mode)."""

    def __init__(self, model: nn.Module, training: bool):
        self.model, self.training = model, bool(training)

    def __enter__(self) -> "ModeGuard":
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@torch.no_grad()
def refresh_bn(model: nn.Module, loader, tensors: dict[str, Tensor] | None = None, device=None,
               batch_size: int = 1024, input_fn: Callable | None = None, *, name: str = "bn_loader") -> None:
    """Recompute the BatchNorm running statistics in one pass over ``loader`` in train mode with
    the cumulative average (momentum None), as ``torch.optim.swa_utils.update_bn`` does.

    Args:
        model: the network. No-op when it has no BatchNorm layer tracking statistics.
        loader: a tensor [N, ...] (split into ``batch_size`` rows) or an iterable of batches
            (see :func:`pyfastbayes.nn.inputs.model_input`; ``input_fn`` picks the input).
        tensors: None -> the model's own parameters and buffers are used and the buffers updated;
            else name -> tensor (parameters and buffers) run through ``functional_call``, and the
            BatchNorm buffers *in this dict* are updated in place (the model's are untouched).
        device: where the inputs are moved (None: not moved).
        name: the loader's argument name in errors (a loader of another dtype than the model's
            parameters gets the same TypeError as ``x`` does in ``predict``).

    Momenta and every submodule's train/eval flag are restored, also on error; a pass that fails (a
    batch the model refuses, a loader without batches: ValueError) also puts the statistics back as
    they were, rather than leaving them reset or half-averaged.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    bns = bn_modules(model)
    if not bns:
        return
    names = {m: n for n, m in model.named_modules()}
    stats = []  # every BatchNorm statistics buffer the pass resets and averages into
    for m in bns:
        pre = names[m] + "." if names[m] else ""
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(m, k) is None:
                continue
            if tensors is not None and pre + k not in tensors:  # found before any buffer is reset
                raise ValueError(f"tensors has no {pre + k!r}: it must hold the BatchNorm buffers as well as the "
                                 "parameters (e.g. {**dict(model.named_parameters()), **dict(model.named_buffers())})")
            stats.append((k, tensors[pre + k] if tensors is not None else getattr(m, k)))
    saved = []  # (buffer, its value before the pass): put back if the pass fails (BatchNorm buffers only: small)
    with torch.no_grad():
        for k, t in stats:
            saved.append((t, t.clone()))
            t.fill_(1 if k == "running_var" else 0)
    momenta = [(m, m.momentum) for m in bns]
    fn = model if tensors is None else (lambda *a: functional_call(model, tensors, a))
    try:
        for m in bns:
            m.momentum = None  # cumulative moving average over the pass
        with ModeGuard(model, True):
            seen = False
            for b in iterate_inputs(loader, batch_size, input_fn, name=name):
                b = b if device is None else to_device(b, device)
                try:
                    call_model(fn, b)
                except RuntimeError as e:
                    wrong = dtype_mismatch(b, bns[0].running_mean.dtype if bns[0].running_mean is not None
                                           else torch.get_default_dtype(), e, name=name)
                    if wrong is not None:
                        raise wrong from e
                    raise
                seen = True
            if not seen:
                raise ValueError(f"{name} yielded no batches: the BatchNorm statistics need data")
    except BaseException:
        with torch.no_grad():
            for t, before in saved:
                t.copy_(before)
        raise
    finally:
        for m, mom in momenta:
            m.momentum = mom


def update_bn(loader, model: nn.Module, device=None, *, batch_size: int = 1024,
              input_fn: Callable | None = None) -> None:
    """Recompute the BatchNorm running statistics of ``model`` for its current parameters.

    Same call form and result as ``torch.optim.swa_utils.update_bn(loader, model, device=None)``:
    one pass over ``loader`` in train mode with the cumulative average (momentum None), then the
    momenta are restored. Differences: every submodule's own train/eval flag is restored (torch
    sets all of them to the root's), ``loader`` may also be a tensor [N, ...] (split into
    ``batch_size`` rows), ``input_fn`` (item -> model input) handles dict batches, and ``device``
    defaults to the device of the model's parameters (or buffers; inputs stay where they are for a
    model with neither). No-op without BatchNorm layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} (call form: "
                        "update_bn(loader, model, device=None))")
    dev = torch.device(device) if device is not None else _model_device(model)
    refresh_bn(model, loader, None, dev, batch_size, input_fn, name="loader")
