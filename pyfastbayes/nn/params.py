"""The model's trainable named parameters <-> one flat [P] vector.

:class:`ParamLayout` records the names, shapes and dtypes of a model's trainable parameters (in
the order of ``model.named_parameters()``) and converts between them and one flat vector of
P = sum of their sizes numbers: :meth:`~ParamLayout.flatten` (parameters -> [P]),
:meth:`~ParamLayout.unflatten` ([P] -> name -> tensor, for ``torch.func.functional_call``) and
:meth:`~ParamLayout.write_` ([P] -> the parameters, in place). Every posterior addresses the
weights through it, and every access checks that the model still has the recorded parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .._memory import overlaps_itself

__all__ = ["ParamLayout"]

Description = list  # [(name, shape tuple, dtype string)]: picklable, stored in state dicts


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _difference(now: Sequence[tuple], then: Sequence[tuple], now_is: str = "now",
                then_is: str = "at construction") -> str:
    """Why two lists of (name, shape, dtype) differ, in words (empty when they agree)."""
    if len(now) != len(then):
        return f"{len(now)} trainable tensors {now_is}, {len(then)} {then_is}"
    for i, (a, b) in enumerate(zip(now, then)):
        if a != b:
            return f"tensor {i}: {a} {now_is}, {b} {then_is}"
    return ""


class ParamLayout:
    """Names, shapes and dtypes of a model's trainable parameters, flattened into [P].

    Args:
        model: the network; its parameters with ``requires_grad`` (order of
            ``model.named_parameters()``) must be floating point and on one device.
        owner: what the layout belongs to, named in error messages ("... changed since the SWAG
            was built").

    Attributes:
        model: the model the layout was taken from (the default of every ``model=None``).
        names, shapes, dtypes: per-tensor tuples.  numel: P.  device: the parameters' device.
        offsets: start of each tensor in the flat vector.
        dtype: the promoted dtype of all parameters (what :meth:`flatten` returns by default).

    Two layouts are equal when names, shapes and dtypes agree (the device and the model object
    do not count).
    """

    def __init__(self, model: nn.Module, owner: str = "layout"):
        named = _trainable(model)
        if not named:
            raise ValueError(f"model has no trainable parameters (none with requires_grad): the {owner} "
                             "needs at least one")
        for n, p in named:
            if not p.is_floating_point():
                raise TypeError(f"parameter {n!r} has dtype {p.dtype}; only floating-point parameters "
                                "can be flattened")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"the trainable parameters must be on one device, got {sorted(map(str, devices))}: "
                             "move the model with model.to(device)")
        if next(iter(devices)).type == "meta":
            raise ValueError(f"the model's parameters are on the meta device (no values) for the {owner}: materialise "
                             "the model first, e.g. model.to_empty(device='cpu') and then load its weights")
        for n, p in named:
            if overlaps_itself(p):  # writing a draw into it would write one number through several entries
                raise ValueError(f"parameter {n!r} overlaps itself (stride {tuple(p.stride())}: an expand()ed or "
                                 "as_strided view), so its entries are not independent parameters: make it a "
                                 "contiguous tensor (nn.Parameter(t.clone()))")
        self.model = model
        self.owner = owner
        self.names = tuple(n for n, _ in named)
        self.shapes = tuple(tuple(p.shape) for _, p in named)
        self.dtypes = tuple(p.dtype for _, p in named)
        self.device = named[0][1].device
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        self.numel = sum(sizes)
        dtype = self.dtypes[0]
        for d in self.dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        self.dtype = dtype

    # ---- identity ------------------------------------------------------------------------------
    def _entries(self) -> list[tuple]:
        return list(zip(self.names, self.shapes, self.dtypes))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ParamLayout):
            return NotImplemented
        return self._entries() == other._entries()

    def __hash__(self) -> int:
        return hash(tuple(self._entries()))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ParamLayout({len(self)} tensors, P={self.numel}, {self.dtype}, {self.device})"

    def difference(self, other: "ParamLayout", there: str = "there", here: str = "here") -> str:
        """Why ``other`` differs from this layout, in words ('' when equal); ``there`` / ``here``
        name the two sides (e.g. "in model_b", "in model_a")."""
        return _difference(other._entries(), self._entries(), there, here)

    def describe(self) -> Description:
        """Picklable description for state dicts: [(name, shape tuple, dtype string)] per tensor."""
        return [(n, tuple(s), str(d)) for n, s, d in self._entries()]

    def check_description(self, description, what: str = "state_dict") -> None:
        """Raise ValueError naming the first difference when ``description`` (from
        :meth:`describe`) was taken from other parameters than this layout."""
        try:
            theirs = [(n, tuple(s), str(d)) for n, s, d in description]
        except (TypeError, ValueError):
            raise ValueError(f"{what} has no valid layout description (a list of (name, shape, dtype))") from None
        why = _difference(theirs, self.describe(), "saved", "here")
        if why:
            raise ValueError(f"{what} was saved for a model with other trainable parameters ({why})")

    # ---- model access --------------------------------------------------------------------------
    def params(self, model: nn.Module | None = None) -> list[Tensor]:
        """The trainable parameters of ``model`` (default: :attr:`model`) detached, in layout order,
        after checking names, shapes, dtypes and device against the layout (RuntimeError naming
        the first difference otherwise)."""
        model = self.model if model is None else model
        named = _trainable(model)
        now = [(n, tuple(p.shape), p.dtype) for n, p in named]
        why = _difference(now, self._entries())
        if why:
            raise RuntimeError(f"the model's trainable parameters changed since the {self.owner} was built "
                               f"({why}); build a new {self.owner} for the new model")
        for n, p in named:
            if p.device != self.device:
                raise RuntimeError(f"parameter {n!r} moved to {p.device}; the {self.owner} was built on "
                                   f"{self.device}: move the model back")
        return [p.detach() for _, p in named]

    def flatten(self, model: nn.Module | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The parameters of ``model`` (default: :attr:`model`) as one new flat tensor [P] in
        ``dtype`` (default :attr:`dtype`) on the parameters' device."""
        ps = self.params(model)
        dtype = self.dtype if dtype is None else dtype
        return torch.cat([p.reshape(-1).to(dtype) for p in ps])

    def _check_flat(self, flat: Tensor, name: str = "flat") -> None:
        if not torch.is_tensor(flat) or not flat.is_floating_point():
            got = f"a {flat.dtype} tensor" if torch.is_tensor(flat) else type(flat).__name__
            raise TypeError(f"{name} must be a floating-point tensor [P], got {got}")
        if flat.shape != (self.numel,):
            raise ValueError(f"{name} must be [P] with P = {self.numel} (the trainable parameters), "
                             f"got {tuple(flat.shape)}")

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Flat [P] -> dict name -> tensor [shape] in each parameter's dtype, on ``flat``'s device:
        views of ``flat`` where the dtypes agree (copies otherwise). Pass the dict (plus buffers)
        to ``torch.func.functional_call``."""
        self._check_flat(flat)
        return {n: flat[o:o + math.prod(s)].view(s).to(d)
                for n, s, d, o in zip(self.names, self.shapes, self.dtypes, self.offsets)}

    @torch.no_grad()
    def write_(self, flat: Tensor, model: nn.Module | None = None) -> nn.Module:
        """Copy flat [P] into the parameters of ``model`` (default: :attr:`model`) in place, cast
        to each parameter's dtype and moved to its device; returns the model. Checked first:
        nothing is written when ``flat`` or the model does not fit."""
        self._check_flat(flat)
        model = self.model if model is None else model
        ps = self.params(model)
        for p, o in zip(ps, self.offsets):
            p.copy_(flat[o:o + p.numel()].view(p.shape))
        return model
