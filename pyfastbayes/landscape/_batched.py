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
(``functional_call`` still finds ``<name>.weight`` / ``<name>.bias``) that compute all points at
once: Linear, ``bmm`` plus the bias and a fused ReLU in one in-place pass (op
``landscape_bias_act_``; on the CPU a layer with fewer than 16 outputs takes the transposed
product w x^T, its bias by ``baddbmm``, see :data:`_NARROW`); Conv2d, one plain convolution per point
written into the stacked output (or, for an input shared by the points, ONE convolution with the
points' filters concatenated). Inside the grid's vmap a stand-in unwraps its batched arguments
itself (functorch's C API, :func:`_direct`); elsewhere it goes through an autograd.Function with
the same vmap rule (the generic route costs ~0.5 ms of Python per call: a quarter of the digits
MLP grid). A ReLU or Tanh that follows a stand-in in an nn.Sequential is fused into it (applied
in place on the layer's fresh output) when the Sequential's own forward runs them (a stand-in
Sequential, :class:`_FusedSequential`; direct calls of the children are not fused).

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

from .. import ops

try:  # functorch's C API: unwrap / wrap batched tensors without the generic autograd.Function dispatch
    from torch._C import _functorch as _ft
    _ft.maybe_current_level, _ft.peek_interpreter_stack, _ft._unwrap_batched, _ft._add_batch_dim  # noqa: B018
except (ImportError, AttributeError):  # another torch: every call goes through the autograd.Functions
    _ft = None


FUSED = {nn.ReLU: "relu", nn.Tanh: "tanh"}  # activation modules fused into the stand-in before them
_IN_PLACE = {"relu": Tensor.relu_, "tanh": Tensor.tanh_}


def activate_(t: Tensor, act: str | None) -> Tensor:
    """``t`` with the fused activation ``act`` (a value of :data:`FUSED`) applied in place (None:
    unchanged); ``t`` must be a fresh result that nothing else reads."""
    return t if act is None else _IN_PLACE[act](t)


def _split_act(act: str | None) -> tuple[str, str | None]:
    """(what the fused ops apply themselves: 'relu' or 'none', what is left for :func:`activate_`
    afterwards: tanh, through ATen's vectorised in-place tanh, or None)."""
    return ("relu", None) if act == "relu" else ("none", act)


def _epilogue_(out: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
    """out [n, R, F] (fresh, contiguous) = act(out + bias[:, None, :]) with bias [n, F] or None: the
    bias and a ReLU in ONE pass (op ``landscape_bias_act_``), any other activation in place after."""
    native, rest = _split_act(act)
    if bias is not None or native != "none":  # (under autocast the GEMM's output dtype is not the bias's)
        ops.landscape_bias_act_(out, None if bias is None else bias.to(out.dtype), native)
    return activate_(out, rest)


def combine(parts: Tensor, mix_p: Tensor, act: str | None, shape: tuple) -> Tensor:
    """One point's first-layer output (its shape ``shape``) inside the grid's vmap: act(sum_j
    mix_p[j] * parts[:, j]) with parts [R, k, F] shared by the points and mix_p [k] the point's
    weights (1, a_1, ..., a_m), by the fused op ``landscape_combine`` for all points at once (the
    output written once, a ReLU applied in the same pass); outside such a vmap, the same by einsum."""
    native, rest = _split_act(act)

    def points(n, mix, md):
        out = ops.landscape_combine(parts, mix.movedim(md, 0).to(parts.dtype), native)  # [n, R, F]
        return activate_(out, rest).view(n, *shape)
    h = _direct(points, mix_p)
    if h is None:
        h = activate_(torch.einsum("j,rjf->rf", mix_p.to(parts.dtype), parts).view(shape), act)
    return h


def _moved(t: Tensor, d: int | None, n: int) -> Tensor:
    """t with its vmapped dimension first ([n, ...]; expanded when it has none)."""
    return t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)


def _linear_points(n: int, x: Tensor, xd, w: Tensor, wd, b: Tensor | None, bd, act: str | None) -> Tensor:
    """act(F.linear) of the n points, [n, ...] (the point dimension first): x, w, b plain tensors
    with their point dimensions xd, wd, bd (None: shared by the points)."""
    if wd is None or (b is not None and bd is None):
        # weights shared by the points (or an unbatched bias): the plain layer maps over x
        x, w = _moved(x, xd, n), _moved(w, wd, n)
        out = torch.matmul(x.reshape(n, -1, x.shape[-1]), w.transpose(1, 2))
        bias = None if b is None else _moved(b, bd, n)
        return _epilogue_(out, bias, act).view(*x.shape[:-1], w.shape[1])
    w = w.movedim(wd, 0)  # [n, out, in]
    if xd is None:
        lead = x.shape[:-1]
        x3 = x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1)
    else:
        x = x.movedim(xd, 0)
        lead = x.shape[1:-1]
        x3 = x.reshape(n, -1, x.shape[-1])  # [n, rows, in]
    if w.shape[1] < _NARROW and x3.device.type == "cpu":
        return _narrow_points(x3, w, None if b is None else b.movedim(bd, 0), act).view(n, *lead, w.shape[1])
    out = torch.bmm(x3, w.transpose(1, 2))  # then the bias and the activation in place, in one pass
    return _epilogue_(out, None if b is None else b.movedim(bd, 0), act).view(n, *lead, w.shape[1])


# Per-point Linear layers with fewer outputs than this (a classifier's last layer) take the
# transposed product on the CPU: x3 [n, R, in] @ w^T [n, in, F] with F < 16 fills less than one
# AVX-512 tile of fp32 outputs (44-57 GFLOP/s at F = 10 on 2 AMD EPYC cores, 28-49 at F = 1-4),
# w [n, F, in] @ x3^T puts F in the rows (108-116 GFLOP/s at F = 10); alike at F = 16, up to 15 %
# apart above (the digits MLP grid's last layer, 25x25 points: 60-72 -> 33-35 ms, bias included).
_NARROW = 16


def _narrow_points(x3: Tensor, w: Tensor, b: Tensor | None, act: str | None) -> Tensor:
    """act(x3 [n, R, in] @ w[n, F, in]^T + b[n, F]) as [n, R, F] (a transposed view of a contiguous
    [n, F, R]): one bmm (or baddbmm with the bias), the activation in place."""
    xt = x3.transpose(1, 2)
    out = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(-1).to(x3.dtype), w, xt)
    return activate_(out, act).transpose(1, 2)


def _conv2d_points(n: int, x: Tensor, xd, w: Tensor, wd, b: Tensor | None, bd, stride, padding, dilation,
                   groups: int, act: str | None) -> Tensor:
    """act(F.conv2d) of the n points, [n, ...] (arguments as in :func:`_linear_points`)."""
    conv = lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
    if wd is None and (b is None or bd is None):  # shared filters: the points fold into the batch
        x = _moved(x, xd, n)
        out = conv(x.reshape(-1, *x.shape[-3:]), w, b)
        return activate_(out, act).view(*x.shape[:-3], *out.shape[-3:])
    if xd is None and groups == 1 and x.dim() == 4:  # shared input: one convolution, filters stacked
        w = _moved(w, wd, n)
        bias = None if b is None else _moved(b, bd, n).reshape(-1)
        out = activate_(conv(x, w.reshape(-1, *w.shape[2:]), bias), act)  # [rows, n * out, H', W']
        return out.view(x.shape[0], n, w.shape[1], *out.shape[-2:]).transpose(0, 1)
    x, w = _moved(x, xd, n), _moved(w, wd, n)
    b = None if b is None else _moved(b, bd, n)
    first = conv(x[0], w[0], None if b is None else b[0])
    out = first.new_empty(n, *first.shape)
    out[0] = first
    for i in range(1, n):
        out[i] = conv(x[i], w[i], None if b is None else b[i])
    return activate_(out, act)


class _LinearFn(torch.autograd.Function):
    """act(F.linear(x, w, b)) with a vmap rule for per-point weights: one bmm for all points, the
    bias and the activation applied in place."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, act: str | None = None) -> Tensor:
        return activate_(F.linear(x, w, b), act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, w: Tensor, b: Tensor | None, act: str | None = None):
        return _linear_points(info.batch_size, x, in_dims[0], w, in_dims[1], b, in_dims[2], act), 0


class _Conv2dFn(torch.autograd.Function):
    """act(F.conv2d) with a vmap rule for per-point filters: plain convolutions, not one grouped one."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int,
                act: str | None = None) -> Tensor:
        return activate_(F.conv2d(x, w, b, stride, padding, dilation, groups), act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int,
             act: str | None = None):
        xd, wd, bd = in_dims[:3]
        return _conv2d_points(info.batch_size, x, xd, w, wd, b, bd, stride, padding, dilation, groups, act), 0


def _direct(points, *tensors):
    """``points(n, *plain tensors and their point dimensions)`` called on the unwrapped tensors when
    the innermost functorch transform is a vmap that batches some of ``tensors`` and none is wrapped
    by another transform: the output is wrapped back at that level. None otherwise (the caller goes
    through its autograd.Function, whose generic vmap dispatch costs ~0.5 ms of Python per call)."""
    if _ft is None:
        return None
    level = _ft.maybe_current_level()
    if level is None:
        return None
    top = _ft.peek_interpreter_stack()
    if top is None or top.key() != _ft.TransformType.Vmap:
        return None
    args, n = [], None
    for t in tensors:
        if t is None:
            args += [None, None]
            continue
        u, d = _ft._unwrap_batched(t, level)
        if _ft.maybe_get_level(u) != -1:
            return None
        if d is not None:
            n = u.shape[d]
        args += [u, d]
    if n is None:
        return None
    return _ft._add_batch_dim(points(n, *args), 0, level)


class _BatchedConv2d(nn.Conv2d):
    """Stand-in for an nn.Conv2d (zero padding): the layer's attributes and parameters, forward
    through :func:`_conv2d_points` (directly inside the grid's vmap, else :class:`_Conv2dFn`);
    ``fused_call(x, act)``: the same with the activation that follows it applied (:class:`_FusedSequential`)."""

    def fused_call(self, x: Tensor, act: str | None) -> Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups, act)
        out = _direct(lambda n, *t: _conv2d_points(n, *t, *args), x, self.weight, self.bias)
        return out if out is not None else _Conv2dFn.apply(x, self.weight, self.bias, *args)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused_call(x, None)


class _BatchedLinear(nn.Linear):
    """Stand-in for an nn.Linear: the layer's attributes and parameters, forward through
    :func:`_linear_points` (directly inside the grid's vmap, else :class:`_LinearFn`);
    ``fused_call(x, act)``: the same with the activation that follows it applied (:class:`_FusedSequential`)."""

    def fused_call(self, x: Tensor, act: str | None) -> Tensor:
        out = _direct(lambda n, *t: _linear_points(n, *t, act), x, self.weight, self.bias)
        return out if out is not None else _LinearFn.apply(x, self.weight, self.bias, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused_call(x, None)


class _FusedSequential(nn.Sequential):
    """Stand-in for a plain nn.Sequential (same children, same dict of them) whose own forward runs
    ``fused``: name -> activation of the children that take the activation module after them into
    their ``fused_call`` (that module is then skipped). The children are unchanged, so a model that
    calls them itself (``seq[0](x)``, ``for m in seq``) gets their plain outputs. Children are
    looked up by name on every call (the first-layer shortcut swaps one for the duration of a walk)."""

    fused: dict = {}

    def forward(self, input):
        skip = False
        for name, m in self._modules.items():
            if skip:
                skip = False
                continue
            act = self.fused.get(name)
            if act is None:
                input = m(input)
            else:
                input, skip = m.fused_call(input, act), True
        return input


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
    if kind is None or _hooked(m) or parametrize.is_parametrized(m):
        return None
    if isinstance(m, nn.Conv2d) and (not conv or m.padding_mode != "zeros"):
        return None
    return _twin(m, kind)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def global_hooks() -> bool:
    """Whether module forward hooks are registered for every module (torch.nn.modules.module)."""
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _fuse_activations(model: nn.Module, done: list) -> nn.Module:
    """Every plain nn.Sequential of ``model`` (bottom-up) with a stand-in followed by an activation
    of :data:`FUSED` (nn.ReLU, nn.Tanh) replaced by a :class:`_FusedSequential` that applies the
    activation in place on the stand-in's fresh output (one pass over the activations instead of two,
    no second buffer); only where the Sequential's own forward is what hands the output on (its
    children are unchanged for direct calls), and not with global module hooks (they would see the
    layer's output after the activation). Replacements are appended to ``done``; returns the model
    to call (its fused stand-in when it is such a Sequential itself)."""
    if global_hooks():
        return model
    root = model
    for name, seq in reversed(list(model.named_modules(remove_duplicate=False))):  # children first
        if type(seq) is not nn.Sequential or _hooked(seq):
            continue
        kids = list(seq._modules.items())
        fused = {}
        for (a_name, a), (_, b) in zip(kids, kids[1:]):
            if type(a) in (_BatchedLinear, _BatchedConv2d) and type(b) in FUSED and not _hooked(b) \
                    and sum(1 for _, m in kids if m is a) == 1:
                fused[a_name] = FUSED[type(b)]
        if not fused:
            continue
        twin = _twin(seq, _FusedSequential)
        twin.fused = fused
        if not name:
            root = twin
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent._modules.get(attr) is not seq:
            continue  # reached twice (a shared Sequential): fused once
        parent._modules[attr] = twin
        done.append((parent, attr, seq))
    return root


@contextlib.contextmanager
def swapped(model: nn.Module, conv: bool = True):
    """Context: every plain nn.Linear / nn.Conv2d of ``model`` (the model itself included)
    replaced by a batched stand-in, and the activations that follow one in an nn.Sequential fused into it
    (:func:`_fuse_activations`); yields the model to call (the stand-in when the model is one such
    layer). ``conv=False`` keeps the Conv2d layers (the grid passes it on CUDA, where the per-point
    loop of convolutions is unmeasured against vmap's one grouped cuDNN call). Restored afterwards,
    also on error."""
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
        yield _fuse_activations(model, done)
    finally:
        for parent, attr, child in reversed(done):
            parent._modules[attr] = child
