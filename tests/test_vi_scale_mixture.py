"""The scale-mixture prior of Blundell et al. 2015 (section 3.3): its density against
torch.distributions, and the Monte Carlo KL of kl_divergence (unbiased, with unbiased gradients)
against the KL integrated by quadrature, weight by weight."""
import math

import pytest
import torch

from pyfastbayes.vi import BayesianLinear, ELBO, ScaleMixturePrior, kl_divergence

D = torch.distributions


def _mixture(prior: ScaleMixturePrior) -> D.Distribution:
    mix = D.Categorical(torch.tensor([prior.pi, 1 - prior.pi], dtype=torch.float64))
    comp = D.Normal(torch.zeros(2, dtype=torch.float64), torch.tensor([prior.std1, prior.std2], dtype=torch.float64))
    return D.MixtureSameFamily(mix, comp)


@pytest.mark.parametrize("pi,std1,std2", [(0.5, 1.0, math.exp(-6)), (0.25, 0.3, 2.0), (0.9, 1e-3, 1e-1)])
def test_log_prob_is_the_mixture_density(pi, std1, std2):
    prior = ScaleMixturePrior(pi, std1, std2)
    w = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 1, 5,
                                                                                                              dtype=torch.float64)
    want = _mixture(prior).log_prob(w).sum()
    torch.testing.assert_close(prior.log_prob(w), want, rtol=1e-12, atol=1e-10)


def _quadrature_kl(mu: torch.Tensor, sigma: torch.Tensor, prior: ScaleMixturePrior) -> torch.Tensor:
    """sum_i KL(N(mu_i, sigma_i^2) || prior) by the trapezoid rule on +-12 sigma_i (fp64)."""
    z = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    w = mu[:, None] + sigma[:, None] * z[None]  # [n, grid]
    q = D.Normal(mu[:, None], sigma[:, None])
    integrand = q.log_prob(w).exp() * (q.log_prob(w) - _mixture(prior).log_prob(w))
    return torch.trapezoid(integrand, w, dim=1).sum()


def _layer(prior):
    torch.manual_seed(0)
    layer = BayesianLinear(3, 2, prior=prior, init_std=0.2).double()
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[0.5, -1.0, 0.05], [2.0, 0.0, -0.3]]))
        layer.bias_mu.copy_(torch.tensor([0.1, -0.7]))
        layer.weight_rho.copy_(torch.tensor([[-3.0, -1.0, -2.0], [0.0, -4.0, -1.5]]))
        layer.bias_rho.copy_(torch.tensor([-2.5, -0.5]))
    return layer


def _mu_sigma(layer):
    mu = torch.cat([layer.weight_mu.reshape(-1), layer.bias_mu])
    rho = torch.cat([layer.weight_rho.reshape(-1), layer.bias_rho])
    return mu, torch.nn.functional.softplus(rho)


def test_monte_carlo_kl_and_its_gradients_are_unbiased():
    prior = ScaleMixturePrior(0.5, 1.0, 0.05)
    layer = _layer(prior)
    mu, sigma = _mu_sigma(layer)
    exact = float(_quadrature_kl(mu.detach(), sigma.detach(), prior))
    # the exact gradient of the quadrature KL in (mu, rho), by autograd through the quadrature
    mu_d = mu.detach().clone().requires_grad_(True)
    rho_d = torch.cat([layer.weight_rho.reshape(-1), layer.bias_rho]).detach().clone().requires_grad_(True)
    g_mu, g_rho = torch.autograd.grad(_quadrature_kl(mu_d, torch.nn.functional.softplus(rho_d), prior), (mu_d, rho_d))
    torch.manual_seed(1)
    n = 4000
    values, grads = [], []
    for _ in range(n):
        layer.zero_grad()
        kl = kl_divergence(layer)
        kl.backward()
        values.append(float(kl.detach()))
        grads.append(torch.cat([layer.weight_mu.grad.reshape(-1), layer.bias_mu.grad,
                                layer.weight_rho.grad.reshape(-1), layer.bias_rho.grad]))
    v = torch.tensor(values, dtype=torch.float64)
    assert abs(float(v.mean()) - exact) < 4 * float(v.std()) / math.sqrt(n), (float(v.mean()), exact)
    G = torch.stack(grads)
    want = torch.cat([g_mu, g_rho])
    se = G.std(0) / math.sqrt(n)
    assert bool(((G.mean(0) - want).abs() < 4 * se + 1e-9).all()), (G.mean(0), want, se)


def test_a_layer_with_the_mixture_prior_trains_by_the_elbo():
    torch.manual_seed(0)
    layer = BayesianLinear(3, 1, prior=ScaleMixturePrior(0.5, 1.0, math.exp(-6)), init_std=0.05)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1)
    elbo = ELBO(layer, num_data=64, likelihood="regression")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = elbo(layer(x), y)
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first
    torch.testing.assert_close(layer.weight_mu.detach(), torch.tensor([[1.0, -2.0, 0.5]]), atol=0.15, rtol=0)


@pytest.mark.parametrize("kwargs,match", [(dict(pi=0.0), "pi"), (dict(pi=1.0), "pi"), (dict(pi=True), "pi"),
                                          (dict(std1=0.0), "std1"), (dict(std2=-1.0), "std2")])
def test_bad_mixture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaleMixturePrior(**kwargs)
