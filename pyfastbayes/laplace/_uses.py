"""Which covered parameters the model's forward uses outside their own module's call.

Laplace's curvature comes from each covered module's own call (its recorded input and output
gradients, or per-example gradients of its own forward). A parameter that the forward also reads
elsewhere, e.g. GPT-style weight tying ``F.linear(h, self.emb.weight)`` or a ``self.lin.weight``
used by the parent module, has curvature from that second use which no block sees: the posterior
would be silently wrong. One probe forward under a TorchFunctionMode finds such uses: every torch
call that takes a covered parameter while its module is not running is one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


# reads of a parameter's metadata, not of its values: x.to(p.dtype), p.shape, next(parameters()).device
_METADATA = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "element_size", "is_contiguous",
                       "is_floating_point", "is_complex", "get_device", "data_ptr", "storage_offset", "__len__"})
_VALUE_GETTERS = frozenset({"T", "mT", "H", "mH", "data"})  # attribute getters that do hand the values on


def _reads_values(func) -> bool:
    """Whether a torch call ``func`` taking a parameter reads its values (not its dtype / shape /
    device / requires_grad, ...)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # an attribute getter: Tensor.dtype.__get__, Tensor.T.__get__, ...
        return getattr(getattr(func, "__self__", None), "__name__", "") in _VALUE_GETTERS
    return name not in _METADATA


class _Watch(TorchFunctionMode):
    """Records the names of covered parameters taken by torch calls while their module is not on
    the stack of running covered modules."""

    def __init__(self, owners: dict[int, tuple[str, nn.Module]], running: list):
        super().__init__()
        self.owners, self.running, self.outside = owners, running, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _reads_values(func):
            return func(*args, **kwargs)
        for a in tree_flatten((args, kwargs))[0]:
            hit = self.owners.get(id(a)) if isinstance(a, nn.Parameter) else None
            if hit is not None and not any(m is hit[1] for m in self.running) and hit[0] not in self.outside:
                self.outside.append(hit[0])
        return func(*args, **kwargs)


def used_outside(model: nn.Module, modules: list[tuple[str, nn.Module, list[str]]], x) -> list[str]:
    """Names of the covered parameters (``modules``: (module name, module, its covered parameter
    names)) that a forward of ``model`` on ``x`` uses outside their module's own call; the forward
    runs without gradients (the caller sets the mode)."""
    owners, running, handles = {}, [], []
    for mname, module, names in modules:
        for k in names:
            owners[id(getattr(module, k))] = (f"{mname}.{k}" if mname else k, module)
        # around the module's own hooks too (weight_norm / spectral_norm compute the weight in a pre-hook)
        handles.append(module.register_forward_pre_hook(lambda m, inp: running.append(m), prepend=True))
        handles.append(module.register_forward_hook(lambda m, inp, out: running.pop() and None,  # (None: the
                                                    always_call=True))  # output is kept)
    watch = _Watch(owners, running)
    try:
        with torch.no_grad(), watch:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return watch.outside
