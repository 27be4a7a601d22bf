"""Batched layers of the grid engine: nn.Linear evaluated for all points of a chunk as one
``baddbmm``.

The engine maps ``functional_call`` over the chunk's points with ``torch.vmap``, so every layer
sees per-point weights [c, ...]. vmap's own rule for ``F.linear`` with a batched weight and bias
is a batched matmul followed by a separate bias add: one more pass over the chunk's activations
[c, rows, out] per layer (on 2 CPU cores the adds of the digits MLP grid took a quarter as long
as its GEMMs). Here the model's plain ``nn.Linear`` modules are swapped, for the duration of the
walk, for a stand-in holding the same parameters (so ``functional_call`` still finds
``<name>.weight`` / ``<name>.bias``) whose forward is an autograd.Function with its own vmap rule:
``baddbmm(bias, x, weight^T)``, the bias read by the GEMM itself.

Only exact ``nn.Linear`` instances without hooks or parametrizations are swapped (anything else
keeps its own forward); the originals are put back afterwards, also on error. The grid engine
runs under ``torch.no_grad``: the function has no backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


class _LinearFn(torch.autograd.Function):
    """F.linear(x, w, b) with a vmap rule for per-point weights: one baddbmm for all points."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, w: Tensor, b: Tensor | None):
        xd, wd, bd = in_dims
        if wd is None or (b is not None and bd is None):
            # weights shared by the points (or an unbatched bias): the plain layer maps over x
            x = x.movedim(xd, 0) if xd is not None else x.expand(info.batch_size, *x.shape)
            w = w.movedim(wd, 0) if wd is not None else w.expand(info.batch_size, *w.shape)
            out = torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), w.transpose(1, 2))
            if b is not None:
                out = out + (b.movedim(bd, 0) if bd is not None else b).unsqueeze(-2)
            return out.reshape(*x.shape[:-1], w.shape[1]), 0
        n = info.batch_size
        w = w.movedim(wd, 0)  # [n, out, in]
        if xd is None:
            lead = x.shape[:-1]
            x3 = x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1)
        else:
            x = x.movedim(xd, 0)
            lead = x.shape[1:-1]
            x3 = x.reshape(n, -1, x.shape[-1])  # [n, rows, in]
        out = torch.bmm(x3, w.transpose(1, 2))
        if b is not None:
            out.add_(b.movedim(bd, 0).unsqueeze(1))  # in place on the fresh output: no second buffer
        return out.view(n, *lead, w.shape[1]), 0


class _BatchedLinear(nn.Module):
    """Stand-in for an nn.Linear: the same parameters, forward through :class:`_LinearFn`."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        return _LinearFn.apply(x, self.weight, self.bias)


def _swappable(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and not parametrize.is_parametrized(m))


@contextlib.contextmanager
def swapped(model: nn.Module):
    """Context: every plain nn.Linear of ``model`` (the model itself included) replaced by a
    batched stand-in; yields the model to call (the stand-in when the model is one Linear).
    Restored afterwards, also on error."""
    if _swappable(model):
        yield _BatchedLinear(model)
        return
    done = []
    try:
        for name, parent in list(model.named_modules()):
            for attr, child in list(parent.named_children()):
                if _swappable(child):
                    setattr(parent, attr, _BatchedLinear(child))
                    done.append((parent, attr, child))
        yield model
    finally:
        for parent, attr, child in reversed(done):
            setattr(parent, attr, child)
