"""Edges of the linearised-network GPs (FunctionalLaplace, ELLA) found by review: float32 models whose
posterior is much tighter than the prior, refused loads that must change nothing, tied weights,
checked evidence arguments, laplace-torch's positional order, empty inputs, joint draws."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyfastbayes.laplace import ELLA, FunctionalLaplace
from test_laplace_functional import DT, _problem


def _regression(dtype, N=600, sigma=0.05):
    torch.manual_seed(0)
    X = torch.rand(N, 1, dtype=dtype) * 6 - 3
    y = torch.sin(X) + sigma * torch.randn(N, 1, dtype=dtype)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    return model, DataLoader(TensorDataset(X, y), batch_size=200)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_float32_tight_posterior_matches_float64(subset):
    """N = 600 rows, sigma = 0.05, delta = 0.01: the posterior variance is ~1e-4 of the prior's. A
    float32 s k(x, x) - v^T v lost it (relative errors of order 1, or a failed Cholesky of B); the
    GP algebra runs in float64 from the float32 parts now: float32 and float64 models agree."""
    m32, l32 = _regression(torch.float32)
    m64 = copy.deepcopy(m32).double()
    l64 = DataLoader(TensorDataset(*(t.double() for t in l32.dataset.tensors)), batch_size=200)
    xt = torch.linspace(-3, 3, 9).unsqueeze(-1)
    opts = dict(subset_of_weights=subset, sigma_noise=0.05, prior_precision=0.01, batch_size=200)
    g32 = FunctionalLaplace(m32, "regression", 500, **opts).fit(l32, progress=False)
    g64 = FunctionalLaplace(m64, "regression", 500, **opts).fit(l64, progress=False)
    v32, v64 = g32(xt)[1], g64(xt.double())[1]
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=0)
    torch.testing.assert_close(g32.log_marginal_likelihood().double(), g64.log_marginal_likelihood(), rtol=1e-5,
                               atol=1e-3)
    assert bool(torch.isfinite(g32.sample(4)).all())


def test_refused_loads_change_nothing():
    model, loader, X = _problem("regression", C=2, train=True)
    gp = FunctionalLaplace(model, "regression", 20, prior_precision=0.4, batch_size=16).fit(loader, progress=False)
    state = gp.state_dict()
    target = FunctionalLaplace(model, "regression", 20, prior_precision=3.0, batch_size=16)
    bad = {"y": dict(state, y=state["y"][:, :1]), "subset": {k: v for k, v in state.items() if k != "subset"},
           "loss": dict(state, loss="x"), "subset dup": dict(state, subset=torch.zeros(20, dtype=torch.long))}
    for what, s in bad.items():
        with pytest.raises((ValueError, TypeError)):
            target.load_state_dict(s)
        assert float(target.prior_precision) == 3.0, what
        with pytest.raises(RuntimeError, match="call fit"):
            target(X[:2])
    fitted = FunctionalLaplace(model, "regression", 20, prior_precision=3.0, batch_size=16).fit(loader, progress=False)
    before = fitted.log_marginal_likelihood()
    with pytest.raises(ValueError, match=r"state_dict\['y'\] are not the subset's targets"):
        fitted.load_state_dict(bad["y"])
    torch.testing.assert_close(fitted.log_marginal_likelihood(), before, rtol=0, atol=0)
    target.load_state_dict(state)  # the good one still loads
    torch.testing.assert_close(target.log_marginal_likelihood(), gp.log_marginal_likelihood(), rtol=0, atol=0)


class _Tied(nn.Module):
    """A head whose weight is also read outside its call (tied weights)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.1 * h @ self.head.weight.t()


@pytest.mark.parametrize("cls", [FunctionalLaplace, ELLA])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_tied_weights_are_refused(cls, subset):
    torch.manual_seed(0)
    model = _Tied().double()
    X, y = torch.randn(40, 3, dtype=DT), torch.randint(0, 3, (40,))
    la = cls(model, "classification", 20, **({} if cls is FunctionalLaplace else dict(n_eigenvalues=10)),
             subset_of_weights=subset)
    with pytest.raises(ValueError, match="outside their own module's call"):
        la.fit([(X, y)], progress=False)


def test_evidence_arguments_are_checked():
    model, loader, X = _problem("classification")
    gp = FunctionalLaplace(model, "classification", 20, batch_size=16).fit(loader, progress=False)
    for bad in (-1.0, 0.0, float("nan"), torch.ones(2)):
        with pytest.raises(ValueError, match="prior_precision must be"):
            gp.log_marginal_likelihood(prior_precision=bad)
    with pytest.raises(ValueError, match="sigma_noise is the regression noise"):
        gp.log_marginal_likelihood(sigma_noise=2.0)
    model, loader, X = _problem("regression", C=2)
    reg = FunctionalLaplace(model, "regression", 60, batch_size=16).fit(loader, progress=False)
    at = FunctionalLaplace(model, "regression", 60, sigma_noise=0.5, batch_size=16).fit(loader, progress=False)
    torch.testing.assert_close(reg.log_marginal_likelihood(sigma_noise=0.5), at.log_marginal_likelihood(),
                               rtol=1e-12, atol=1e-12)  # (the log likelihood at the given noise too)


def test_positional_order_and_empty_rows():
    model, loader, X = _problem("regression", C=2)
    gp = FunctionalLaplace(model, "regression", 20, batch_size=16).fit(loader, progress=False)
    with pytest.raises(ValueError, match="link_approx must be one of"):
        gp(X[:3], "gp", True)  # laplace-torch's (x, pred_type, joint): pass joint= by keyword
    ella = ELLA(model, "regression", 20, 8, batch_size=16).fit(loader, progress=False)
    for la in (gp, ella):
        mu, var = la(X[:0])
        assert mu.shape == (0, 2) and var.shape == (0, 2, 2)
        mu, cov = la(X[:0], joint=True)
        assert mu.shape == (0,) and cov.shape == (0, 0)
        assert la.functional_samples(X[:0], "gp", n_samples=3).shape == (3, 0, 2)
        assert la.functional_samples(X[:0], "nn", n_samples=3).shape == (3, 0, 2)
        assert la.functional_samples(X[:0], n_samples=3, joint=True).shape == (3, 0, 2)


@pytest.mark.parametrize("cls", [FunctionalLaplace, ELLA])
def test_joint_draws_have_the_joint_covariance(cls):
    model, loader, X = _problem("regression", C=2, train=True)
    la = cls(model, "regression", 30, **({} if cls is FunctionalLaplace else dict(n_eigenvalues=12)),
             batch_size=16).fit(loader, progress=False)
    xt = X[:3]
    f = la.functional_samples(xt, n_samples=60_000, joint=True, generator=torch.Generator().manual_seed(0))
    mu, cov = la.functional_covariance(xt)
    assert f.shape == (60_000, 3, 2)
    flat = f.reshape(60_000, -1)
    scale = float(cov.diagonal().max())
    assert float((flat.mean(0) - mu).abs().max()) < 0.03 * scale ** 0.5
    assert float((torch.cov(flat.T) - cov).abs().max()) < 0.04 * scale
    d = la.functional_samples(xt, n_samples=60_000, joint=True, diagonal_output=True,
                              generator=torch.Generator().manual_seed(1)).reshape(60_000, -1)
    out = torch.arange(6) % 2
    assert float(torch.cov(d.T)[out[:, None] != out[None, :]].abs().max()) < 0.04 * scale


def test_functional_laplace_draws_from_the_served_rows_and_takes_laplace_torch_keywords():
    from torch.utils.data import SubsetRandomSampler

    torch.manual_seed(0)
    X, y = torch.randn(80, 3, dtype=DT), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    train = DataLoader(TensorDataset(X, y), batch_size=16, sampler=SubsetRandomSampler(list(range(40, 80))))
    gp = FunctionalLaplace(model, "classification", 30).fit(train, progress=False)
    assert gp.n_data == 40 and bool((gp.subset >= 40).all())
    same = FunctionalLaplace(model, "classification", 30).fit([(X[40:], y[40:])], progress=False)
    assert torch.equal(gp.subset - 40, same.subset)
    torch.testing.assert_close(gp.log_marginal_likelihood(), same.log_marginal_likelihood(), rtol=0, atol=0)
    again = FunctionalLaplace(model, "classification", 30)
    again.load_state_dict(gp.state_dict())  # (dataset indices past n_data load)
    gp.optimize_prior_precision(method="gridsearch", pred_type="gp", val_loader=[(X[:40], y[:40])],
                                log_prior_prec_min=-1, log_prior_prec_max=1, grid_size=3)
    assert min(abs(float(gp.prior_precision) - d) / d for d in (0.1, 1.0, 10.0)) < 1e-12
    with pytest.raises(ValueError, match="first positional argument is pred_type"):
        gp.optimize_prior_precision("gp")
    with pytest.raises(ValueError, match="one scalar prior precision"):
        gp.optimize_prior_precision("marglik", "layerwise")
