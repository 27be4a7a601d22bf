"""Bayes by Backprop on Bayesian linear regression reaches the known optimum of the mean-field
Gaussian family: the mean is the exact posterior mean and each variance is 1 / Lambda_ii, the
inverse diagonal of the posterior precision Lambda (the lecture's example). Each estimator:
means within 3 % (of the posterior std scale), variances within 10 %."""
import math

import pytest
import torch

from pyfastbayes.vi import ELBO, BayesianLinear

SIGMA, PRIOR_STD = 0.5, 1.0


def _data():
    g = torch.Generator().manual_seed(0)
    N = 40
    X = torch.randn(N, 2, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.5, -0.7], dtype=torch.float64) + 0.3 + SIGMA * torch.randn(N, generator=g, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    Lam = Xa.T @ Xa / SIGMA ** 2 + torch.eye(3, dtype=torch.float64) / PRIOR_STD ** 2
    mean = torch.linalg.solve(Lam, Xa.T @ y / SIGMA ** 2)
    return X, y, mean, 1 / Lam.diagonal()


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_reaches_the_mean_field_optimum(estimator):
    X, y, mean, var = _data()
    torch.manual_seed(0)
    layer = BayesianLinear(2, 1, prior_std=PRIOR_STD, init_std=0.1, estimator=estimator).double()
    elbo = ELBO(layer, num_data=len(y), likelihood="regression", sigma=SIGMA)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 1500 else 0.1)
    avg_mu, avg_s, n = 0, 0, 0
    for t in range(4000):  # full batch, 4 Monte Carlo draws per step
        opt.zero_grad()
        loss = sum(elbo(layer(X), y) for _ in range(4)) / 4
        loss.backward()
        opt.step()
        sched.step()
        if t >= 2500:  # Polyak average of the noisy iterates
            w = torch.cat([layer.weight_mu.detach().reshape(-1), layer.bias_mu.detach()])
            s = torch.cat([torch.nn.functional.softplus(layer.weight_rho.detach()).reshape(-1),
                           torch.nn.functional.softplus(layer.bias_rho.detach())])
            avg_mu, avg_s, n = avg_mu + w, avg_s + s ** 2, n + 1
    got_mu, got_var = avg_mu / n, avg_s / n
    assert ((got_mu - mean).abs() <= 0.03 * var.sqrt().max() + 0.03 * mean.abs()).all(), (got_mu, mean)
    assert ((got_var / var - 1).abs() <= 0.10).all(), (got_var, var)
