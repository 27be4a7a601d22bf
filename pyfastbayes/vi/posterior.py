"""``VariationalPosterior``: the mean-field Gaussian q of a model's Bayesian layers as a
:class:`~pyfastbayes.posteriors.Posterior` over the weights of its deterministic twin (the same
network with every Bayesian layer replaced by a plain Linear / Conv2d), so ``predict`` is the one
Bayesian-model-averaging loop and ``sample_`` writes a draw into a plain network."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..posteriors.base import Posterior, check_count
from .kl import bayesian_layers
from .layers import BayesianLinear


def _twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every Bayesian layer replaced by its deterministic layer."""
    twin = copy.deepcopy(model)
    for name, layer in bayesian_layers(twin):
        if isinstance(layer, BayesianLinear):
            new = nn.Linear(layer.in_features, layer.out_features, layer.bias_mu is not None)
        else:
            a = layer.affine
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, a.stride, a.padding, a.dilation,
                            a.groups, layer.bias_mu is not None)
        new = new.to(device=layer.weight_mu.device, dtype=layer.weight_mu.dtype)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin


class VariationalPosterior(Posterior):
    """q(w) of the Bayesian layers of ``model`` (its other parameters held at their values).

    ``sample(n)`` -> [n, P] over the twin's trainable parameters (``layout``); ``predict(x,
    n_samples)`` averages the twin's predictions over draws; ``mean()`` -> [P]; the twin is
    refreshed from the model's current mu (and other parameters) at every call."""

    kind = "VariationalPosterior"

    def __init__(self, model: nn.Module):
        bayesian_layers(model, required=True)
        self.source = model
        super().__init__(_twin(model))
        index = {n: i for i, n in enumerate(self.layout.names)}
        self._slots = []  # (layer, mu name, rho name, flat offset, numel)
        for name, layer in bayesian_layers(model):
            prefix = f"{name}." if name else ""
            for pname, mu, rho in (("weight", "weight_mu", "weight_rho"), ("bias", "bias_mu", "bias_rho")):
                if getattr(layer, mu) is None or prefix + pname not in index:
                    continue
                i = index[prefix + pname]
                self._slots.append((layer, mu, rho, self.layout.offsets[i], getattr(layer, mu).numel()))

    @torch.no_grad()
    def _sync(self) -> None:
        """Copy the model's current parameters and buffers into the twin (mu for Bayesian layers)."""
        src = dict(self.source.named_parameters())
        src.update(dict(self.source.named_buffers()))
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            mod, _, leaf = name.rpartition(".")
            for alias in (name, f"{mod + '.' if mod else ''}{leaf}_mu"):
                if alias in src and src[alias].shape == t.shape:
                    t.copy_(src[alias])
                    break

    @torch.no_grad()
    def mean(self) -> Tensor:
        """The means [P] (mu of the Bayesian layers, the other parameters as they are)."""
        self._sync()
        return self.layout.flatten()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        n = check_count(n, "n", 0)
        out = self.mean().unsqueeze(0).repeat(n, 1)
        for layer, mu, rho, off, numel in self._slots:
            sigma = F.softplus(getattr(layer, rho)).reshape(-1).to(out.dtype)
            z = torch.randn(n, numel, dtype=out.dtype, device=out.device, generator=generator)
            out[:, off:off + numel] += z * sigma
        return out

    def predict(self, x, n_samples: int = 30, **kwargs):
        self._sync()
        return super().predict(x, n_samples, **kwargs)

    def state_dict(self) -> dict:
        state = self._state_header()
        state["model"] = {k: v.detach().clone() for k, v in self.source.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check_header(state)
        if "model" not in state:
            raise ValueError("state_dict has no 'model': it was not saved by VariationalPosterior.state_dict()")
        self.source.load_state_dict(state["model"])
        self._sync()
