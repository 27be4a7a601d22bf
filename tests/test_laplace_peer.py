"""pyfastbayes.laplace against laplace-torch (installed from PyPI) on the same trained MLP and data:
log marginal likelihood for full, diag and kron (rel <= 1e-4) and the GLM probit predictive
(max abs <= 1e-5) at the same prior precision, laplace-torch's block convention (bias apart)."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import require
from pyfastbayes.laplace import Laplace

laplace = require("laplace", "laplace-torch is the reference Laplace library")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    N, D, C = 120, 6, 4
    X, y = torch.randn(N, D), torch.randint(0, C, (N,))
    model = nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, C))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model = model.double()
    loader = DataLoader(TensorDataset(X.double(), y), batch_size=40)
    return model, loader, torch.randn(30, D, dtype=torch.float64)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_marglik_and_probit_match_laplace_torch(trained, structure, subset):
    model, loader, xs = trained
    theirs = laplace.Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure,
                             prior_precision=0.7)
    theirs.fit(loader)
    ours = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure,
                   prior_precision=0.7, bias_block="separate").fit(loader, progress=False)
    a, b = float(theirs.log_marginal_likelihood()), float(ours.log_marginal_likelihood())
    assert abs(a - b) <= 1e-4 * abs(a)
    torch.testing.assert_close(ours.la(xs, link_approx="probit"), theirs(xs, link_approx="probit"), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.la(xs, link_approx="bridge"), theirs(xs, link_approx="bridge"), atol=1e-5, rtol=0)


class _Twice(nn.Module):
    """A hidden Linear applied twice (a two-step recurrent cell)."""

    def __init__(self, D=4, H=6, C=3):
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.cell(torch.tanh(self.cell(h)))))


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_module_called_twice_matches_laplace_torch_curvlinops(structure):
    """A module called twice per forward: 'full' and 'diag' against laplace-torch's curvlinops
    backend (autograd through every call; its ASDL backend gives another 'full' evidence and
    BackPACK refuses the model)."""
    from laplace.curvature import CurvlinopsGGN
    torch.manual_seed(0)
    model = _Twice().double()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    theirs = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                             prior_precision=0.7, backend=CurvlinopsGGN)
    theirs.fit(loader)
    ours = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.7,
                   bias_block="separate").fit(loader, progress=False)
    a, b = float(theirs.log_marginal_likelihood()), float(ours.log_marginal_likelihood())
    assert abs(a - b) <= 1e-6 * abs(a), (a, b)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_evidence_terms_and_marginal_variances_match_laplace_torch(trained, structure):
    """log_det_posterior_precision, log_det_ratio and scatter (laplace-torch's names), and the
    marginal posterior variances where laplace-torch has them (DiagLaplace.posterior_variance,
    FullLaplace.posterior_covariance's diagonal)."""
    model, loader, _ = trained
    theirs = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                             prior_precision=0.7, prior_mean=0.05)
    theirs.fit(loader)
    ours = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.7, prior_mean=0.05,
                   bias_block="separate").fit(loader, progress=False)
    for name in ("log_det_posterior_precision", "log_det_ratio", "scatter"):
        a, b = float(getattr(theirs, name)), float(getattr(ours, name))
        assert abs(a - b) <= 1e-6 * abs(a), (name, a, b)
    if structure == "diag":
        torch.testing.assert_close(ours.posterior_variance, theirs.posterior_variance, rtol=1e-6, atol=0)
    elif structure == "full":
        torch.testing.assert_close(ours.posterior_variance, theirs.posterior_covariance.diagonal(), rtol=1e-6, atol=0)
        # the two precisions differ by 3e-8 of their largest entry here (cond 260): the inverses by <= ~1e-5
        scale = float(theirs.posterior_covariance.abs().max())
        torch.testing.assert_close(ours.posterior_covariance, theirs.posterior_covariance, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_online_fit_and_log_prob_match_laplace_torch(trained, structure):
    """fit(..., override=False) over two halves of the data (laplace-torch's online fitting), then
    the evidence and log_prob of a few parameter vectors."""
    model, loader, _ = trained
    X, y = loader.dataset.tensors
    first = DataLoader(TensorDataset(X[:50], y[:50]), batch_size=50)  # laplace-torch reads loader.dataset
    second = DataLoader(TensorDataset(X[50:], y[50:]), batch_size=40)
    theirs = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                             prior_precision=0.7)
    theirs.fit(first)
    theirs.fit(second, override=False)
    ours = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.7, bias_block="separate")
    ours.fit(first, progress=False).fit(second, progress=False, override=False)
    assert ours.n_data == theirs.n_data == 120
    a, b = float(theirs.log_marginal_likelihood()), float(ours.log_marginal_likelihood())
    assert abs(a - b) <= 1e-8 * abs(a)
    theta = ours.mean + 0.1 * torch.randn(3, ours.mean.numel(), dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(1))
    want = torch.stack([theirs.log_prob(t) for t in theta])
    torch.testing.assert_close(ours.log_prob(theta), want, rtol=1e-6, atol=0)  # full: 2e-8 apart


def test_layerwise_marglik_matches(trained):
    model, loader, _ = trained
    prior = torch.tensor([0.5, 1.5, 2.0, 0.8], dtype=torch.float64)
    theirs = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                             prior_precision=prior)
    theirs.fit(loader)
    ours = Laplace(model, "classification", hessian_structure="kron", prior_precision=prior,
                   bias_block="separate").fit(loader, progress=False)
    a, b = float(theirs.log_marginal_likelihood()), float(ours.log_marginal_likelihood())
    assert abs(a - b) <= 1e-4 * abs(a)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_regression_empirical_fisher_against_gradients_and_laplace_torch(sigma):
    """Ours is sum_n g_n g_n^T of the Gaussian log likelihood's per-example gradients (an
    independent torch.func computation); laplace-torch 0.3's CurvlinopsEF is 2 sigma^2 times it
    (the squared gradients of its summed MSE, which has no 1/2, scaled by 1 / sigma^2 like the GGN):
    the convention difference the README states, measured."""
    from laplace.curvature import CurvlinopsEF
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    X, y = torch.randn(60, 4, dtype=torch.float64), torch.randn(60, 2, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    ours = Laplace(m, "regression", "all", "full", prior_precision=0.7, sigma_noise=sigma, bias_block="separate",
                   curvature="ef").fit(loader, progress=False)
    I = 0.7 * torch.eye(ours.n_params, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    ps = {n: p.detach() for n, p in m.named_parameters()}

    def nll(p, x, t):
        return 0.5 * ((functional_call(m, p, (x[None],))[0] - t) ** 2).sum() / sigma ** 2
    g = vmap(grad(nll), in_dims=(None, 0, 0))(ps, X, y)
    G = torch.cat([g[n].reshape(60, -1) for n in names], 1)
    torch.testing.assert_close(ours.to_dense() - I, G.T @ G, rtol=1e-10, atol=1e-10)
    peer = laplace.Laplace(m, "regression", subset_of_weights="all", hessian_structure="full", prior_precision=0.7,
                           sigma_noise=sigma, backend=CurvlinopsEF)
    peer.fit(loader)
    torch.testing.assert_close(peer.posterior_precision - I, 2 * sigma ** 2 * (G.T @ G), rtol=1e-5, atol=1e-6)
