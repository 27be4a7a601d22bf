"""pyfastbayes.vi against bayesian-torch 0.5.0 (installed from PyPI) on the same mu, rho and prior:
the KL divergence (rel <= 1e-6), for Linear and Conv2d layers; and state dicts in its names load."""
import pytest
import torch
from torch import nn

from _helpers import require
from pyfastbayes.vi import BayesianConv2d, BayesianLinear, kl_divergence

bt = require("bayesian_torch.layers", "bayesian-torch is the reference Bayes-by-Backprop library")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_equals_bayesian_torch(dtype):
    torch.manual_seed(0)
    theirs = [bt.LinearReparameterization(7, 5, prior_variance=0.8, posterior_rho_init=-2.0),
              bt.Conv2dReparameterization(3, 4, 3, prior_variance=0.8, posterior_rho_init=-2.0)]
    ours = nn.Sequential(BayesianLinear(7, 5, prior_std=0.8), BayesianConv2d(3, 4, 3, prior_std=0.8))
    for t, o in zip(theirs, ours):
        t.to(dtype)
        with torch.no_grad():
            t.mu_weight.normal_(), t.rho_weight.uniform_(-4, 1), t.mu_bias.normal_(), t.rho_bias.uniform_(-4, 1)
        o.load_state_dict({k: v for k, v in t.state_dict().items()} | {"rng": o.rng}, strict=False)
    ours.to(dtype)
    kl_theirs = sum(float(t.kl_loss()) for t in theirs)  # bayesian-torch's prior_variance is the prior's std
    kl_ours = float(kl_divergence(ours))
    assert abs(kl_ours - kl_theirs) <= 1e-6 * abs(kl_theirs)
