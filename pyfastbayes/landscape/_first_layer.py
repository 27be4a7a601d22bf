"""The first-layer shortcut of the grid engine: the model's first layer is linear in its weights,
so at theta0 + sum_k a_k d_k its output is W0 x + sum_k a_k (D_k x) (biases likewise). Per data
batch the m + 1 products W0 x, D_1 x, ... are computed ONCE for the whole chunk of points (one
GEMM / convolution with the m + 1 weight sets stacked); each point then costs one small
combination instead of its own first-layer GEMM (a third of the FLOPs of a digits MLP): the
fused op ``landscape_combine``, which also applies the activation that follows the layer. The
rest of the model runs per point as before, with the first layer replaced by a stand-in that
returns the point's precombined output.

Eligible: the first module with trainable parameters that the forward calls is an ``nn.Linear``
or ``nn.Conv2d`` (``padding_mode='zeros'``), called once, on the model's own input tensor, with all
its parameters in the layout, without forward hooks (its own or global), reached under one name
only, with parameters no other module holds (tied weights), and a forward that reads none of its
parameters or buffers outside its call (a tied decoder ``F.linear(h, self.enc.weight.t())``): a
probe forward with the layer behind a recording stand-in checks the last two. Anything else keeps
the plain path (``find`` returns None). The stand-in of the walk hands other attribute reads
(``self.fc1.out_features``) to the layer.
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.calls import parameter_calls
from . import _batched

_HELD = threading.local()  # the chunk's precombined first-layer outputs, read by the stand-in


class _Delegate(nn.Module):
    """Stands in for ``layer`` (held outside the module tree: its parameters are not this module's):
    attribute reads it does not have go to the layer, a read of one of the layer's parameters or
    buffers to :meth:`_tensor_read`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = object.__getattribute__(self, "_layer")
            if name in layer._parameters or name in layer._buffers:
                return self._tensor_read(name)
            return getattr(layer, name)

    def _tensor_read(self, name: str):
        raise RuntimeError(f"the landscape grid's first-layer shortcut: the forward read the first layer's {name!r} "
                           "outside its call (its value differs per point); pass first_layer=False")


class _StandIn(_Delegate):
    """Returns the combined output of the layer it replaces (inside the vmapped call: one point's),
    from the held function of the activation: ``forward`` the layer's own output, ``fused_call`` with
    the activation that follows it applied (a fused nn.Sequential, _batched.py)."""

    def forward(self, *args, **kwargs):
        return _HELD.value(None)

    def fused_call(self, x, act: str | None):
        return _HELD.value(act)


class _Probe(_Delegate):
    """The layer itself, counting its calls and recording reads of its parameters / buffers."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.calls, self.reads = 0, []

    def forward(self, *args, **kwargs):
        self.calls += 1
        return object.__getattribute__(self, "_layer")(*args, **kwargs)

    def _tensor_read(self, name: str):
        self.reads.append(name)
        return getattr(object.__getattribute__(self, "_layer"), name)


@contextlib.contextmanager
def _in_place_of(model: nn.Module, parent_name: str, attr: str, new: nn.Module):
    """Context: ``new`` at ``parent_name``.``attr`` of ``model``, the old module put back afterwards."""
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[attr]
    parent._modules[attr] = new
    try:
        yield
    finally:
        parent._modules[attr] = old


CACHE_BYTES = 256 << 20  # the first layer's products kept across the chunks of points of one grid call


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FirstLayer:
    """Where the first layer sits (parent module, attribute), its flat-layout slices and its op."""

    def __init__(self, name: str, module: nn.Module, slices: dict[str, slice], shapes: dict[str, tuple]):
        self.name, self.module, self.slices, self.shapes = name, module, slices, shapes
        parent, _, self.attr = name.rpartition(".")
        self.parent_name = parent
        self.prefix = f"{name}."
        self._cache: dict = {}  # (id, version of a batch, block, rows) -> (weakref, parts, shape, rows' copy)
        self._seen: dict = {}  # the same keys -> weakref of a batch seen once (cached when seen again)
        self._cached = 0  # bytes held

    def cached_parts(self, batch: Tensor, block: int, x: Tensor, stacked) -> tuple[Tensor, tuple]:
        """:meth:`parts` of block ``block`` (rows ``x``) of the data batch ``batch``, computed once per
        grid call: the next chunks of points read the same batch objects (a tensor or a list of
        batches) and get the kept parts back. A batch is recognised by object and version, and its
        parts are kept only once it has come back (a DataLoader's new tensors each pass are never
        kept); a kept entry also holds a copy of the rows, compared with ``x`` on every hit: an
        iterable that refills one buffer in place hands back the same object with other values,
        and writes through ``.data``, ``.numpy()`` or DLPack leave the version unchanged. The
        comparison reads the rows once, against the product's m + 1 x out multiply-adds per value.
        At most CACHE_BYTES are kept (on CUDA also an eighth of the free memory); further blocks
        are computed every time."""
        key = (id(batch), batch._version, block, x.shape[0])
        hit = self._cache.get(key)
        if hit is not None:
            ref, kept, shape, rows = hit
            if ref() is batch:
                if torch.equal(rows, x):
                    return kept, shape
                parts, shape = self.parts(x, stacked)  # the same object refilled: keep the new contents
                rows.copy_(x)
                self._cache[key] = (ref, parts, shape, rows)
                return parts, shape
            del self._cache[key]  # that batch is gone (its id reused)
            self._cached -= _nbytes(kept, rows)
        parts, shape = self.parts(x, stacked)
        seen = self._seen.get(key)
        if seen is None or seen() is not batch:
            self._seen[key] = weakref.ref(batch)  # the first sighting: nothing kept yet
            return parts, shape
        size = _nbytes(parts, x)
        budget = CACHE_BYTES
        if parts.device.type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(parts.device)[0] // 8)
        if self._cached + size <= budget:
            self._cache[key] = (self._seen.pop(key), parts, shape, x.clone())
            self._cached += size
        return parts, shape

    def _apply(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    def weights(self, theta0: Tensor, dirs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The layer's k = m + 1 weight sets (theta0's, then each direction's) stacked along the
        output channels: (weight [k * out, ...], bias [k * out] or None), once per walk."""
        def part(key: str):
            if key not in self.slices:
                return None
            sl, shape = self.slices[key], self.shapes[key]
            sets = [theta0[sl].view(shape)] + [dirs[j, sl].view(shape) for j in range(dirs.shape[0])]
            return torch.cat(sets).to(dtype)
        return part("weight"), part("bias")

    def parts(self, x: Tensor, stacked: tuple[Tensor, Tensor | None]) -> tuple[Tensor, tuple]:
        """(parts [R, k, F], shape): the layer's outputs on x at theta0 and along each direction
        (biases: d_b), per row r of the R rows (the layer's leading dimensions) its k outputs of F
        values, by ONE product with the stacked weights (:meth:`weights`); ``shape`` is one point's
        output shape (the layer's output on x)."""
        w, b = stacked
        m = self.module
        k = w.shape[0] // (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        if isinstance(m, nn.Linear):
            y = F.linear(x, w, b)  # [*lead, k * out]
            shape = (*y.shape[:-1], y.shape[-1] // k)
            return y.reshape(-1, k, shape[-1]), shape
        if m.groups == 1:
            y = self._apply(x, w, b)  # [*lead, k * out, H', W']: the k filter sets side by side
        else:  # grouped: the stacked filters would cross the groups; one convolution per set
            out = m.out_channels
            y = torch.cat([self._apply(x, w[j * out:(j + 1) * out], None if b is None else b[j * out:(j + 1) * out])
                           for j in range(k)], dim=-3)
        shape = (*y.shape[:-3], y.shape[-3] // k, *y.shape[-2:])
        rows = math.prod(y.shape[:-3])
        return y.reshape(rows, k, -1), shape

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Context: the layer replaced by the stand-in in ``model`` (the module the walk calls;
        restored afterwards, also on error); the stand-in returns what :func:`hold` was given."""
        try:
            with _in_place_of(model, self.parent_name, self.attr, _StandIn(self.module)):
                yield
        finally:
            _HELD.value = None  # the last block's outputs are not kept alive


def find(model: nn.Module, layout, example) -> FirstLayer | None:
    """The eligible first layer of ``model`` (module docstring) found by one forward of the
    ``example`` inputs (a tensor; tuples of inputs are not eligible), or None."""
    if not torch.is_tensor(example) or isinstance(model, (nn.Linear, nn.Conv2d)):
        return None
    try:
        calls = parameter_calls(model, example)
    except Exception:  # a model the probe cannot run on its own: the plain path
        return None
    if not calls:
        return None
    name, mod, inp = calls[0]
    if type(mod) not in (nn.Linear, nn.Conv2d) or sum(1 for c in calls if c[1] is mod) != 1:
        return None
    if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
        return None
    if not inp or inp[0] is not example:
        return None
    if _batched._hooked(mod) or _batched.global_hooks():
        return None  # the stand-in would skip the hooks
    own = {id(p) for p in mod.parameters(recurse=False)}
    if sum(id(p) in own for _, p in model.named_parameters(remove_duplicate=False)) != len(own):
        return None  # tied to another module, or the layer reached under two names: one path would stay at theta0
    parent_name, _, attr = name.rpartition(".")
    probe = _Probe(mod)
    try:
        with _in_place_of(model, parent_name, attr, probe), torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001  (the probe forward failed: the plain path, which will say why)
        return None
    if probe.calls != 1 or probe.reads:
        return None  # called through another reference, or its weights read outside its call
    index = {n: i for i, n in enumerate(layout.names)}
    slices, shapes = {}, {}
    for key, p in mod.named_parameters(recurse=False):
        full = f"{name}.{key}"
        if full not in index:
            return None  # a frozen first layer: the plain path handles it
        i = index[full]
        slices[key] = slice(layout.offsets[i], layout.offsets[i] + math.prod(layout.shapes[i]))
        shapes[key] = layout.shapes[i]
    return FirstLayer(name, mod, slices, shapes)


def hold(combined) -> None:
    """The current block's first-layer output for the stand-in: ``combined(act)`` gives it with the
    activation ``act`` (None or a value of _batched.FUSED) applied."""
    _HELD.value = combined
