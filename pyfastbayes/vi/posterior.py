"""``VariationalPosterior``: the mean-field Gaussian q of a model's Bayesian layers as a
:class:`~pyfastbayes.posteriors.Posterior` over the weights of its deterministic twin (the same
network with every Bayesian layer replaced by a plain Linear / Conv2d), so ``predict`` is the one
Bayesian-model-averaging loop and ``sample_`` writes a draw into a plain network."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..posteriors.base import Posterior, check_int, check_generator
from .kl import bayesian_layers
from .layers import BayesianLayer, BayesianLinear


def _twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every Bayesian layer replaced by its deterministic layer (one
    plain layer per Bayesian layer, put at every place a shared one is used)."""
    twin = copy.deepcopy(model)
    plain: dict[int, nn.Module] = {}
    for name, layer in list(twin.named_modules(remove_duplicate=False)):
        if not isinstance(layer, BayesianLayer):
            continue
        new = plain.get(id(layer))
        if new is None:
            if isinstance(layer, BayesianLinear):
                new = nn.Linear(layer.in_features, layer.out_features, layer.bias_mu is not None)
            else:
                a = layer.affine
                new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, a.stride, a.padding,
                                a.dilation, a.groups, layer.bias_mu is not None)
            new = plain[id(layer)] = new.to(device=layer.weight_mu.device, dtype=layer.weight_mu.dtype)
        if not name:  # the model is itself a Bayesian layer: its twin is the plain layer
            return new
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin


class VariationalPosterior(Posterior):
    """q(w) of the Bayesian layers of ``model`` (its other parameters held at their values).

    ``sample(n)`` -> [n, P] over the twin's trainable parameters (``layout``); ``predict(x,
    n_samples)`` averages the twin's predictions over draws; ``mean()`` -> [P]; the twin is
    refreshed from the model's current mu (and other parameters) at every call. A model whose
    layers changed since construction (replaced, resized, moved to another dtype or device) is a
    RuntimeError at the next call (build a new VariationalPosterior), and a non-finite mu or rho a
    RuntimeError naming the layer (as ``kl_divergence``), never a silent NaN draw."""

    kind = "VariationalPosterior"

    def __init__(self, model: nn.Module):
        layers = bayesian_layers(model, required=True)
        self.source = model
        super().__init__(_twin(model))
        self._layer_names = [n for n, _ in layers]
        index = {n: i for i, n in enumerate(self.layout.names)}
        self._slots = []  # (layer name, mu name, rho name, flat offset, numel)
        for name, layer in layers:
            prefix = f"{name}." if name else ""
            for pname, mu, rho in (("weight", "weight_mu", "weight_rho"), ("bias", "bias_mu", "bias_rho")):
                if getattr(layer, mu) is None or prefix + pname not in index:
                    continue
                i = index[prefix + pname]
                self._slots.append((name, mu, rho, self.layout.offsets[i], getattr(layer, mu).numel()))
        # every tensor of the twin with where _sync reads it: (twin tensor, name, Bayesian layer or
        # None, attribute): a Bayesian layer's weight / bias from its mu, the rest under its own name
        bayes = set(self._layer_names)
        self._pairs = []
        for tname, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            mod, _, leaf = tname.rpartition(".")
            self._pairs.append((t, tname, mod, f"{leaf}_mu") if mod in bayes else (t, tname, None, tname))

    def _changed(self, what: str) -> RuntimeError:
        return RuntimeError(f"the model changed since the VariationalPosterior was built ({what}); build a new "
                            "VariationalPosterior(model) for the model as it is now")

    @torch.no_grad()
    def _sync(self) -> dict[str, BayesianLayer]:
        """Copy the model's current parameters and buffers into the twin (mu for Bayesian layers) and
        return the model's Bayesian layers by name. Everything is checked before the first copy: a
        RuntimeError when a layer was replaced by one of another kind, shape, dtype or device, added
        or removed (the twin would silently predict with stale weights)."""
        layers = dict(bayesian_layers(self.source))
        if list(layers) != self._layer_names:
            raise self._changed(f"Bayesian layers {self._layer_names} at construction, {list(layers)} now")
        src = dict(self.source.named_parameters())
        src.update(dict(self.source.named_buffers()))
        copies = []
        for t, tname, layer, attr in self._pairs:
            s = src.get(attr) if layer is None else getattr(layers[layer], attr, None)
            where = repr(attr) if layer is None else f"layer {layer!r} {attr}"
            if s is None:
                raise self._changed(f"{where} is gone")
            if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                raise self._changed(f"{where} is {tuple(s.shape)} {s.dtype} on {s.device}, was {tuple(t.shape)} "
                                    f"{t.dtype} on {t.device}")
            copies.append((t, s))
        for name, mu, rho, off, numel in self._slots:
            r = getattr(layers[name], rho)
            if r is None or r.numel() != numel:
                raise self._changed(f"layer {name!r} {rho} does not match its {mu}")
        for t, s in copies:
            t.copy_(s)
        return layers

    def sample_(self, model: nn.Module | None = None, *, generator: torch.Generator | None = None) -> nn.Module:
        """Write one draw into a deterministic network of the twin's architecture (default: the
        twin, :attr:`model`); the Bayesian model itself is refused by name (its layers draw their
        own weights at every forward; it said "the model's trainable parameters changed")."""
        if model is not None and any(isinstance(m, BayesianLayer) for m in model.modules()):
            raise TypeError("sample_ writes a draw into a deterministic network (posterior.model, or a copy of the "
                            "network before to_bayesian); the model given has Bayesian layers, which draw their "
                            "own weights at every forward")
        return super().sample_(model, generator=generator)

    @torch.no_grad()
    def mean(self) -> Tensor:
        """The means [P] (mu of the Bayesian layers, the other parameters as they are)."""
        self._sync()
        return self.layout.flatten()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        n = check_int(n, "n", 0)
        check_generator(generator)
        layers = self._sync()
        mean = self.layout.flatten()
        rhos = [getattr(layers[name], rho) for name, _, rho, _, _ in self._slots]
        # one flag over the means and the rhos, one host read: a NaN sigma would make every draw NaN
        if bool(ops.any_nonfinite([mean, *rhos])):
            self._raise_nonfinite(layers)
        out = mean.unsqueeze(0).repeat(n, 1)
        for (_, _, _, off, numel), rho in zip(self._slots, rhos):
            sigma = F.softplus(rho).reshape(-1).to(out.dtype)
            z = torch.randn(n, numel, dtype=out.dtype, device=out.device, generator=generator)
            out[:, off:off + numel] += z * sigma
        return out

    def _raise_nonfinite(self, layers: dict) -> None:
        """The RuntimeError for a non-finite mean or rho (slow path): the first layer and parameter
        holding NaN or infinity, in the words of kl_divergence's."""
        for name, layer in layers.items():
            for pname in ("weight_mu", "weight_rho", "bias_mu", "bias_rho"):
                t = getattr(layer, pname)
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise RuntimeError(f"layer {name!r}: {pname} holds NaN or infinity (a diverged step); lower the "
                                       "learning rate or restore a checkpoint")
        for name, t in zip(self.layout.names, self.layout.params()):
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"parameter {name!r} holds NaN or infinity (a diverged step); lower the learning "
                                   "rate or restore a checkpoint")
        raise RuntimeError("the posterior's mean or sigma holds NaN or infinity")  # not reached: the flag said so

    def predict(self, x, n_samples: int = 30, **kwargs):
        self._sync()  # a changed model is refused before any input is touched
        return super().predict(x, n_samples, **kwargs)

    def state_dict(self) -> dict:
        state = self._state_header()
        state["model"] = {k: v.detach().clone() for k, v in self.source.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into the model: the keys, shapes and dtypes of ``state['model']``
        must be the model's and its floating-point tensors finite; all is checked before the first
        tensor is loaded, so nothing changes when it does not fit."""
        self._check_header(state)
        if "model" not in state:
            raise ValueError("state_dict has no 'model': it was not saved by VariationalPosterior.state_dict()")
        saved = state["model"]
        if not isinstance(saved, dict):
            raise TypeError(f"state_dict['model'] must be a dict (a model state_dict), got {type(saved).__name__}")
        self._sync()  # the model is still the one this posterior was built for
        current = self.source.state_dict()
        missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
        if missing or unexpected:
            what = ", ".join(f"{kind} keys {keys[:5]}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                             if keys)
            raise ValueError(f"state_dict['model'] does not fit the model ({what}): it was saved for another model")
        for key, t in current.items():
            if t.is_floating_point():  # mu, rho and the other parameters / float buffers: finite, of t's shape
                self._check_state_tensor(saved, key, tuple(t.shape))
            else:  # the RNG positions and integer buffers: exactly t's dtype and shape
                v = saved[key]
                if not torch.is_tensor(v) or v.dtype != t.dtype or v.shape != t.shape:
                    got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
                    raise ValueError(f"state_dict['model'][{key!r}] must be a {t.dtype} tensor of shape "
                                     f"{tuple(t.shape)}, got {got}")
        self.source.load_state_dict(saved)
        self._sync()
