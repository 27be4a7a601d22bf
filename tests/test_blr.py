"""SGLD, SGHMC and pSGLD sample the exact Gaussian posterior of Bayesian linear regression.

Many independent chains run side by side as the rows of one parameter [C, D] (the potential is
separable across rows), so one fused step advances all of them. Tolerances follow from the
effective number of samples and from the known discretisation bias of each scheme.
"""
import math

import pytest
import torch
from torch import nn

from pyfastbayes import optim
from pyfastbayes.data import blr_posterior, linear_regression_data

N, D, NOISE_VAR, ALPHA = 50, 3, 1.0, 1.0
CHAINS = 2000


def run_chains(make_opt, h, burn_in, spacing, snapshots, dtype=torch.float64):
    x, y, _ = linear_regression_data(N, D, noise_std=NOISE_VAR**0.5, seed=3)
    xtx, xty = (x.T @ x).to(dtype), (x.T @ y).to(dtype)
    w = nn.Parameter(torch.zeros(CHAINS, D, dtype=dtype))
    opt = make_opt([w], h)
    draws = []
    for t in range(burn_in + spacing * snapshots):
        # .grad = gradient of the MEAN negative log-likelihood per chain (row)
        w.grad = (w.detach() @ xtx - xty) / (N * NOISE_VAR)
        opt.step()
        if t >= burn_in and (t - burn_in + 1) % spacing == 0:
            draws.append(w.detach().clone())
    return x, y, torch.cat(draws).double()


def check_moments(samples, mean, cov, ess, bias):
    """Mean within 4 Monte-Carlo standard errors; covariance (scaled to correlations) within
    4 standard errors of a variance estimate, sqrt(2 / ESS), plus the scheme's bias."""
    se = torch.sqrt(torch.diag(cov) / ess)
    assert ((samples.mean(0) - mean).abs() < 4 * se).all(), (samples.mean(0), mean, se)
    emp = torch.cov(samples.T)
    scale = torch.sqrt(torch.outer(torch.diag(cov), torch.diag(cov)))
    rel = ((emp - cov) / scale).abs().max().item()
    tol = 4 * math.sqrt(2 / ess) + bias
    assert rel < tol, (rel, tol, emp, cov)


def ess_ar1(rho_step, spacing, n):
    r = rho_step**spacing
    return n * (1 - r) / (1 + r)


def posterior():
    x, y, _ = linear_regression_data(N, D, noise_std=NOISE_VAR**0.5, seed=3)
    mean, cov = blr_posterior(x, y, NOISE_VAR, ALPHA)
    lam = torch.linalg.eigvalsh(torch.linalg.inv(cov))
    return mean, cov, lam.min().item(), lam.max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sgld_matches_exact_posterior(dtype):
    mean, cov, lmin, lmax = posterior()
    h = 0.05 / lmax  # SGLD variance bias along eigenvalue lam: 1 / (1 - h lam / 4) - 1 <= 1.3 %
    rho = 1 - h * lmin / 2  # slowest mode's autocorrelation per step
    spacing = math.ceil(3 / (h * lmin / 2))
    burn_in = math.ceil(8 / (h * lmin / 2))
    snapshots = 10
    _, _, s = run_chains(lambda p, h: optim.SGLD(p, lr=h, num_data=N, prior_precision=ALPHA), h, burn_in,
                         spacing, snapshots, dtype)
    ess = ess_ar1(rho, spacing, s.shape[0])
    check_moments(s, mean, cov, ess, bias=h * lmax / 4 + (1e-3 if dtype == torch.float32 else 0))


def test_sghmc_matches_exact_posterior():
    mean, cov, lmin, lmax = posterior()
    h, friction = 0.02 / lmax, 0.1
    # underdamped for every mode (h lam_min > friction^2 / 4): |eigenvalue| = sqrt(1 - friction)
    assert h * lmin > friction**2 / 4
    rho, spacing = math.sqrt(1 - friction), 100
    _, _, s = run_chains(lambda p, h: optim.SGHMC(p, lr=h, num_data=N, friction=friction, prior_precision=ALPHA),
                         h, 400, spacing, 10)
    # stationary variance of this linear scheme exceeds 1/lam by < 0.3 % here (discrete Lyapunov)
    check_moments(s, mean, cov, ess_ar1(rho, spacing, s.shape[0]), bias=0.005)


def test_psgld_with_constant_preconditioner_matches_exact_posterior():
    """item 18: pSGLD with V held at V0 (alpha = 1 - 1e-12: V moves by < 1e-7 in this run) is
    preconditioned Langevin with the constant G = diag(1 / (eps + sqrt(V0))), whose stationary law
    is the posterior for every G > 0: drift (G grad U) and noise (sqrt(G) xi) must agree.

    In phi = G^(-1/2) theta the scheme is SGLD on the precision B = G^(1/2) A G^(1/2) (A = Sigma^-1),
    whose stationary covariance is exactly (B - h B^2 / 4)^-1 (from S = M S M + h I, M = I - h B / 2).
    The bias allowed is the largest correlation-scaled gap between that and Sigma."""
    mean, cov, _, _ = posterior()
    eps, v0 = 1e-6, torch.tensor([16.0, 9.0, 36.0], dtype=torch.float64)  # sqrt(V0) != V0
    g = 1.0 / (eps + v0.sqrt())
    b = g.sqrt()[:, None] * torch.linalg.inv(cov) * g.sqrt()[None, :]
    lam = torch.linalg.eigvalsh(b)
    h = 0.05 / lam.max().item()
    stationary = g.sqrt()[:, None] * torch.linalg.inv(b - h * b @ b / 4) * g.sqrt()[None, :]
    bias = ((stationary - cov) / torch.sqrt(torch.outer(cov.diag(), cov.diag()))).abs().max().item()
    slow = h * lam.min().item() / 2

    def make(params, h):
        opt = optim.PSGLD(params, lr=h, num_data=N, alpha=1 - 1e-12, eps=eps, prior_precision=ALPHA)
        opt.state[params[0]]["square_avg"] = v0.expand(CHAINS, D).clone()
        return opt

    spacing = math.ceil(3 / slow)
    _, _, s = run_chains(make, h, math.ceil(8 / slow), spacing, 10)
    check_moments(s, mean, cov, ess_ar1(1 - slow, spacing, s.shape[0]), bias=bias)


def test_predictive_epistemic_variance_at_several_inputs():
    """item 20: Var[f(x*)] over the draws against x*^T Sigma x* (and the mean against x*^T mu) at
    inputs in different directions (the posterior's narrowest and widest axes, a basis vector, a
    point far from the data): each is an independent check of the sampled covariance. The tolerance
    is 4 standard errors of a variance estimate from ESS draws plus SGLD's largest variance bias."""
    mean, cov, lmin, lmax = posterior()
    h = 0.05 / lmax
    slow = h * lmin / 2
    spacing = math.ceil(3 / slow)
    _, _, s = run_chains(lambda p, h: optim.SGLD(p, lr=h, num_data=N, prior_precision=ALPHA), h,
                         math.ceil(8 / slow), spacing, 5)
    ess = ess_ar1(1 - slow, spacing, s.shape[0])
    bias = 1 / (1 - h * lmax / 4) - 1  # along the stiffest direction of the posterior
    axes = torch.linalg.eigh(cov).eigenvectors.T
    inputs = [axes[0], axes[-1], torch.tensor([0.0, 1.0, 0.0]), torch.tensor([3.0, -1.5, 0.75]),
              torch.tensor([0.3, 0.2, -0.4])]
    exact = []
    for xs in inputs:
        xs = xs.double()
        f = s @ xs  # predictive means of the draws
        var_exact = (xs @ cov @ xs).item()
        assert abs(f.mean().item() - (xs @ mean).item()) < 4 * math.sqrt(var_exact / ess)
        assert abs(f.var().item() / var_exact - 1) < 4 * math.sqrt(2 / ess) + bias, (xs, f.var(), var_exact)
        exact.append(var_exact / xs.dot(xs).item())
    # the inputs probe directions whose variances differ by more than the tolerance: a sampler
    # with the right total variance but the wrong shape fails at least one of them
    assert max(exact) / min(exact) > 1 + 2 * (4 * math.sqrt(2 / ess) + bias)
