"""Which modules with parameters a forward pass calls, in order (what Laplace's last layer and the
landscape grid's first-layer shortcut are found from)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["parameter_calls", "buffers_kept"]


def parameter_calls(model: nn.Module, *inputs) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, its positional inputs) for every call of a module that holds parameters of its
    own, in the order the calls finish, from one ``model(*inputs)`` under ``no_grad`` (the caller
    sets the train/eval mode; errors of the forward propagate; the hooks are always removed)."""
    calls: list = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, mod, i)))
             for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad(), buffers_kept(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Run a probe forward without side effects on the model's buffers: they are copied on entry
    and written back on exit, also on error (a train-mode BatchNorm's statistics, a Bayesian
    layer's RNG position that its forward advances)."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
