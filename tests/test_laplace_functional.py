"""FunctionalLaplace (the GP view on a subset of the data, laplace-torch's hessian_structure='gp').

References: dense matrices written here and the weight-space full Laplace (pyfastbayes.laplace.Laplace):
with M = N the GP predictive variance is J* P^-1 J*^T, and at a MAP the GP evidence of regression is
the weight-space Laplace evidence; the draws' moments. laplace-torch 0.3's FunctionalLaplace on the
same model, data and subset, where its definitions are ours: classification's evidence and probit
probabilities, regression's predictive moments (on a one-hidden-layer network: see
test_laplace_torch_mixes_output_indices_on_deeper_networks), and its regression evidence, which adds
its log-likelihood term once more (tested as that gap).
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _laplace_reference as ref
from _helpers import require
from pyfastbayes.laplace import FunctionalLaplace, Laplace
from pyfastbayes.laplace import functional as fl_mod

DT = torch.float64


def _problem(lik, N=60, D=3, C=3, seed=0, train=False, delta=0.5, sigma=1.0, deep=False):
    torch.manual_seed(seed)
    X = torch.randn(N, D, dtype=DT)
    y = torch.randint(0, C, (N,)) if lik == "classification" else torch.sin(X[:, :C]) + 0.3 * torch.randn(N, C, dtype=DT)
    hidden = [nn.Linear(D, 8), nn.Tanh()] + ([nn.Linear(8, 8), nn.Tanh()] if deep else [])
    model = nn.Sequential(*hidden, nn.Linear(8, C)).to(DT)
    if train:  # to the MAP of the loss + delta |theta|^2 / 2 (tightly: the evidence identity needs it)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            out = model(X)
            data = nn.functional.cross_entropy(out, y, reduction="sum") if lik == "classification" else \
                0.5 * (out - y).square().sum() / sigma ** 2
            loss = data + 0.5 * delta * sum(p.square().sum() for p in model.parameters())
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
    return model, DataLoader(TensorDataset(X, y), batch_size=16), X


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_against_laplace_torch(lik, independent, subset):
    """laplace-torch's FunctionalLaplace and (subset 'last_layer') FunctionalLLLaplace."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    from laplace.curvature import BackPackGGN

    C = 3 if lik == "classification" else 2
    model, loader, _ = _problem(lik, C=C)
    theirs = laplace.Laplace(model, lik, subset_of_weights=subset, hessian_structure="gp", n_subset=25,
                             prior_precision=0.5, independent_outputs=independent, backend=BackPackGGN)
    theirs.fit(loader)
    ours = FunctionalLaplace(model, lik, 25, subset_of_weights=subset, prior_precision=0.5,
                             independent_outputs=independent, batch_size=16).fit(loader, progress=False)
    assert torch.equal(ours.subset, theirs.train_loader.sampler.indices)
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    if lik == "classification":
        torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().reshape(()),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours(xt), theirs(xt, pred_type="gp", link_approx="probit"), rtol=1e-10, atol=1e-12)
        return
    (m1, v1), (m2, v2) = ours(xt), theirs(xt, pred_type="gp")
    torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    # laplace-torch's regression evidence is the GP evidence plus its log-likelihood term (the data
    # counted twice) without the GP's normaliser -M C log(2 pi) / 2
    torch.testing.assert_close(theirs.log_marginal_likelihood().reshape(()),
                               ours.log_marginal_likelihood() + theirs.log_likelihood.reshape(())
                               + 0.5 * 25 * 2 * math.log(2 * math.pi), rtol=1e-10, atol=1e-9)


def _dense_precision(model, X, lik, delta, sigma=1.0, T=1.0):
    """delta I + J^T diag(lambda / (sigma^2 T)) J [P, P] over all rows (the loss Hessians' diagonal)."""
    J = ref.jacobians(model, X)  # [N, C, P]
    f = ref.outputs(model, X)
    lam = torch.ones_like(f) if lik == "regression" else f.softmax(-1) * (1 - f.softmax(-1))
    P = J.shape[-1]
    return delta * torch.eye(P, dtype=DT) + torch.einsum("ncp,nc,ncq->pq", J, lam / (sigma ** 2 * T), J)


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_all_rows_is_the_weight_space_posterior(lik):
    """With M = N: f_var(x) = J(x) P^-1 J(x)^T for the dense P = delta I + J^T Lambda J (Lambda's
    diagonal), and for regression the evidence at a MAP is the weight-space full Laplace's."""
    model, loader, X = _problem(lik, C=3 if lik == "classification" else 2, train=True, sigma=0.7, deep=True)
    sigma = 0.7 if lik == "regression" else 1.0
    gp = FunctionalLaplace(model, lik, 60, prior_precision=0.5, sigma_noise=sigma, batch_size=16).fit(
        loader, progress=False)
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    Jt = ref.jacobians(model, xt)
    Sigma = torch.linalg.inv(_dense_precision(model, X, lik, 0.5, sigma))
    f_mu, f_var = gp.functional_variance(xt)
    torch.testing.assert_close(f_var, torch.einsum("ncp,pq,ndq->ncd", Jt, Sigma, Jt), rtol=1e-9, atol=1e-12)
    if lik == "regression":
        full = Laplace(model, "regression", "all", "full", prior_precision=0.5, sigma_noise=0.7).fit(loader,
                                                                                                  progress=False)
        torch.testing.assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(f_var, full(xt)[1], rtol=1e-9, atol=1e-12)


def test_laplace_torch_mixes_output_indices_on_deeper_networks():
    """laplace-torch's joint-kernel predictive reshapes K_{*M} [N*, M, C*, C] to [N*, M C*, C]: the
    test output index takes the place of the training one. The C x C blocks of a one-hidden-layer
    network's kernel are symmetric, which hides it; with two hidden layers they are not, and its
    f_var leaves the dense J* P^-1 J*^T (M = N) that ours equals. With independent_outputs
    (diagonal blocks only) the two agree."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    from laplace.curvature import BackPackGGN

    model, loader, X = _problem("classification", deep=True)
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    Jt = ref.jacobians(model, xt)
    want = torch.einsum("ncp,pq,ndq->ncd", Jt, torch.linalg.inv(_dense_precision(model, X, "classification", 0.5)), Jt)
    ours = FunctionalLaplace(model, "classification", 60, prior_precision=0.5, batch_size=16).fit(loader,
                                                                                                 progress=False)
    theirs = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="gp", n_subset=60,
                             prior_precision=0.5, backend=BackPackGGN)
    theirs.fit(loader)
    torch.testing.assert_close(ours.functional_variance(xt)[1], want, rtol=1e-9, atol=1e-12)
    their_var = theirs.predictive_moments(xt)[1]
    assert float((their_var - want).abs().max()) > 1e-3 * float(want.abs().max())
    ind = FunctionalLaplace(model, "classification", 60, prior_precision=0.5, independent_outputs=True,
                            batch_size=16).fit(loader, progress=False)
    their_ind = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="gp",
                                n_subset=60, prior_precision=0.5, independent_outputs=True, backend=BackPackGGN)
    their_ind.fit(loader)
    torch.testing.assert_close(ind.functional_variance(xt)[1], their_ind.predictive_moments(xt)[1], rtol=1e-10,
                               atol=1e-12)


def test_a_saturated_softmax_is_a_point_without_information():
    """Rows whose softmax saturates exactly (p = 1 in float64: W = 0) add nothing: the predictive
    is the dense J* (delta I + J^T W J)^-1 J*^T (M = N), which laplace-torch's 1 / 0 -> 10 rule is not."""
    model, loader, X = _problem("classification")
    with torch.no_grad():
        model[-1].weight.mul_(400)  # logit gaps of hundreds: p(1 - p) = 0 for most rows
    f = model(X)
    assert bool(((f.softmax(-1) * (1 - f.softmax(-1))) == 0).any())
    gp = FunctionalLaplace(model, "classification", 60, prior_precision=0.5, batch_size=16).fit(loader, progress=False)
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    Jt = ref.jacobians(model, xt)
    want = torch.einsum("ncp,pq,ndq->ncd", Jt, torch.linalg.inv(_dense_precision(model, X, "classification", 0.5)), Jt)
    torch.testing.assert_close(gp.functional_variance(xt)[1], want, rtol=1e-8, atol=1e-10)
    assert math.isfinite(float(gp.log_marginal_likelihood()))
    assert bool(torch.isfinite(gp.sample(3)).all())


def test_draws_have_the_weight_space_moments():
    """sample(n): mean theta*, covariance (delta N / M I + J_M^T D^-1 J_M)^-1 (dense reference over
    the subset rows), within sampling error."""
    model, loader, X = _problem("classification", N=40)
    gp = FunctionalLaplace(model, "classification", 30, prior_precision=2.0, batch_size=16).fit(loader, progress=False)
    draws = gp.sample(100_000, generator=torch.Generator().manual_seed(0))  # (P = 59: the covariance to ~2.5 %)
    theta = ref.flat(model)
    prec = _dense_precision(model, X[gp.subset], "classification", 2.0 * 40 / 30)
    cov = torch.linalg.inv(prec)
    emp = torch.cov(draws.T)
    assert float((draws.mean(0) - theta).abs().max() / cov.diagonal().sqrt().max()) < 0.05
    assert float((emp - cov).norm() / cov.norm()) < 0.04


def test_recomputed_jacobians_give_the_same_posterior(monkeypatch):
    """Past JACOBIAN_BYTES the subset's Jacobian parts are recomputed chunk by chunk: the same numbers."""
    model, loader, _ = _problem("classification")
    kept = FunctionalLaplace(model, "classification", 40, batch_size=16).fit(loader, progress=False)
    monkeypatch.setattr(fl_mod, "JACOBIAN_BYTES", 0)
    again = FunctionalLaplace(model, "classification", 40, batch_size=16).fit(loader, progress=False)
    assert kept._fitted["parts"] is not None and again._fitted["parts"] is None
    xt = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(again._fitted["K"], kept._fitted["K"], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(again.log_marginal_likelihood(), kept.log_marginal_likelihood())
    torch.testing.assert_close(again.functional_variance(xt), kept.functional_variance(xt))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    torch.testing.assert_close(again.sample(3, generator=g()), kept.sample(3, generator=g()))


def test_tuning_and_state_dict():
    model, loader, X = _problem("classification")
    gp = FunctionalLaplace(model, "classification", 30, batch_size=16).fit(loader, progress=False)
    before = float(gp.log_marginal_likelihood())
    gp.optimize_prior_precision("marglik", n_steps=200, lr=0.1)
    assert float(gp.log_marginal_likelihood()) > before
    # gridsearch: the prior of the lowest validation NLL among the grid's
    g = torch.Generator().manual_seed(3)
    Xv, yv = torch.randn(30, 3, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    grid = torch.logspace(-2, 2, 5, dtype=DT)
    nll = []
    for d in grid:
        gp.prior_precision = float(d)
        p = gp(Xv)
        nll.append(float(-torch.log(p[torch.arange(30), yv]).mean()))
    gp.optimize_prior_precision("gridsearch", val_loader=[(Xv, yv)], log_prior_prec_range=(-2, 2), grid_size=5)
    assert math.isclose(float(gp.prior_precision), float(grid[min(range(5), key=nll.__getitem__)]), rel_tol=1e-12)
    again = FunctionalLaplace(model, "classification", 30, batch_size=16)
    again.load_state_dict(gp.state_dict())
    torch.testing.assert_close(again.log_marginal_likelihood(), gp.log_marginal_likelihood())
    torch.testing.assert_close(again(Xv), gp(Xv))


def test_bad_input():
    model, loader, X = _problem("classification")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        FunctionalLaplace(model, "binary", 10)
    with pytest.raises(ValueError, match="scalar prior_precision"):
        FunctionalLaplace(model, "classification", 10, prior_precision=torch.ones(3))
    with pytest.raises(ValueError, match="n_subset = 100 is larger than the 60 training rows"):
        FunctionalLaplace(model, "classification", 100).fit(loader, progress=False)
    with pytest.raises(RuntimeError, match="call fit"):
        FunctionalLaplace(model, "classification", 10)(X[:2])
    with pytest.raises(ValueError, match="sigma_noise is the regression noise"):
        FunctionalLaplace(model, "classification", 10, sigma_noise=2.0)
    with pytest.raises(ValueError, match="needs n_subset=M"):
        Laplace(model, "classification", "all", "gp")
    with pytest.raises(ValueError, match="subset_of_weights must be one of"):
        Laplace(model, "classification", "subnetwork", "gp", n_subset=10)
    with pytest.raises(ValueError, match=r"pred_type must be one of \('gp', 'glm'\).*predict\(x\)"):
        FunctionalLaplace(model, "classification", 10)(X[:2], pred_type="nn")
    # laplace-torch's factory call builds the functional Laplace
    via = Laplace(model, "classification", "all", "gp", n_subset=20, prior_precision=0.5, batch_size=16)
    assert isinstance(via, FunctionalLaplace)
    direct = FunctionalLaplace(model, "classification", 20, prior_precision=0.5, batch_size=16)
    torch.testing.assert_close(via.fit(loader, progress=False).log_marginal_likelihood(),
                               direct.fit(loader, progress=False).log_marginal_likelihood())
    with pytest.raises(ValueError, match="class indices"):
        FunctionalLaplace(model, "classification", 10).fit([(X, torch.rand(60, dtype=DT))], progress=False)


def test_convolution_and_layernorm_parts_against_dense_jacobians():
    """A CNN with a LayerNorm (Jacobian parts 'matrix' for the convolution, 'rows' for the norm's
    affine parameters, 'factored' for the head) on a subset of 20 of 30 rows: the kernel, the
    evidence (prior_mean != 0) and the predictive against the same formulas on dense torch.func
    Jacobians."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.LayerNorm(3 * 4 * 4),
                          nn.Linear(3 * 4 * 4, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    gp = FunctionalLaplace(model, "classification", 20, prior_precision=0.8, prior_mean=0.1, batch_size=7).fit(
        [(X[:16], y[:16]), (X[16:], y[16:])], progress=False)
    idx = gp.subset
    J = ref.jacobians(model, X[idx])  # [M, C, P]
    Jf = J.reshape(-1, J.shape[-1])
    s = (20 / 30) / 0.8
    K = Jf @ Jf.T
    torch.testing.assert_close(gp._fitted["K"], K, rtol=1e-11, atol=1e-12)
    f = ref.outputs(model, X[idx])
    p = f.softmax(-1)
    W = (p * (1 - p)).reshape(-1)
    mu = Jf @ (ref.flat(model) - 0.1)
    I = torch.eye(len(K), dtype=DT)
    want = -nn.functional.cross_entropy(f, y[idx], reduction="sum") - 0.5 * (
        torch.logdet(W.sqrt()[:, None] * s * K * W.sqrt() + I) + mu @ torch.linalg.solve(s * K + 1e-5 * I, mu))
    torch.testing.assert_close(gp.log_marginal_likelihood(), want, rtol=1e-10, atol=1e-10)
    xt = torch.randn(4, 1, 4, 4, generator=g, dtype=DT)
    Jt = ref.jacobians(model, xt).reshape(-1, J.shape[-1])
    Kxs = s * Jt @ Jf.T
    var = s * Jt @ Jt.T - Kxs @ torch.linalg.solve(s * K + torch.diag(1 / W), Kxs.T)
    got = gp.functional_variance(xt)[1]
    for n in range(4):
        torch.testing.assert_close(got[n], var[3 * n:3 * n + 3, 3 * n:3 * n + 3], rtol=1e-9, atol=1e-12)


def test_review_edges():
    """A shuffling DataLoader draws the same dataset rows as an unshuffled one; targets of another
    row count are refused; predict() applies output_fn; sample(0) is [0, P]; a state fitted with
    other buffers (BatchNorm statistics) is refused, and a refused load changes nothing."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 3, dtype=DT), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    plain = FunctionalLaplace(model, "classification", 15, batch_size=8).fit(
        DataLoader(TensorDataset(X, y), batch_size=8), progress=False)
    shuffled = FunctionalLaplace(model, "classification", 15, batch_size=8).fit(
        DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True), progress=False)
    torch.testing.assert_close(shuffled.log_marginal_likelihood(), plain.log_marginal_likelihood())
    assert torch.equal(shuffled._fitted["X"], X[plain.subset])
    with pytest.raises(ValueError, match=r"batch 1 has \(7,\) targets for inputs \(8, 3\)"):
        FunctionalLaplace(model, "classification", 5).fit([(X[:8], y[:8]), (X[8:16], y[8:15])], progress=False)
    assert plain.sample(0).shape == (0, plain.numel)

    class Pair(nn.Module):  # returns (logits, extra): output_fn picks the logits
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x), x.sum()

    wrapped = FunctionalLaplace(Pair(), "classification", 15, batch_size=8, output_fn=lambda o: o[0]).fit(
        DataLoader(TensorDataset(X, y), batch_size=8), progress=False)
    torch.testing.assert_close(wrapped.log_marginal_likelihood(), plain.log_marginal_likelihood())
    assert wrapped.predict(X[:4], 5, generator=torch.Generator().manual_seed(0)).shape == (4, 3)
    state = plain.state_dict()
    with torch.no_grad():
        model[1].running_mean += 3.0
    other = FunctionalLaplace(model, "classification", 15, batch_size=8, prior_precision=7.0)
    with pytest.raises(ValueError, match="outputs on the subset differ"):
        other.load_state_dict(state)
    assert float(other.prior_precision) == 7.0 and other._fitted is None


def test_regression_evidence_with_temperature_is_the_weight_space_one():
    """At T = 2 (noise sigma^2 T, its normaliser untempered) and M = N at a MAP of the tempered
    loss: the GP evidence is the weight-space full Laplace's."""
    torch.manual_seed(0)
    N, D, C, T, sigma, delta = 40, 3, 2, 2.0, 0.7, 0.5
    X = torch.randn(N, D, dtype=DT)
    y = torch.sin(X[:, :C]) + 0.3 * torch.randn(N, C, dtype=DT)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).to(DT)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(X) - y).square().sum() / (sigma ** 2 * T) + 0.5 * delta * sum(
            p.square().sum() for p in model.parameters())
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    kw = dict(prior_precision=delta, sigma_noise=sigma, temperature=T)
    gp = FunctionalLaplace(model, "regression", N, batch_size=16, **kw).fit(loader, progress=False)
    full = Laplace(model, "regression", "all", "full", **kw).fit(loader, progress=False)
    torch.testing.assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-9, atol=1e-8)


def test_prior_mean_assigned_after_fit():
    """Assigning prior_mean after fit moves the evidence to a fresh fit's with that mean (the
    scatter's offset J_M (theta* - theta_0) recomputed); a float is taken as every weight's mean."""
    model, loader, _ = _problem("classification")
    gp = FunctionalLaplace(model, "classification", 25, batch_size=16).fit(loader, progress=False)
    gp.prior_mean = 0.3
    fresh = FunctionalLaplace(model, "classification", 25, batch_size=16, prior_mean=0.3).fit(loader, progress=False)
    torch.testing.assert_close(gp.log_marginal_likelihood(), fresh.log_marginal_likelihood(), rtol=1e-12, atol=1e-12)
    assert gp.state_dict()["prior_mean"].shape == (gp.numel,)
    with pytest.raises(ValueError, match="prior_mean must be a finite scalar"):
        gp.prior_mean = torch.ones(3)


def test_functional_and_predictive_samples():
    """functional_samples: draws of N(f_mu, f_var) per row (mean and covariance within sampling
    error, the generator's state reproduces them); predictive_samples: their softmax."""
    model, loader, X = _problem("classification")
    gp = FunctionalLaplace(model, "classification", 30, prior_precision=0.5, batch_size=16).fit(loader, progress=False)
    xt = X[:3]
    f = gp.functional_samples(xt, n_samples=40000, generator=torch.Generator().manual_seed(0))
    mu, var = gp.functional_variance(xt)
    assert f.shape == (40000, 3, 3)
    scale = float(torch.diagonal(var, dim1=1, dim2=2).max().sqrt())
    assert float((f.mean(0) - mu).abs().max()) < 0.03 * scale
    for n in range(3):
        assert float((torch.cov(f[:, n].T) - var[n]).abs().max()) < 0.05 * scale ** 2
    p = gp.predictive_samples(xt, n_samples=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p, gp.functional_samples(xt, n_samples=5, generator=torch.Generator().manual_seed(1)).softmax(-1))
