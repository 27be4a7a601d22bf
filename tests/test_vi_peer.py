"""pyfastbayes.vi against bayesian-torch 0.5.0 (installed from PyPI) on the same mu, rho and prior.

bayesian-torch's ``kl_loss()`` is the MEAN of the elementwise KL over each tensor (``kl.mean()`` in
its ``kl_div``), summed over the weight and bias tensors of a layer, not the KL divergence of the
layer's q: it shrinks the KL term by the tensor sizes. We return the KL itself; the test compares
per-tensor sums divided by their sizes with their value (rel <= 1e-6), and loads their state dicts
(``mu_weight``, ``mu_kernel``, ...) into our layers."""
import pytest
import torch
from torch import nn

from _helpers import require
from pyfastbayes import ops
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
        o.to(dtype)
        with torch.no_grad():
            for name, p in t.named_parameters():
                p.normal_() if name.startswith("mu") else p.uniform_(-4, 1)
        rng = o.rng.clone()
        o.load_state_dict(t.state_dict())  # strict: their state has no RNG position, the layer keeps its own
        assert torch.equal(o.rng, rng)
        for name, p in t.named_parameters():  # the names were mapped, the values copied
            ours_name = {"mu": "weight_mu", "rho": "weight_rho"}[name.split("_")[0]] if "bias" not in name else \
                {"mu": "bias_mu", "rho": "bias_rho"}[name.split("_")[0]]
            assert torch.equal(getattr(o, ours_name).detach(), p.detach())
    prior_var = torch.tensor([0.8 ** 2], dtype=torch.float64)
    for t, o in zip(theirs, ours):
        per_tensor_mean = sum(float(ops.vi_kl([mu], [rho], prior_var)) / mu.numel()
                              for mu, rho in ((o.weight_mu, o.weight_rho), (o.bias_mu, o.bias_rho)))
        assert abs(per_tensor_mean - float(t.kl_loss())) <= 1e-6 * abs(float(t.kl_loss()))
    # and our model-level KL is the sum of the per-tensor KLs (the divergence of the whole q)
    total = sum(float(ops.vi_kl([mu], [rho], prior_var)) for o in ours
                for mu, rho in ((o.weight_mu, o.weight_rho), (o.bias_mu, o.bias_rho)))
    assert abs(float(kl_divergence(ours)) - total) <= 1e-6 * total
