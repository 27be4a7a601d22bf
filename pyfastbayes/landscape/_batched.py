"""Batched layers of the grid engine: nn.Linear and nn.Conv2d evaluated for all points of a chunk
the way the CPU / GPU libraries run fastest.

The engine maps ``functional_call`` over the chunk's points with ``torch.vmap``, so every layer
sees per-point weights [c, ...]. vmap's own rules are general but slow here: ``F.linear`` with a
batched weight and bias is a batched matmul followed by a separate bias add (one more pass over
the chunk's activations [c, rows, out] per layer: on 2 CPU cores the adds of the digits MLP grid
took a quarter as long as its GEMMs), and ``F.conv2d`` with batched weights becomes one grouped
convolution (c groups), which oneDNN runs ~3x slower than c plain convolutions of the same
sizes (8 -> 16 channels, 3x3, on 1 797 digits). So, for the duration of the walk, the model's
plain ``nn.Linear`` / ``nn.Conv2d`` modules are swapped for stand-ins holding the same parameters
(``functional_call`` still finds ``<name>.weight`` / ``<name>.bias``) whose forward is an
autograd.Function with its own vmap rule: Linear, ``bmm`` plus the bias added in place; Conv2d,
one plain convolution per point written into the stacked output (or, for an input shared by the
points, ONE convolution with the points' filters concatenated).

Only exact ``nn.Linear`` / ``nn.Conv2d`` (``padding_mode='zeros'``) instances without hooks or
parametrizations are swapped (anything else keeps its own forward); the originals are put back
afterwards, also on error. The grid engine runs under ``torch.no_grad``: the functions have no
backward.
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
            x, w = _moved(x, xd, info.batch_size), _moved(w, wd, info.batch_size)
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


def _moved(t: Tensor, d: int | None, n: int) -> Tensor:
    """t with its vmapped dimension first ([n, ...]; expanded when it has none)."""
    return t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)


class _Conv2dFn(torch.autograd.Function):
    """F.conv2d with a vmap rule for per-point filters: plain convolutions, not one grouped one."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int):
        xd, wd, bd = in_dims[:3]
        n = info.batch_size
        conv = lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
        if wd is None and (b is None or bd is None):  # shared filters: the points fold into the batch
            x = x.movedim(xd, 0)
            out = conv(x.reshape(-1, *x.shape[-3:]), w, b)
            return out.view(*x.shape[:-3], *out.shape[-3:]), 0
        if xd is None and groups == 1 and x.dim() == 4:  # shared input: one convolution, filters stacked
            w = _moved(w, wd, n)
            bias = None if b is None else _moved(b, bd, n).reshape(-1)
            out = conv(x, w.reshape(-1, *w.shape[2:]), bias)  # [rows, n * out, H', W']
            return out.view(x.shape[0], n, w.shape[1], *out.shape[-2:]).transpose(0, 1), 0
        x, w = _moved(x, xd, n), _moved(w, wd, n)
        b = None if b is None else _moved(b, bd, n)
        first = conv(x[0], w[0], None if b is None else b[0])
        out = first.new_empty(n, *first.shape)
        out[0] = first
        for i in range(1, n):
            out[i] = conv(x[i], w[i], None if b is None else b[i])
        return out, 0


class _BatchedConv2d(nn.Conv2d):
    """Stand-in for an nn.Conv2d (zero padding): the layer's attributes and parameters, forward
    through :class:`_Conv2dFn`."""

    def forward(self, x: Tensor) -> Tensor:
        return _Conv2dFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _BatchedLinear(nn.Linear):
    """Stand-in for an nn.Linear: the layer's attributes and parameters, forward through :class:`_LinearFn`."""

    def forward(self, x: Tensor) -> Tensor:
        return _LinearFn.apply(x, self.weight, self.bias)


def _twin(layer: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` (a subclass of the layer's class) with the layer's attributes and the
    same Parameter objects in its own dicts (so functional_call's swaps never touch the layer),
    without running __init__ (no new parameters are drawn). Models that read e.g.
    ``self.fc.in_features`` or test ``isinstance(m, nn.Linear)`` in their forward still work."""
    twin = cls.__new__(cls)
    twin.__dict__.update(layer.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[key] = dict(layer.__dict__[key])
    return twin


_STAND_INS = {nn.Linear: _BatchedLinear, nn.Conv2d: _BatchedConv2d}


def _stand_in(m: nn.Module, conv: bool) -> nn.Module | None:
    """The batched stand-in for ``m``, or None when ``m`` keeps its own forward."""
    kind = _STAND_INS.get(type(m))
    if kind is None or m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
        return None
    if isinstance(m, nn.Conv2d) and (not conv or m.padding_mode != "zeros"):
        return None
    return _twin(m, kind)


@contextlib.contextmanager
def swapped(model: nn.Module, conv: bool = True):
    """Context: every plain nn.Linear / nn.Conv2d of ``model`` (the model itself included)
    replaced by a batched stand-in; yields the model to call (the stand-in when the model is one
    such layer). ``conv=False`` keeps the Conv2d layers (the grid passes it on CUDA, where the
    per-point loop of convolutions is unmeasured against vmap's one grouped cuDNN call).
    Restored afterwards, also on error."""
    whole = _stand_in(model, conv)
    if whole is not None:
        yield whole
        return
    done = []
    try:
        for name, parent in list(model.named_modules()):
            for attr, child in list(parent.named_children()):
                new = _stand_in(child, conv)
                if new is not None:
                    setattr(parent, attr, new)
                    done.append((parent, attr, child))
        yield model
    finally:
        for parent, attr, child in reversed(done):
            setattr(parent, attr, child)
