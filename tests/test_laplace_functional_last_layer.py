"""FunctionalLaplace over the last layer (laplace-torch's FunctionalLLLaplace,
``Laplace(model, lik, 'last_layer', 'gp', n_subset=M)``), and the GP predictive's joint and
diagonal options. References: dense last-layer Jacobians (torch.func) and the weight-space
posterior they define; laplace-torch's own class is compared in test_laplace_functional.py
(test_against_laplace_torch) and test_laplace_port_functional.py."""
import pytest
import torch
from torch import nn

import _laplace_reference as ref
from pyfastbayes.laplace import FunctionalLaplace, Laplace
from test_laplace_functional import DT, _dense_precision, _problem


def _ll_jacobians(gp, model, X):
    """[N, C, P_c]: the Jacobians of the outputs with respect to the covered (last-layer) parameters."""
    return ref.jacobians(model, X)[:, :, gp.positions]


def _ll_precision(gp, model, X, lik, delta):
    """delta I + J_LL^T Lambda J_LL (Lambda's diagonal), the last layer's block of the dense one."""
    pos = gp.positions
    return _dense_precision(model, X, lik, delta)[pos][:, pos]


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_all_rows_is_the_last_layer_weight_space_posterior(lik):
    """M = N: f_var = J_LL P_LL^-1 J_LL^T, and the draws move the last layer alone, with covariance
    P_LL^-1 (within sampling error)."""
    model, loader, X = _problem(lik, C=3 if lik == "classification" else 2, train=True, deep=True)
    gp = FunctionalLaplace(model, lik, 60, subset_of_weights="last_layer", prior_precision=0.5,
                           batch_size=16).fit(loader, progress=False)
    P, n_last = ref.flat(model).numel(), 9 * (3 if lik == "classification" else 2)  # the head's (8 + 1) x C
    assert gp.positions.tolist() == list(range(P - n_last, P))
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    Jt = _ll_jacobians(gp, model, xt)
    Sigma = torch.linalg.inv(_ll_precision(gp, model, X, lik, 0.5))
    torch.testing.assert_close(gp.functional_variance(xt)[1], torch.einsum("ncp,pq,ndq->ncd", Jt, Sigma, Jt),
                               rtol=1e-9, atol=1e-12)
    draws = gp.sample(50_000, generator=torch.Generator().manual_seed(0))
    theta = ref.flat(model)
    others = torch.ones(theta.numel(), dtype=torch.bool)
    others[gp.positions] = False
    assert torch.equal(draws[:, others], theta[others].expand(50_000, -1))
    emp = torch.cov(draws[:, gp.positions].T)
    assert float((emp - Sigma).norm() / Sigma.norm()) < 0.04  # (27 parameters, 50k draws: ~1.5 % expected)
    if lik == "regression":  # the weight-space last-layer Laplace's evidence and predictive (at the MAP)
        full = Laplace(model, "regression", "last_layer", "full", prior_precision=0.5).fit(loader, progress=False)
        torch.testing.assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-9, atol=1e-8)


def test_factory_named_last_layer_and_prior_mean():
    model, loader, X = _problem("classification", deep=True)
    via = Laplace(model, "classification", "last_layer", "gp", n_subset=30, prior_precision=0.5, batch_size=16)
    assert isinstance(via, FunctionalLaplace) and via.subset_of_weights == "last_layer"
    with pytest.raises(RuntimeError, match="finds its layer in fit"):
        via.positions
    direct = FunctionalLaplace(model, "classification", 30, subset_of_weights="last_layer", prior_precision=0.5,
                               batch_size=16, last_layer_name="4")  # named: set up at construction
    assert direct.positions.numel() == 27
    torch.testing.assert_close(via.fit(loader, progress=False).log_marginal_likelihood(),
                               direct.fit(loader, progress=False).log_marginal_likelihood(), rtol=0, atol=0)
    # a named earlier layer: its 8 x 8 + 8 parameters, the Jacobians of that layer's
    mid = FunctionalLaplace(model, "classification", 60, subset_of_weights="last_layer", last_layer_name="2",
                            prior_precision=0.5, batch_size=16).fit(loader, progress=False)
    assert mid.positions.numel() == 72
    xt = X[:4]
    Jt = ref.jacobians(model, xt)[:, :, mid.positions]
    Sigma = torch.linalg.inv(_dense_precision(model, X, "classification", 0.5)[mid.positions][:, mid.positions])
    torch.testing.assert_close(mid.functional_variance(xt)[1], torch.einsum("ncp,pq,ndq->ncd", Jt, Sigma, Jt),
                               rtol=1e-9, atol=1e-12)
    # the prior mean is the covered parameters' [P_c] (checked at fit when the layer is found there)
    pm = torch.linspace(-0.2, 0.2, 27, dtype=DT)
    a = FunctionalLaplace(model, "classification", 30, subset_of_weights="last_layer", prior_mean=pm,
                          batch_size=16).fit(loader, progress=False)
    b = FunctionalLaplace(model, "classification", 30, subset_of_weights="last_layer", batch_size=16).fit(
        loader, progress=False)
    b.prior_mean = pm
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a.log_marginal_likelihood(), direct.log_marginal_likelihood())


def test_a_failed_fit_changes_nothing():
    model, loader, X = _problem("classification", deep=True)
    gp = FunctionalLaplace(model, "classification", 30, subset_of_weights="last_layer",
                           prior_mean=torch.zeros(ref.flat(model).numel(), dtype=DT))  # [P], not the layer's [27]
    with pytest.raises(ValueError, match=r"prior_mean must be .*\[P_c\] = \[27\]"):
        gp.fit(loader, progress=False)
    with pytest.raises(RuntimeError, match="finds its layer in fit"):
        gp.positions
    with pytest.raises(RuntimeError, match="call fit"):
        gp(X[:2])
    # a fitted one keeps its posterior when a refit fails
    ok = FunctionalLaplace(model, "classification", 30, subset_of_weights="last_layer").fit(loader, progress=False)
    before = ok.log_marginal_likelihood()
    with pytest.raises(ValueError, match="class indices"):
        ok.fit([(X, torch.rand(60, dtype=DT))], progress=False)
    torch.testing.assert_close(ok.log_marginal_likelihood(), before, rtol=0, atol=0)


def test_state_dict_round_trip_and_refusals():
    model, loader, X = _problem("regression", C=2, deep=True)
    gp = FunctionalLaplace(model, "regression", 30, subset_of_weights="last_layer", prior_precision=0.7,
                           sigma_noise=0.4, batch_size=16).fit(loader, progress=False)
    state = gp.state_dict()
    assert state["last_layer"] == "4" and state["prior_mean"].shape == (18,)
    again = FunctionalLaplace(model, "regression", 30, subset_of_weights="last_layer", batch_size=16)
    again.load_state_dict(state)
    torch.testing.assert_close(again.positions, gp.positions)
    torch.testing.assert_close(again.log_marginal_likelihood(), gp.log_marginal_likelihood(), rtol=0, atol=0)
    torch.testing.assert_close(again(X[:5]), gp(X[:5]), rtol=1e-12, atol=1e-14)
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    torch.testing.assert_close(again.sample(4, generator=g()), gp.sample(4, generator=g()), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="subset_of_weights"):
        FunctionalLaplace(model, "regression", 30, batch_size=16).load_state_dict(state)
    named = FunctionalLaplace(model, "regression", 30, subset_of_weights="last_layer", last_layer_name="2")
    with pytest.raises(ValueError, match="saved for the last layer '4'"):
        named.load_state_dict(state)
    assert named.positions.numel() == 72  # unchanged by the refused load
    fresh = FunctionalLaplace(model, "regression", 30, subset_of_weights="last_layer", batch_size=16)
    with pytest.raises(ValueError, match="is not a module of this model"):
        fresh.load_state_dict(dict(state, last_layer="9"))
    with pytest.raises(RuntimeError, match="finds its layer in fit"):
        fresh.positions  # a refused load leaves the layer unknown


def test_joint_and_diagonal_output():
    """joint=True: (f_mu [n C], f_cov [n C, n C]) = J* P^-1 J*^T over all rows (M = N), whose
    diagonal blocks are the marginal f_var; independent outputs zero the cross-output entries;
    diagonal_output: the outputs' variances."""
    model, loader, X = _problem("regression", C=2, train=True, deep=True)
    gp = FunctionalLaplace(model, "regression", 60, prior_precision=0.5, batch_size=16).fit(loader, progress=False)
    xt = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    mu, cov = gp(xt, joint=True)
    J = ref.jacobians(model, xt).reshape(10, -1)
    Sigma = torch.linalg.inv(_dense_precision(model, X, "regression", 0.5))
    torch.testing.assert_close(cov, J @ Sigma @ J.T, rtol=1e-9, atol=1e-12)
    f_mu, f_var = gp(xt)
    torch.testing.assert_close(mu, f_mu.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([cov[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(5)]), f_var)
    torch.testing.assert_close(gp(xt, diagonal_output=True)[1], torch.diagonal(f_var, dim1=1, dim2=2), rtol=0, atol=0)
    gp.independent_outputs = True
    _, cov_ind = gp(xt, joint=True)
    _, var_ind = gp(xt)
    same = torch.arange(10)[:, None] % 2 == torch.arange(10) % 2
    assert torch.equal(cov_ind[~same], torch.zeros_like(cov_ind[~same]))
    torch.testing.assert_close(torch.stack([cov_ind[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(5)]), var_ind)
    # classification: 'mc' draws with the outputs' variances only
    model, loader, X = _problem("classification")
    clf = FunctionalLaplace(model, "classification", 30, batch_size=16).fit(loader, progress=False)
    f_mu, f_var = clf.functional_variance(X[:3])
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    p = clf(X[:3], link_approx="mc", n_samples=7, diagonal_output=True, generator=g())
    z = torch.randn(7, 3, 3, dtype=DT, generator=g())
    want = (f_mu + z * torch.diagonal(f_var, dim1=1, dim2=2).sqrt()).softmax(-1).mean(0)
    torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="joint=True is the regression"):
        clf(X[:3], joint=True)
    with pytest.raises(TypeError, match="diagonal_output must be True or False"):
        clf(X[:3], diagonal_output=1)
    with pytest.raises(ValueError, match="diagonal_output is for the GP's draws"):
        clf.functional_samples(X[:3], "nn", diagonal_output=True)


def test_float32_evidence_when_the_kernel_is_rank_deficient():
    """M C past the last layer's rank (M = 150 rows > 8 features + 1): the float32 Gram matrix is
    indefinite at its rounding level and the Cholesky of s K + 1e-5 I fails (laplace-torch's
    FunctionalLLLaplace raises there: the digits MLP at M = 200 in bench_laplace). Ours forms K in
    float64: the evidence of the float32 model equals the dense float64 formula (R&W eq. 3.32 with
    Lambda's diagonal) at the same weights."""
    torch.manual_seed(0)
    X = torch.randn(200, 3) * 3
    y = torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    loader = [(X[:100], y[:100]), (X[100:], y[100:])]
    gp = FunctionalLaplace(model, "classification", 150, subset_of_weights="last_layer", prior_precision=0.3)
    lml = gp.fit(loader, progress=False).log_marginal_likelihood()
    assert lml.dtype == torch.float32
    s, n = (150 / 200) / 0.3, 450
    # the float32 Gram matrix of the last layer's Jacobians (e_c (x) [features, 1]): not positive definite
    with torch.no_grad():
        phi = torch.cat([model[1](model[0](X[gp.subset])), torch.ones(150, 1)], 1)
    K32 = torch.kron(phi @ phi.T, torch.eye(3))
    assert int(torch.linalg.cholesky_ex(s * K32 + 1e-5 * torch.eye(n))[1]) != 0
    # the dense float64 reference on the subset rows
    m64 = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    Xs, ys = X[gp.subset].double(), y[gp.subset]
    J = ref.jacobians(m64, Xs)[:, :, gp.positions.cpu()].reshape(n, -1)
    f = ref.outputs(m64, Xs)
    p = f.softmax(-1)
    w = (p * (1 - p)).reshape(-1).sqrt()
    Kd = J @ J.T
    mu = (J @ ref.flat(m64)[gp.positions.cpu()]).reshape(-1)
    I = torch.eye(n, dtype=DT)
    logdet = torch.logdet(w[:, None] * (s * Kd) * w + I)
    scatter = mu @ torch.linalg.solve(s * Kd + 1e-5 * I, mu)
    loglik = -torch.nn.functional.cross_entropy(f, ys, reduction="sum")
    torch.testing.assert_close(lml.double(), loglik - 0.5 * (logdet + scatter), rtol=1e-5, atol=1e-3)
