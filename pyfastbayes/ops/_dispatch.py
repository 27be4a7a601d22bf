"""Backend choice and fake-kernel helpers shared by every op family.

``select(name, device, backend)`` is the one place that picks between the native kernel
``torch.ops.pyfastbayes.<name>`` and the pure-PyTorch reference ``pyfastbayes._reference.<name>``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import Tensor

from .. import _native, _reference

BACKENDS = ("native", "reference")
_default: list[str | None] = [None]  # the process-wide default set by `default_backend`


def _check_backend(backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None (native when the extension has a kernel for the device, "
                         f"else the reference), 'native' or 'reference'; got {backend!r}")


def native_op(name: str, device) -> Callable | None:
    """``torch.ops.pyfastbayes.<name>.default`` when the extension has a kernel for ``device``, else None.

    Meta tensors go to the op too when the extension is loaded: its fake kernel computes the
    output shapes (and refuses a call that mixes meta and real tensors).
    """
    if device is not None and (_native.has_kernel(device) or (_native.available() and _is_meta(device))):
        return getattr(torch.ops.pyfastbayes, name).default
    return None


def _is_meta(device) -> bool:
    return (device.type if isinstance(device, torch.device) else torch.device(device).type) == "meta"


def select(name: str, device, backend: str | None = None) -> Callable:
    """The implementation of op ``name`` for tensors on ``device``.

    backend: None -> the native kernel when the extension has one for ``device``, else the
    reference (same numbers, same random stream, slower); 'native' -> the kernel or a
    RuntimeError saying why there is none; 'reference' -> the pure-PyTorch reference.
    A default other than None can be set for a block with :func:`default_backend`.
    """
    cached = not torch.compiler.is_compiling()  # a traced lookup would guard on the cache: recompiles
    key = (name, device, backend, _default[0], _native.has_kernel, _native._C) if cached else None
    if cached:
        try:  # the common case: a choice made before for this op, device and backend (a dict lookup)
            return _SELECTED[key]
        except (KeyError, TypeError):  # TypeError: an unhashable device argument; decided below, not kept
            pass
    _check_backend(backend)
    fn = _select(name, device, backend if backend is not None else _default[0])
    if cached:
        with contextlib.suppress(TypeError):
            _SELECTED[key] = fn
    return fn


# (name, device, backend, default, what the extension offers) -> the implementation select() chose:
# every op call asks, and deciding afresh took ~4 us of Python (~10 % of a small Bayesian network's
# training step). The key holds the extension's module and has_kernel themselves, so a test that
# swaps either (to run without the extension) gets a fresh choice. Not used under torch.compile:
# Dynamo would guard on the dict's size and recompile each time another choice is added.
_SELECTED: dict = {}


def _select(name: str, device, backend: str | None) -> Callable:
    if backend == "reference":
        return getattr(_reference, name)
    op = native_op(name, device)
    if op is not None:
        return op
    if backend == "native":
        why = (f"the extension is not loaded ({_native.LOAD_ERROR})" if not _native.available()
               else "the extension was built without kernels for it (see pyfastbayes.build_info())")
        raise RuntimeError(f"{name}: no native kernel for {device}: {why}; use backend=None or 'reference'")
    return getattr(_reference, name)


@contextlib.contextmanager
def default_backend(backend: str | None):
    """Within the block, ops called with ``backend=None`` use ``backend`` ('native' or
    'reference'); e.g. ``with pyfastbayes.ops.default_backend('reference'): ...`` runs everything
    on the pure-PyTorch references (for debugging, or to compare against the kernels)."""
    _check_backend(backend)
    old = _default[0]
    _default[0] = backend
    try:
        yield
    finally:
        _default[0] = old


def device_of(tensors: Iterable[Tensor], fallback: Tensor | None = None):
    """Device of the first tensor of ``tensors``, else of ``fallback``, else None."""
    for t in tensors:
        return t.device
    return fallback.device if fallback is not None else None
