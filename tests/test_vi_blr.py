"""Bayes by Backprop on Bayesian linear regression reaches the known optimum of the mean-field
Gaussian family: the mean is the exact posterior mean and each variance is 1 / Lambda_ii, the
inverse diagonal of the posterior precision Lambda (the lecture's example). Each estimator:
means within 3 % (of the posterior std scale), variances within 10 %.

The data are chosen so that the check can fail: correlated inputs (the full posterior's marginal
variances Sigma_ii are more than 1.5x the mean-field 1 / Lambda_ii) and few rows against a
strong prior (an ELBO with the KL twice too heavy, or left out, has its optimum more than 25 % away
in some variance); both are asserted on the closed forms first."""
import math

import pytest
import torch

from pyfastbayes.vi import ELBO, BayesianLinear

SIGMA, PRIOR_STD = 1.0, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    N = 12
    x1 = torch.randn(N, generator=g, dtype=torch.float64)
    x2 = 0.9 * x1 + math.sqrt(1 - 0.81) * torch.randn(N, generator=g, dtype=torch.float64)
    X = torch.stack([x1, x2], 1)
    y = X @ torch.tensor([1.5, -0.7], dtype=torch.float64) + 0.3 + SIGMA * torch.randn(N, generator=g, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    lik = Xa.T @ Xa / SIGMA ** 2
    prior = torch.eye(3, dtype=torch.float64) / PRIOR_STD ** 2
    Lam = lik + prior
    mean = torch.linalg.solve(Lam, Xa.T @ y / SIGMA ** 2)
    # what the check must tell apart: the full posterior's marginals, and the mean-field optimum of
    # E[log lik] - beta KL (variance beta / (lik_ii + beta prior_ii)) for a KL weight beta of 2 or 0
    assert float((torch.linalg.inv(Lam).diagonal() * Lam.diagonal()).max()) > 1.5
    for beta in (2.0, 0.0):
        other = beta / (lik.diagonal() + beta * prior.diagonal())  # (beta 0: the variance collapses to 0)
        assert float((other * Lam.diagonal() - 1).abs().max()) > 0.25, beta
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
