"""``functional_call`` that leaves every module as it found it, also a module reached under two
names.

``torch.func.functional_call`` swaps the given tensors into the module for one call and puts the
originals back afterwards. With ``tie_weights=True`` (its default) it first expands the tensors to
every name of a tied parameter; a module reached under two names (``self.norm = self.body[1]``,
or one LayerNorm called at two places of an ``nn.Sequential``) then has its slot swapped twice,
the second time saving the already-swapped tensor as the "original", and that tensor (a vmap
BatchedTensor, or a non-leaf of the caller's graph) is what the module keeps afterwards: the model
is left broken (pytorch issue #164759). Here every slot (a module object's parameter or buffer
attribute) is swapped exactly once, under the first name of its module, and every name of the
tensor that sat there gets the value: the same call, ties included, without the corruption.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["functional_call"]


def _slots(module: nn.Module) -> dict[str, list[str]]:
    """Every name of every parameter and buffer (all aliases) -> the slots that hold that tensor,
    each slot named once, by the first path found to its module. One walk over the module tree
    (named_modules + named_parameters + named_buffers walked it three times: ~0.5 ms for 150 modules)."""
    where: dict[int, list[str]] = {}  # id of a tensor -> its slots
    names: dict[str, int] = {}  # every name (alias) -> id of its tensor
    seen: set[int] = set()
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        first = id(m) not in seen
        seen.add(id(m))
        for tensors in (m._parameters, m._buffers):
            for attr, t in tensors.items():
                if t is not None:
                    names[prefix + attr] = id(t)
                    if first:
                        where.setdefault(id(t), []).append(prefix + attr)
        for attr, child in m._modules.items():
            if child is not None:
                stack.append((f"{prefix}{attr}.", child))
    return {name: where[i] for name, i in names.items()}


def functional_call(module: nn.Module, tensors: dict[str, Tensor], args, kwargs: dict | None = None):
    """``torch.func.functional_call(module, tensors, args, kwargs)`` (tied weights follow the value
    given for any of their names, as there) with each parameter / buffer slot swapped once (module
    docstring): ``tensors`` name -> value for any name (alias) of a parameter or buffer; a name the
    module does not have is passed on as torch.func would take it. Two different values for two
    names of one tensor: ValueError. Returns the module's output."""
    slots = _slots(module)
    swapped: dict[str, Tensor] = {}
    given: dict[str, str] = {}
    for name, value in tensors.items():
        for slot in slots.get(name, (name,)):
            if slot in swapped and swapped[slot] is not value:
                raise ValueError(f"functional_call: {given[slot]!r} and {name!r} name the same tensor (tied or "
                                 "the same module under two names) and were given different values")
            swapped[slot], given[slot] = value, name
    return torch.func.functional_call(module, swapped, args, kwargs, tie_weights=False)
