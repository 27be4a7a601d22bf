"""pyfastbayes.priors.scaled_groups: per-layer N(0, scale / fan_in) as sampler param groups."""
import math

import pytest
import torch
from torch import nn

import pyfastbayes
from pyfastbayes.priors import scaled_groups


def _precisions(groups) -> dict[str, float]:
    """parameter name -> prior precision of its group."""
    return {name: g["prior_precision"] for g in groups for name in g["param_names"]}


def test_mlp_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8))
    groups = scaled_groups(model, scale=2.0)
    # weights: fan_in / scale; biases: 1 / scale (bias_scale defaults to scale)
    assert _precisions(groups) == {"0.weight": 32.0, "0.bias": 0.5, "2.weight": 64.0, "2.bias": 0.5,
                                   "4.weight": 16.0, "4.bias": 0.5}
    # one group per distinct precision, in order of first appearance; the tensors are the model's
    assert [g["prior_precision"] for g in groups] == [32.0, 0.5, 64.0, 16.0]
    assert [g["param_names"] for g in groups][1] == ["0.bias", "2.bias", "4.bias"]
    named = dict(model.named_parameters())
    for g in groups:
        assert all(p is named[n] for p, n in zip(g["params"], g["param_names"]))
    assert sum(len(g["params"]) for g in groups) == 6


def test_conv_bilinear_other_and_options():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=(3, 5), groups=1)
            self.grouped = nn.Conv1d(8, 8, kernel_size=3, groups=4, bias=False)
            self.bil = nn.Bilinear(4, 6, 2)
            self.norm = nn.LayerNorm(8)
            self.emb = nn.Embedding(10, 4)

    net = Net()
    groups = scaled_groups(net, scale=0.5, bias_scale=4.0, other_precision=0.0, temperature=0.1, lr=1e-4)
    prec = _precisions(groups)
    assert prec["conv.weight"] == 3 * 3 * 5 / 0.5  # in_channels x kernel
    assert prec["grouped.weight"] == (8 // 4) * 3 / 0.5  # in_channels / groups x kernel
    assert prec["bil.weight"] == 4 * 6 / 0.5
    assert prec["conv.bias"] == prec["bil.bias"] == 1 / 4.0
    for name in ("norm.weight", "norm.bias", "emb.weight"):
        assert prec[name] == 0.0
    assert "grouped.bias" not in prec
    assert all(g["temperature"] == 0.1 and g["lr"] == 1e-4 for g in groups)


def test_frozen_and_shared_parameters():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # tied: counted once, under its first name
    a.bias.requires_grad_(False)  # frozen: left out
    groups = scaled_groups(nn.Sequential(a, b))
    prec = _precisions(groups)
    assert prec == {"0.weight": 4.0, "1.bias": 1.0}


def test_sampler_uses_the_groups():
    """SGLD at T = 0 (no noise) with zero gradients is pure prior decay: each element shrinks by
    (1 - lr * alpha / 2) with its own group's alpha, which tells the groups reached the sampler."""
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pyfastbayes.optim.SGLD(scaled_groups(model, scale=2.0, temperature=0.0), lr=0.01, num_data=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    alphas = {"0.weight": 8.0, "0.bias": 0.5, "1.weight": 2.0, "1.bias": 0.5}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * (1 - 0.01 * alphas[n] / 2))
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["0.weight"]


def test_prior_log_density_matches_the_convention():
    """The groups' potential alpha |theta|^2 / 2 equals -log N(theta; 0, scale / fan_in) up to a constant."""
    torch.manual_seed(1)
    lin = nn.Linear(20, 3)
    scale = 1.5
    g = {gr["param_names"][0]: gr["prior_precision"] for gr in scaled_groups(lin, scale)}
    w = lin.weight.detach()
    var = scale / 20
    logp = torch.distributions.Normal(0.0, math.sqrt(var)).log_prob(w).sum()
    const = -0.5 * w.numel() * math.log(2 * math.pi * var)
    torch.testing.assert_close(-g["weight"] * w.square().sum() / 2, logp - const)


@pytest.mark.parametrize("kwargs, err", [
    (dict(scale=0.0), ValueError), (dict(scale=-1.0), ValueError), (dict(scale=float("nan")), ValueError),
    (dict(scale=True), ValueError), (dict(bias_scale=0.0), ValueError), (dict(other_precision=-1.0), ValueError),
    (dict(other_precision=float("inf")), ValueError), (dict(prior_precision=1.0), TypeError),
    (dict(params=[]), TypeError),
])
def test_refusals(kwargs, err):
    with pytest.raises(err):
        scaled_groups(nn.Linear(2, 2), **kwargs)


def test_refuses_non_module_and_frozen_model():
    with pytest.raises(TypeError, match="nn.Module"):
        scaled_groups([nn.Parameter(torch.zeros(2))])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        scaled_groups(frozen)


def test_exported():
    assert pyfastbayes.priors.scaled_groups is scaled_groups
