"""Ported from laplace-torch's own suite (tests/test_baselaplace.py, first half, at 44ea62a): the
same checks, re-expressed against pyfastbayes.laplace.Laplace (its four structures stand for
laplace-torch's FullLaplace, KronLaplace, DiagLaplace and LowRankLaplace).

Left out, or changed:
- test_laplace_init: checks ``la.H`` and ``_init_H`` (internals); ours has no posterior before fit,
  so a fit is required before ``mean`` (kept: that it refuses clearly).
- test_laplace_large_init: skipped upstream too (a wide ResNet).
- String sigma_noise / prior_precision / prior_mean: laplace-torch raises ValueError, ours
  TypeError (a wrong type); a [1, 1] sigma_noise is accepted by ours (any one-value tensor).
- Layerwise priors: laplace-torch has one entry per parameter tensor, ours one per block (a
  Linear's weight and bias share a block by default, README "Coming from laplace-torch").
- ``log_likelihood`` is a method here (a property upstream); ``functional_variance`` takes the
  inputs (upstream the Jacobians); ``posterior_precision`` of 'kron' is a list of factors (the
  dense matrix is ``to_dense()``).
- test_log_prob_*: the prior's density before fit (ours refuses to evaluate before fit).
"""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, MultivariateNormal, Normal
from torch.utils.data import DataLoader, TensorDataset

from pyfastbayes.laplace import Laplace

STRUCTURES = ["full", "kron", "diag", "lowrank"]
ONLINE = ["full", "kron", "diag"]


def _model():
    torch.manual_seed(240)
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).double()


def _loader(likelihood: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(2, (10,), generator=g) if likelihood == "classification" else \
        torch.randn(10, 2, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(X, y), batch_size=3)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---- construction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_mean_before_fit_is_refused(structure):
    la = Laplace(_model(), "classification", hessian_structure=structure)
    with pytest.raises(RuntimeError, match="fit"):
        la.mean


@pytest.mark.parametrize("structure", STRUCTURES)
def test_invalid_likelihood(structure):
    with pytest.raises(ValueError, match="likelihood"):
        Laplace(_model(), "otherlh", hessian_structure=structure)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_sigma_noise_forms(structure):
    model = _model()
    for sigma in (1.2, torch.tensor(1.2), torch.tensor([1.2])):
        la = Laplace(model, "regression", hessian_structure=structure, sigma_noise=sigma)
        assert float(la.sigma_noise) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, "classification", hessian_structure=structure, sigma_noise=1.2)
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, "regression", hessian_structure=structure, sigma_noise=torch.tensor([1.2, 1.3]))
    with pytest.raises(TypeError, match="sigma_noise"):
        Laplace(model, "regression", hessian_structure=structure, sigma_noise="1.2")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_prior_precision_forms(structure):
    model = _model()
    P = _n_params(model)
    for prior in (10.6, torch.tensor(10.6), torch.tensor([10.7])):
        Laplace(model, "regression", hessian_structure=structure, prior_precision=prior)
    per_weight, per_block = torch.full((P,), 10.7), torch.full((2,), 10.7)
    if structure in ("kron", "lowrank"):  # kron: exact only per block; lowrank: one value
        with pytest.raises(ValueError, match="prior_precision"):
            Laplace(model, "regression", hessian_structure=structure, prior_precision=per_weight)
    else:
        Laplace(model, "regression", hessian_structure=structure, prior_precision=per_weight)
    if structure == "lowrank":
        with pytest.raises(ValueError, match="prior_precision"):
            Laplace(model, "regression", hessian_structure=structure, prior_precision=per_block)
    else:
        Laplace(model, "regression", hessian_structure=structure, prior_precision=per_block)
    for bad in (torch.tensor([[10.6]]), torch.full((17,), 10.6)):
        with pytest.raises(ValueError, match="prior_precision"):
            Laplace(model, "regression", hessian_structure=structure, prior_precision=bad)
    with pytest.raises(TypeError, match="prior_precision"):
        Laplace(model, "regression", hessian_structure=structure, prior_precision="1.5")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_prior_mean_forms_and_scatter(structure):
    model = _model()
    theta, P = _flat(model), _n_params(model)
    loader = _loader("classification")
    for mean in (1.0, torch.ones(1), torch.ones(1)[0], torch.ones(P)):
        la = Laplace(model, "classification", hessian_structure=structure, prior_precision=1e-2, prior_mean=mean)
        assert torch.equal(la.prior_mean, torch.as_tensor(mean, dtype=torch.float64))
        la.fit(loader, progress=False)
        expected = 1e-2 * (theta - 1) @ (theta - 1)
        torch.testing.assert_close(la.scatter, expected, rtol=1e-12, atol=0)
    for bad in (torch.ones(P, 1), torch.ones(P - 3)):
        with pytest.raises(ValueError, match="prior_mean"):
            Laplace(model, "classification", hessian_structure=structure, prior_mean=bad)
    with pytest.raises(TypeError, match="prior_mean"):
        Laplace(model, "classification", hessian_structure=structure, prior_mean="72")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_temperature_is_kept(structure):
    assert Laplace(_model(), "classification", hessian_structure=structure, temperature=1.1).temperature == 1.1


# ---- a fitted Laplace against brute force ------------------------------------------------------------
def _jacobians(model, X):
    """[N, C, P] Jacobians of the outputs at the model's weights (torch.func, the reference)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(flat):
        sizes = [params[n].numel() for n in names]
        parts = {n: t.view_as(params[n]) for n, t in zip(names, flat.split(sizes))}
        return torch.func.functional_call(model, parts, (X,))

    J = torch.func.jacrev(f)(_flat(model))  # [N, C, P]
    return J


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_fitted_quantities_against_brute_force(structure, likelihood):
    model, loader = _model(), _loader(likelihood)
    sigma = 1.0 if likelihood == "classification" else 0.3
    la = Laplace(model, likelihood, hessian_structure=structure, sigma_noise=sigma, prior_precision=0.7)
    la.fit(loader, progress=False)
    X, y = loader.dataset.tensors
    with torch.no_grad():
        f = model(X)
    assert la.n_data == 10 and la.n_outputs == 2

    # the training log likelihood, and again after the noise changes
    if likelihood == "classification":
        log_lik = Categorical(logits=f).log_prob(y).sum()
    else:
        log_lik = Normal(f, sigma).log_prob(y).sum()
        la.sigma_noise = 0.72
        torch.testing.assert_close(la.log_likelihood(), Normal(f, 0.72).log_prob(y).sum(), rtol=1e-12, atol=0)
        la.sigma_noise = sigma
    torch.testing.assert_close(la.log_likelihood(), log_lik, rtol=1e-12, atol=0)

    # the marginal likelihood from its formula, with the dense posterior precision
    theta = _flat(model)
    torch.testing.assert_close(la.mean, theta, rtol=0, atol=0)
    prior = torch.diag(la.prior_precision_diag)
    assert prior.shape == (theta.numel(), theta.numel())
    post = la.to_dense()
    lml = log_lik - 0.5 * theta @ prior @ theta + 0.5 * (torch.logdet(prior) - torch.logdet(post))
    torch.testing.assert_close(la.log_marginal_likelihood(), lml, rtol=1e-10, atol=0)

    # draws: their shape and mean
    assert la.sample(1, generator=torch.Generator().manual_seed(61)).shape == (1, theta.numel())
    draws = la.sample(20000, generator=torch.Generator().manual_seed(61))
    assert draws.shape == (20000, theta.numel())
    se = la.posterior_variance.sqrt() / math.sqrt(20000)
    assert ((draws.mean(0) - la.mean).abs() < 5 * se).all()

    # the functional variance J Sigma J^T
    J = _jacobians(model, X)
    Sigma = torch.linalg.inv(post)
    f_mu, f_var = la.functional_variance(X)
    torch.testing.assert_close(f_mu, f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_var, torch.einsum("nkp,pq,ncq->nkc", J, Sigma, J), rtol=1e-8, atol=1e-12)


# ---- fitting again, and online ----------------------------------------------------------------------
@pytest.mark.parametrize("structure", ONLINE)
def test_refit_overrides(structure):
    model, loader = _model(), _loader("regression")
    la = Laplace(model, "regression", hessian_structure=structure, sigma_noise=0.3, prior_precision=0.7)
    la.fit(loader, progress=False)
    P, m, lml = la.to_dense(), la.mean.clone(), la.log_marginal_likelihood()
    la.fit(loader, progress=False)  # override=True (the default): the same posterior, not twice the curvature
    torch.testing.assert_close(la.to_dense(), P, rtol=1e-12, atol=0)
    torch.testing.assert_close(la.mean, m, rtol=0, atol=0)
    torch.testing.assert_close(la.log_marginal_likelihood(), lml, rtol=1e-12, atol=0)
    assert la.n_data == 10


@pytest.mark.parametrize("structure", ONLINE)
def test_online_fit_accumulates(structure):
    model, loader = _model(), _loader("regression")
    la = Laplace(model, "regression", hessian_structure=structure, sigma_noise=0.3, prior_precision=0.7)
    la.fit(loader, progress=False)
    prior = torch.diag(la.prior_precision_diag)
    H, loglik = la.to_dense() - prior, la.log_likelihood()
    la.fit(loader, progress=False, override=False)
    la.fit(loader, progress=False, override=False)
    assert la.n_data == 30
    torch.testing.assert_close(la.log_likelihood(), 3 * loglik, rtol=1e-12, atol=0)
    torch.testing.assert_close(la.to_dense() - prior, 3 * H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ONLINE)
def test_online_fit_equals_one_fit_over_all_data(structure):
    """Two data sets fitted one after the other (override=False) give the posterior of one fit over
    their union at the same weights (Kronecker factors included: A is averaged over all rows)."""
    model = _model()
    a, b = _loader("classification", 1), _loader("classification", 2)
    both = list(a) + list(b)
    la = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.5)
    la.fit(a, progress=False).fit(b, progress=False, override=False)
    ref = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.5).fit(both, progress=False)
    assert la.n_data == ref.n_data == 20
    torch.testing.assert_close(la.to_dense(), ref.to_dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)


def test_online_fit_moves_the_mean_to_the_current_weights():
    model, loader = _model(), _loader("classification")
    la = Laplace(model, "classification", hessian_structure="kron").fit(loader, progress=False)
    with torch.no_grad():
        model[1].weight.add_(0.1)
    la.fit(loader, progress=False, override=False)
    torch.testing.assert_close(la.mean, _flat(model), rtol=0, atol=0)


def test_online_fit_refusals_leave_the_fit_unchanged():
    model, loader = _model(), _loader("classification")
    la = Laplace(model, "classification", hessian_structure="lowrank").fit(loader, progress=False)
    with pytest.raises(ValueError, match="override=False"):
        la.fit(loader, progress=False, override=False)
    la = Laplace(model, "classification", hessian_structure="kron").fit(loader, progress=False)
    before = la.to_dense()
    with pytest.raises(TypeError, match="override"):
        la.fit(loader, progress=False, override=None)
    bad = [(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 5, 1]))]  # a class the model lacks
    with pytest.raises(ValueError):
        la.fit(bad, progress=False, override=False)
    torch.testing.assert_close(la.to_dense(), before, rtol=0, atol=0)
    assert la.n_data == 10


# ---- log density -------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prob_is_the_gaussian_density(structure):
    model, loader = _model(), _loader("classification")
    la = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.24).fit(loader, progress=False)
    theta = torch.randn(4, _n_params(model), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = MultivariateNormal(la.mean, precision_matrix=la.to_dense())
    torch.testing.assert_close(la.log_prob(theta), ref.log_prob(theta), rtol=1e-10, atol=0)
    torch.testing.assert_close(la.log_prob(theta[0]), ref.log_prob(theta[0]), rtol=1e-10, atol=0)
    d = theta[1] - la.mean
    torch.testing.assert_close(la.log_prob(theta[1], normalized=False), -0.5 * d @ la.to_dense() @ d,
                               rtol=1e-10, atol=0)


def test_log_prob_last_layer_takes_both_layouts():
    model, loader = _model(), _loader("classification")
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full",
                 prior_precision=0.5).fit(loader, progress=False)
    theta = la.sample(3, generator=torch.Generator().manual_seed(0))
    covered = theta[:, la.positions]
    ref = MultivariateNormal(la.mean[la.positions], precision_matrix=la.to_dense())
    torch.testing.assert_close(la.log_prob(theta), ref.log_prob(covered), rtol=1e-10, atol=0)
    torch.testing.assert_close(la.log_prob(covered), ref.log_prob(covered), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="theta"):
        la.log_prob(covered[:, :-1])
    with pytest.raises(TypeError, match="theta"):
        la.log_prob(covered.tolist())


# ---- laplace-torch's argument names -------------------------------------------------------------------
def test_laplace_torch_argument_names():
    """sample(n_samples=...), log_prior_prec_min / _max, and a clear error for laplace-torch's
    positional pred_type in optimize_prior_precision."""
    model, loader = _model(), _loader("classification")
    la = Laplace(model, "classification", prior_precision=0.7).fit(loader, progress=False)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(la.sample(n_samples=3, generator=gen()), la.sample(3, generator=gen()), rtol=0, atol=0)
    with pytest.raises(TypeError, match="once"):
        la.sample(3, n_samples=3)
    with pytest.raises(TypeError, match="once"):
        la.sample()
    val = [loader.dataset.tensors]
    a = la.optimize_prior_precision("gridsearch", val_loader=val, grid_size=5, log_prior_prec_min=-1,
                                    log_prior_prec_max=1)
    b = la.optimize_prior_precision("gridsearch", val_loader=val, grid_size=5, log_prior_prec_range=(-1, 1))
    assert float(a) == float(b) and 0.1 <= float(a) <= 10
    with pytest.raises(ValueError, match="pred_type"):
        la.optimize_prior_precision("glm")
