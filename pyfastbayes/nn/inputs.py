"""What the model is fed and what it returns: batches of a tensor or a loader, ``input_fn`` and
``output_fn`` adapters, shared by :func:`~pyfastbayes.nn.update_bn` and every posterior's
``predict``.

Accepted without adapters: a tensor [N, ...] (split into batches of rows), or an iterable whose
items are tensors or (input, target, ...) tuples/lists (the first element is the input), and a
model returning a tensor. Anything else (dict batches, several model inputs, models returning
tuples or dicts) goes through ``input_fn`` (item -> a tensor, or a tuple of tensors passed as
positional arguments) and ``output_fn`` (model output -> a tensor [N, ...]).
"""
from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import Tensor

from .loaders import batches
from .rows import is_rows, rows_to

__all__ = ["iterate_inputs", "check_reiterable", "model_input", "model_output", "call_model", "to_device", "dtype_mismatch"]

ModelInput = Any  # a tensor, or a tuple of positional arguments (from input_fn)


def model_input(item, input_fn: Callable | None = None) -> ModelInput:
    """The model input of one loader item: ``input_fn(item)`` when given, else the item itself (a
    tensor) or its first element (a tuple/list whose first element is a tensor). Other items
    raise a TypeError saying what is accepted."""
    if input_fn is not None:
        out = input_fn(item)
        if not (torch.is_tensor(out) or (isinstance(out, tuple) and out)):
            raise TypeError(f"input_fn must return a tensor or a non-empty tuple of positional model "
                            f"arguments, got {type(out).__name__}")
        return out
    if torch.is_tensor(item):
        return item
    if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
        return item[0]
    if isinstance(item, Mapping):
        keys = ", ".join(repr(k) for k in list(item)[:5])
        raise TypeError(f"the loader yields dicts (keys {keys}); pass input_fn=lambda batch: batch[<key>] "
                        "(a tensor, or a tuple of positional model arguments) to pick the model input")
    raise TypeError(f"cannot find the model input in a loader item of type {type(item).__name__}: items must be "
                    "tensors or (input, target, ...) tuples whose first element is a tensor; pass "
                    "input_fn=... (item -> tensor or tuple of model arguments) for anything else")


def iterate_inputs(data, batch_size: int, input_fn: Callable | None = None, *,
                   name: str = "x") -> Iterator[ModelInput]:
    """Yield model inputs from a tensor [N, ...] (split into ceil(N / ``batch_size``) chunks of
    near-equal rows, at most ``batch_size`` each, so no chunk is a lone short remainder: a 1-row
    chunk would fail in train-mode BatchNorm and a short one skew its averaged statistics; each
    chunk then passed through ``input_fn`` when given) or from an iterable of loader items (see
    :func:`model_input`). ``name``: the argument's name in errors."""
    if torch.is_tensor(data):
        if data.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension: a tensor [N, ...], got a 0-dim tensor")
        for b in data.tensor_split(max(1, -(-len(data) // batch_size))):  # N = 0: one empty chunk
            if input_fn is None:
                yield b
                continue
            try:
                yield model_input(b, input_fn)
            except (TypeError, KeyError, IndexError, ValueError) as e:
                raise TypeError(f"input_fn failed on a {tuple(b.shape)} chunk of the tensor {name} ({type(e).__name__}: "
                                f"{e}): input_fn is applied to the chunks of tensors and to the items of loaders "
                                f"alike; pass {name} in the same form as the other data, or make input_fn accept "
                                "both") from e
        return
    try:
        it = batches(data)
    except TypeError:
        raise TypeError(f"{name} must be a tensor [N, ...] or an iterable of batches (a DataLoader), got "
                        f"{type(data).__name__}") from None
    for item in it:
        yield model_input(item, input_fn)


def check_reiterable(data, name: str) -> None:
    """TypeError when ``data`` is a one-shot iterator (``iter(data) is data``: a generator, or
    ``iter(loader)``) where it is read more than once, e.g. ``bn_loader`` once per draw."""
    if isinstance(data, Iterator):
        raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}), but it is read once per draw: pass "
                        "the DataLoader (or a list of batches, or a tensor) itself, not iter(...) or a generator")


def to_device(inp: ModelInput, device) -> ModelInput:
    """Move a model input (a tensor, or a tuple of arguments: its tensors and the tensors of its
    dicts, e.g. a dict batch passed whole) to ``device``."""
    if isinstance(inp, tuple):
        return tuple(rows_to(a, device) if is_rows(a) else a for a in inp)
    return inp.to(device)


def call_model(fn: Callable, inp: ModelInput):
    """``fn(*inp)`` for a tuple of arguments, else ``fn(inp)``."""
    return fn(*inp) if isinstance(inp, tuple) else fn(inp)


def model_output(out, output_fn: Callable | None = None) -> Tensor:
    """The tensor [N, ...] of one model output: ``output_fn(out)`` when given, else ``out`` itself,
    which must then be a tensor (TypeError saying how to pick it otherwise)."""
    if output_fn is not None:
        out = output_fn(out)
        if not torch.is_tensor(out):
            raise TypeError(f"output_fn must return a tensor [N, ...], got {type(out).__name__}")
        return out
    if not torch.is_tensor(out):
        hint = "out[0]" if isinstance(out, (tuple, list)) else "out['logits']" if isinstance(out, Mapping) else "..."
        raise TypeError(f"the model returned a {type(out).__name__}, not a tensor; pass "
                        f"output_fn=lambda out: {hint} to pick the outputs [N, ...] (logits for classification)")
    return out


def _tensors(inputs, in_dict: bool = False) -> Iterator[tuple[Tensor, bool]]:
    """The tensors of ``inputs`` (a tensor, or nested tuples/lists/dicts of them; other items
    skipped), each with whether it sits in a dict."""
    if torch.is_tensor(inputs):
        yield inputs, in_dict
    elif isinstance(inputs, (tuple, list)):
        for a in inputs:
            yield from _tensors(a, in_dict)
    elif isinstance(inputs, Mapping):
        for a in inputs.values():
            yield from _tensors(a, True)


def dtype_mismatch(inputs, dtype: torch.dtype, error: BaseException | None = None, *, name: str = "x",
                   owner: str = "the model", refit: str = "") -> TypeError | None:
    """The one message for "the data has another dtype than the parameters": a TypeError naming
    ``name``, both dtypes and both fixes, or None when nothing in ``inputs`` explains ``error``.

    ``inputs``: a tensor, a tuple of positional model arguments, or a list of such batches (model
    inputs only: targets would be blamed too); ``dtype``: the parameters' dtype; ``error``: the
    exception a forward raised on them (None for an up-front check, e.g. a layer's). Called only
    once a forward has failed (or, for a layer, after one dtype comparison), so no batch pays for
    it and a model that casts its own inputs is never refused. A floating-point input of another
    dtype is named first; an integer one (token ids are normal inputs) only for an up-front check,
    or when no input is floating point and ``error`` speaks of dtypes (integer pixels fed to a
    Linear). Out-of-memory and non-RuntimeErrors are never reinterpreted. ``owner`` names whose
    parameters these are; ``refit`` is appended to the model fix (e.g. ", then fit again")."""
    if error is not None and (not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError)):
        return None
    # several positional arguments are numbered; a list of batches is not
    groups = list(enumerate(inputs)) if isinstance(inputs, tuple) and len(inputs) > 1 else [(None, inputs)]
    text = "" if error is None else str(error).lower()
    speaks_of_dtypes = error is None or "dtype" in text or "scalar type" in text
    # a dict batch also carries what the model may never read (its targets, a float32 mask it
    # casts): its tensors are blamed only when the error speaks of dtypes
    tensors = [(i, t) for i, group in groups for t, in_dict in _tensors(group) if speaks_of_dtypes or not in_dict]
    culprit = next(((i, t) for i, t in tensors if t.is_floating_point() and t.dtype != dtype), None)
    if culprit is None and (error is None or (not any(t.is_floating_point() for _, t in tensors)
                                              and speaks_of_dtypes)):
        culprit = next(((i, t) for i, t in tensors if t.dtype != dtype), None)
    if culprit is None:
        return None
    i, a = culprit
    which = "the inputs are" if i is None else f"input {i} is"
    model = f" or the model (model.to({a.dtype}){refit})" if a.is_floating_point() else ""
    cast = f"{name}.to({dtype})" if name == "x" else f"inputs.to({dtype})"
    return TypeError(f"{name}: {which} {a.dtype} but {owner}'s parameters are {dtype}: cast the data ({cast})"
                     f"{model} so that they agree")
