"""Laplace on Bayesian linear regression (Gaussian likelihood): the Laplace approximation is exact,
so the 'full' and 'kron' posteriors must equal the closed-form posterior, the log marginal
likelihood the closed-form evidence, and the predictive variance sigma^2 + x^T Sigma x (fp64)."""
import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace

SIGMA, DELTA = 0.4, 2.0


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    N, D = 50, 3
    X = torch.randn(N, D, dtype=torch.float64, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.1 * torch.randn(N, dtype=torch.float64, generator=g)
    Xa = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    precision = Xa.T @ Xa / SIGMA ** 2 + DELTA * torch.eye(D + 1, dtype=torch.float64)
    theta = torch.linalg.solve(precision, Xa.T @ y / SIGMA ** 2)  # the MAP
    model = nn.Linear(D, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:D].view(1, D))
        model.bias.copy_(theta[D:])
    K = SIGMA ** 2 * torch.eye(N, dtype=torch.float64) + Xa @ Xa.T / DELTA  # y ~ N(0, K) under the prior
    evidence = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), K).log_prob(y)
    loader = [(X[:20], y[:20, None]), (X[20:], y[20:, None])]  # two batches: accumulation must be exact
    return model, loader, precision, evidence


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_exact_posterior_evidence_and_predictive(problem, structure):
    model, loader, precision, evidence = problem
    la = Laplace(model, "regression", hessian_structure=structure, prior_precision=DELTA, sigma_noise=SIGMA)
    la.fit(loader, progress=False)
    torch.testing.assert_close(la.to_dense(), precision, rtol=1e-12, atol=1e-10)
    lml = la.log_marginal_likelihood()
    assert abs(float(lml) - float(evidence)) <= 1e-8 * abs(float(evidence))
    xs = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xa = torch.cat([xs, torch.ones(7, 1, dtype=torch.float64)], 1)
    epistemic = torch.einsum("ni,ij,nj->n", xa, torch.linalg.inv(precision), xa)
    f_mu, f_var = la.la(xs)
    assert f_var.shape == (7, 1, 1)
    torch.testing.assert_close(f_var[:, 0, 0], epistemic, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(f_mu[:, 0], model(xs)[:, 0].detach())
    pred = la.predict(xs)
    torch.testing.assert_close(pred.variance[:, 0], SIGMA ** 2 + epistemic, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pred.aleatoric[:, 0], torch.full((7,), SIGMA ** 2, dtype=torch.float64))


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_draws_have_the_posterior_covariance(problem, structure):
    model, loader, precision, _ = problem
    la = Laplace(model, "regression", hessian_structure=structure, prior_precision=DELTA, sigma_noise=SIGMA).fit(
        loader, progress=False)
    n = 40000
    draws = la.sample(n, generator=torch.Generator().manual_seed(2))
    cov = torch.linalg.inv(la.to_dense())
    torch.testing.assert_close(draws.mean(0), la.mean, atol=5 * float(cov.diagonal().max().sqrt()) / n ** 0.5, rtol=0)
    # sample covariance entries have standard error ~ sqrt((S_ii S_jj + S_ij^2) / n): 6 of them
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / n).sqrt()
    assert ((torch.cov(draws.T) - cov).abs() <= 6 * se).all()


def test_marglik_tuning_finds_the_evidence_maximum(problem):
    """optimize_prior_precision('marglik') maximises the exact evidence over (delta, sigma) on BLR:
    the result must beat every point of a fine grid around it."""
    model, loader, _, _ = problem
    la = Laplace(model, "regression", hessian_structure="kron", prior_precision=1.0, sigma_noise=1.0).fit(loader, progress=False)
    la.optimize_prior_precision("marglik", n_steps=300, lr=0.05)
    best = float(la.log_marginal_likelihood())
    d0, s0 = float(la.prior_precision), float(la.sigma_noise)
    for fd in (0.8, 1.0, 1.25):
        for fs in (0.9, 1.0, 1.1):
            other = float(la.log_marginal_likelihood(torch.tensor(d0 * fd), torch.tensor(s0 * fs)))
            assert other <= best + 1e-6
    la.log_marginal_likelihood(torch.tensor(d0), torch.tensor(s0))
