"""hessian_structure='lowrank': with k = P eigenpairs it is the full Laplace (precision, evidence,
functional variance, draws); with k < P its evidence and variance follow the closed forms of
s U diag(lambda) U^T + delta I built here from the full curvature's own top-k eigenpairs."""
import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace


def _problem(likelihood):
    g = torch.Generator().manual_seed(0)
    N, D = 80, 5
    X = torch.randn(N, D, dtype=torch.float64, generator=g)
    C = {"classification": 3, "binary": 1, "regression": 2}[likelihood]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    if likelihood == "classification":
        y = torch.randint(0, C, (N,), generator=g)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (N,), generator=g).double()
    else:
        y = torch.randn(N, C, dtype=torch.float64, generator=g)
    return model, [(X[:40], y[:40]), (X[40:], y[40:])], torch.randn(7, D, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("likelihood", ["classification", "binary", "regression"])
def test_full_rank_equals_full(likelihood):
    model, loader, xs = _problem(likelihood)
    P = sum(p.numel() for p in model.parameters())
    kw = dict(prior_precision=0.5, sigma_noise=0.7 if likelihood == "regression" else 1.0)
    full = Laplace(model, likelihood, hessian_structure="full", **kw).fit(loader, progress=False)
    low = Laplace(model, likelihood, hessian_structure="lowrank", low_rank=P, **kw).fit(loader, progress=False)
    torch.testing.assert_close(low.to_dense(), full.to_dense(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(low.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(low.functional_variance(xs)[1], full.functional_variance(xs)[1], rtol=1e-8, atol=1e-12)


def test_truncated_rank_follows_the_closed_form():
    model, loader, xs = _problem("classification")
    full = Laplace(model, hessian_structure="full", prior_precision=0.5).fit(loader, progress=False)
    low = Laplace(model, hessian_structure="lowrank", low_rank=5, prior_precision=0.5).fit(loader, progress=False)
    H = full._fitted[0].H
    vals, vecs = torch.linalg.eigh(H)
    U, lam = vecs[:, -5:], vals[-5:]
    Pm = U @ torch.diag(lam) @ U.T + 0.5 * torch.eye(H.shape[0], dtype=H.dtype)
    torch.testing.assert_close(low.to_dense(), Pm, rtol=1e-6, atol=1e-6)  # Lanczos tolerance, fp64
    lml = low.log_likelihood() - 0.5 * (torch.logdet(Pm) - H.shape[0] * torch.log(torch.tensor(0.5, dtype=H.dtype))
                                        + 0.5 * low.mean.square().sum())
    torch.testing.assert_close(low.log_marginal_likelihood(), lml, rtol=1e-8, atol=0)
    J = torch.func.jacrev(lambda th: torch.func.functional_call(model, low.layout.unflatten(th), (xs,)))(low.mean)
    torch.testing.assert_close(low.functional_variance(xs)[1], J @ torch.linalg.inv(Pm) @ J.transpose(1, 2),
                               rtol=1e-6, atol=1e-8)


def test_lowrank_refuses_non_scalar_priors_and_iterators():
    model, loader, _ = _problem("classification")
    with pytest.raises(ValueError, match="scalar"):
        Laplace(model, hessian_structure="lowrank", prior_precision=torch.ones(2))
    la = Laplace(model, hessian_structure="lowrank", low_rank=3)
    with pytest.raises(TypeError, match="re-iterable"):
        la.fit(iter(loader), progress=False)
    la.fit(loader, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        la.optimize_prior_precision("marglik", "layerwise")


class _Squeezed(nn.Module):  # a one-output regression model returning [N]
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).squeeze(1)


# regression: the empirical Fisher came out exactly 2x (the GGN's N C / 2 rescaling of the mean
# squared error); a generator passed to fit with curvature='ef' raised "generator and mc_samples
# apply to kind='mc' only"; [N] targets of a one-output model (or [N] outputs) were refused
@pytest.mark.parametrize("curvature", ["ef", "ggn", "mc_fisher"])
@pytest.mark.parametrize("shape", ["2 outputs", "targets [N]", "outputs [N]"])
def test_regression_curvatures_and_target_shapes_equal_full(curvature, shape):
    model, loader, _ = _problem("regression")
    if shape != "2 outputs":
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        loader = [(x, y[:, 0] if shape == "targets [N]" else y[:, :1]) for x, y in loader]
        if shape == "outputs [N]":
            model = _Squeezed(model)
    P = sum(p.numel() for p in model.parameters())
    kw = dict(curvature=curvature, mc_samples=400 if curvature == "mc_fisher" else 1, prior_precision=1e-6)
    gen = torch.Generator().manual_seed(3)
    low = Laplace(model, "regression", hessian_structure="lowrank", low_rank=P, **kw).fit(loader, progress=False,
                                                                                         generator=gen)
    if curvature == "mc_fisher":  # its own draws of the targets: against the GGN it estimates, to MC error
        kw["curvature"], kw["mc_samples"] = "ggn", 1
    full = Laplace(model, "regression", hessian_structure="full", **kw).fit(loader, progress=False, generator=gen)
    if curvature == "mc_fisher":
        ratio = float(low.to_dense().trace() / full.to_dense().trace())
        assert abs(ratio - 1) < 0.1, ratio
        return
    torch.testing.assert_close(low.to_dense(), full.to_dense(), rtol=1e-9, atol=1e-9)
