"""``to_bayesian``: turn a network's Linear / Conv2d layers into Bayesian ones in place."""
from __future__ import annotations

import torch
from torch import nn

from .._warnings import warn_user
from .layers import BayesianConv2d, BayesianLinear, check_options
from .priors import as_prior


# subclasses that are no user's layer: the Bayesian ones, and MultiheadAttention's out_proj (whose
# weight the attention reads directly: it is never called, so it cannot be converted)
_NOT_LAYERS = (BayesianLinear, BayesianConv2d, nn.modules.linear.NonDynamicallyQuantizableLinear)


def to_bayesian(model: nn.Module, prior=1.0, init_std: float = 0.05, exclude=(), estimator: str = "reparam") -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (except the submodules named in
    ``exclude`` and everything under them: ``exclude=['backbone']`` keeps ``backbone.0``) by :class:`BayesianLinear` / :class:`BayesianConv2d` in place, with mu initialised
    from the layer's weights and bias (a MAP warm start), sigma = ``init_std``, the given ``prior``
    (a positive float: Gaussian std; or a prior object) and ``estimator``; returns the model.

    A frozen weight or bias (requires_grad=False) gives a frozen mu and rho (sigma stays
    ``init_std``). A layer used at several places (shared weights) becomes ONE Bayesian layer put at all of them
    (excluded when any of its names is excluded); a layer whose parameters another module also
    holds (tied weights) or that has forward hooks is refused by name. Convolutions with padding='valid' or an even
    'same' convert to their numeric padding. Every layer is checked and every
    replacement built before the first is put in: on an error the model is unchanged (and torch's
    global CPU generator, which seeds the new layers, is put back). ValueError when nothing would be
    converted (no such layer, or all excluded), naming the layer that cannot be (e.g. non-zero
    padding modes); ValueError when ``model`` itself is a Linear / Conv2d (in place cannot replace it).
    Subclasses of nn.Linear / nn.Conv2d (their forward may differ) are left as they are, with a
    warning naming them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = _exclude_names(exclude)
    check_options(init_std, estimator)
    as_prior(prior)  # the prior's own error before any layer is built
    places: dict[int, tuple[nn.Module, list[str]]] = {}  # id -> (layer, every name it has in the model)
    subclassed = []  # subclasses of nn.Linear / nn.Conv2d: their forward may differ, so they are kept
    for n, m in model.named_modules(remove_duplicate=False):
        if type(m) in (nn.Linear, nn.Conv2d):
            places.setdefault(id(m), (m, []))[1].append(n)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, _NOT_LAYERS) and n not in subclassed:
            subclassed.append(n)
    names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    unknown = exclude - names
    if unknown:
        raise ValueError(f"exclude names {sorted(unknown)} that are not submodules of the model")
    def excluded(n: str) -> bool:  # a name excludes its module and everything under it (backbone.0 too)
        return any(n == e or n.startswith(e + ".") for e in exclude)
    targets = [(ns, m) for m, ns in places.values() if not any(map(excluded, ns))]
    if not targets:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to convert (outside exclude)"
                         + (f"; {subclassed} are subclasses of them, which to_bayesian leaves as they are (their "
                            "forward may differ): convert them by hand" if subclassed else ""))
    if any("" in ns for ns, _ in targets):
        raise ValueError(f"model is itself an {type(model).__name__}: to_bayesian converts the layers inside a model "
                         "in place and cannot replace the model itself; build a BayesianLinear / BayesianConv2d "
                         "directly or wrap it (nn.Sequential(model))")
    owners: dict[int, set[int]] = {}  # id of a parameter -> ids of the modules holding it directly
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(mod))
    for ns, m in targets:  # everything that can be seen without building a layer, before any is built
        shared = [k for k, p in m.named_parameters(recurse=False) if len(owners[id(p)]) > 1]
        if shared:  # a tied decoder: its Bayesian copy would untie it from the other module silently
            raise ValueError(f"layer {ns[0]!r}: its parameter(s) {shared} are also held by another module (tied "
                             "weights, e.g. an embedding and a decoder); converting it would untie them: exclude it "
                             "(or untie the weights first)")
        if m._forward_hooks or m._forward_pre_hooks:
            raise ValueError(f"layer {ns[0]!r} has forward hooks, which the Bayesian layer put in its place would not "
                             "have: remove them (and register them on the converted layer) or exclude it")
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or _numeric_padding(m) is None):
            raise ValueError(f"layer {ns[0]!r}: only zero padding of numeric sizes, 'valid', or 'same' with an even "
                             f"total per side converts (got padding={m.padding!r}, padding_mode={m.padding_mode!r}); "
                             "exclude it")
    generator_state = torch.get_rng_state()  # each new layer draws its seed and init from it
    try:
        built = [(ns, _bayesian(ns[0], m, prior, init_std, estimator)) for ns, m in targets]
    except BaseException:
        torch.set_rng_state(generator_state)
        raise
    for ns, new in built:  # nothing below can fail: the model changes only from here
        for name in ns:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    kept = [n for n in subclassed if not excluded(n)]
    if kept:
        warn_user(f"to_bayesian left {kept} deterministic: subclasses of nn.Linear / nn.Conv2d ("
                  f"{sorted({type(model.get_submodule(n)).__name__ for n in kept})}) may compute something else than "
                  "the plain layer, so they are not replaced; convert them by hand, or make them plain layers first")
    return model


def _numeric_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as sizes per side: 'valid' is 0; 'same' is dilation (k - 1) / 2 where that
    total is even (stride 1, as torch requires for 'same'); None for an uneven 'same'."""
    if not isinstance(m.padding, str):
        return tuple(m.padding)
    if m.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def _exclude_names(exclude) -> set[str]:
    """``exclude`` (a submodule name or an iterable of them) as a set, else a TypeError naming it."""
    if isinstance(exclude, str):
        return {exclude}
    try:
        names = set(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a submodule name or a list of them (e.g. exclude=['fc']), got "
                        f"{type(exclude).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"exclude must hold submodule names (str, as in model.named_modules()), got {bad[0]!r}")
    return names


def _bayesian(name: str, m: nn.Module, prior, init_std: float, estimator: str) -> nn.Module:
    """The Bayesian layer replacing ``m`` (named ``name``): its sizes, device, dtype, training flag and
    frozen parameters (requires_grad of mu and rho as the weight's / the bias's), mu = m's weight and bias. A layer whose sizes a Bayesian layer refuses is named in the error."""
    w = m.weight
    try:
        if isinstance(m, nn.Linear):
            new = BayesianLinear(m.in_features, m.out_features, m.bias is not None, prior=prior, init_std=init_std,
                                 estimator=estimator)
        else:
            new = BayesianConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, _numeric_padding(m),
                                 m.dilation, m.groups, m.bias is not None, prior=prior, init_std=init_std,
                                 estimator=estimator)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {name!r} ({m}) cannot be converted: {e}; exclude it") from e
    new = new.to(device=w.device, dtype=w.dtype)
    new.rng = new.rng.to(w.device)
    with torch.no_grad():
        new.weight_mu.copy_(w)
        if m.bias is not None:
            new.bias_mu.copy_(m.bias)
    new.train(m.training)
    # a frozen weight (or bias) stays frozen: its mu and rho do not train either
    new.weight_mu.requires_grad_(w.requires_grad)
    new.weight_rho.requires_grad_(w.requires_grad)
    if m.bias is not None:
        new.bias_mu.requires_grad_(m.bias.requires_grad)
        new.bias_rho.requires_grad_(m.bias.requires_grad)
    return new
