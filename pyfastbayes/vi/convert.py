"""``to_bayesian``: turn a network's Linear / Conv2d layers into Bayesian ones in place."""
from __future__ import annotations

import torch
from torch import nn

from .layers import BayesianConv2d, BayesianLinear


def to_bayesian(model: nn.Module, prior=1.0, init_std: float = 0.05, exclude=(), estimator: str = "reparam") -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (except the submodule names in
    ``exclude``) by :class:`BayesianLinear` / :class:`BayesianConv2d` in place, with mu initialised
    from the layer's weights and bias (a MAP warm start), sigma = ``init_std``, the given ``prior``
    (a positive float: Gaussian std; or a prior object) and ``estimator``; returns the model.
    ValueError when nothing was converted (no such layer, or all excluded)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    names = {n for n, _ in model.named_modules()}
    unknown = exclude - names
    if unknown:
        raise ValueError(f"exclude names {sorted(unknown)} that are not submodules of the model")
    targets = [(n, m) for n, m in model.named_modules()
               if n not in exclude and type(m) in (nn.Linear, nn.Conv2d)]
    if not targets:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to convert (outside exclude)")
    for name, m in targets:
        w = m.weight
        if isinstance(m, nn.Linear):
            new = BayesianLinear(m.in_features, m.out_features, m.bias is not None, prior=prior, init_std=init_std,
                                 estimator=estimator)
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"layer {name!r}: only zero padding with numeric sizes converts (got "
                                 f"padding={m.padding!r}, padding_mode={m.padding_mode!r}); exclude it")
            new = BayesianConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.groups, m.bias is not None, prior=prior, init_std=init_std, estimator=estimator)
        new = new.to(device=w.device, dtype=w.dtype)
        new.rng = new.rng.to(w.device)
        with torch.no_grad():
            new.weight_mu.copy_(w)
            if m.bias is not None:
                new.bias_mu.copy_(m.bias)
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
