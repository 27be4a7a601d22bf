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
