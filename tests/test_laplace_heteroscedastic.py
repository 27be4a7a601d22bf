"""Heteroscedastic regression in natural parameters (pyfastbayes.nn.gaussian, the curvature
operators' NaturalGaussianNLLLoss, Laplace(likelihood='heteroscedastic_regression')).

References, none of them pyfastbayes code: the Gaussian NLL written with torch.distributions.Normal
(mean -eta1 / (2 eta2), variance -1 / (2 eta2)); its Hessian in the outputs by
torch.autograd.functional.hessian; per-example Jacobians by torch.func (tests/_laplace_reference.py);
the KFAC factors from hooks and one backward per output column; the Laplace evidence and the
linearised predictive written from their definitions with dense matrices.
"""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import _laplace_reference as ref
from pyfastbayes.curvature import fisher, ggn
from pyfastbayes.laplace import Laplace, marglik_training
from pyfastbayes.nn import NaturalGaussianNLLLoss, NaturalHead, mean_var_to_natural, natural_to_mean_var

DT = torch.float64
LIK = "heteroscedastic_regression"


def _normal_nll(eta, y):
    """[N, D] NLL of y [N, D] under natural parameters eta [N, 2D], by torch.distributions."""
    D = eta.shape[1] // 2
    eta1, eta2 = eta[:, :D], eta[:, D:]
    return -torch.distributions.Normal(-eta1 / (2 * eta2), (-0.5 / eta2).sqrt()).log_prob(y)


def _output_hessians(f, y):
    """[N, C, C]: the autograd Hessian of each row's summed NLL in its outputs."""
    return torch.stack([torch.autograd.functional.hessian(lambda o, t=t: _normal_nll(o[None], t[None]).sum(), r)
                        for r, t in zip(f, y)])


def _model(D=1, seed=0, width=5, link="exp"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2 * D),
                         NaturalHead(link)).to(DT)


def _data(N=20, D=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    y = torch.sin(X[:, :D] * 2) + (0.1 + X[:, :D].abs()) * torch.randn(N, D, generator=g, dtype=DT)
    return X, y


def _loader(X, y, bs=7):
    return [(X[i:i + bs], y[i:i + bs]) for i in range(0, len(X), bs)]


def _exact_ggn(model, loader):
    P = ref.flat(model).numel()
    H = torch.zeros(P, P, dtype=DT)
    for x, y in loader:
        J = ref.jacobians(model, x)
        Hout = _output_hessians(ref.outputs(model, x), y.reshape(len(x), -1))
        H += torch.einsum("ncp,ncd,ndq->pq", J, Hout, J)
    return H


def _fit(model, loader, structure="full", subset="all", **kw):
    return Laplace(model, LIK, subset, structure, **kw).fit(loader, progress=False)


# ---- the head, the loss and the parameterisations ----------------------------------------------------
def test_loss_head_and_parameterisations():
    g = torch.Generator().manual_seed(0)
    mu, var = torch.randn(6, 2, generator=g, dtype=DT), torch.rand(6, 2, generator=g, dtype=DT) + 0.1
    eta = mean_var_to_natural(mu, var)
    m2, v2 = natural_to_mean_var(eta)
    torch.testing.assert_close(m2, mu, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v2, var, rtol=1e-14, atol=1e-14)
    y = torch.randn(6, 2, generator=g, dtype=DT)
    want = -torch.distributions.Normal(mu, var.sqrt()).log_prob(y)
    torch.testing.assert_close(NaturalGaussianNLLLoss("none")(eta, y), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(NaturalGaussianNLLLoss()(eta, y), want.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(NaturalGaussianNLLLoss("sum")(eta[:, [0, 2]], y[:, 0]), want[:, 0].sum())  # D = 1: y [N]
    raw = torch.randn(4, 4, generator=g, dtype=DT)
    for link, prec in (("exp", raw[:, 2:].exp()), ("softplus", nn.functional.softplus(raw[:, 2:]))):
        out = NaturalHead(link)(raw)
        torch.testing.assert_close(out, torch.cat([raw[:, :2], -0.5 * prec], 1))
        assert (out[:, 2:] < 0).all()


def test_loss_and_head_refuse_bad_input():
    loss = NaturalGaussianNLLLoss()
    eta = torch.tensor([[0.5, -1.0], [0.1, -0.2]], dtype=DT)
    with pytest.raises(ValueError, match=r"eta2 = -1 / \(2 sigma\^2\), must be < 0 .*NaturalHead"):
        loss(torch.tensor([[0.5, 1.0]], dtype=DT), torch.zeros(1, dtype=DT))
    with pytest.raises(ValueError, match=r"must be \[N, 2D\]"):
        loss(torch.zeros(2, 3, dtype=DT) - 1, torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match=r"targets must be \[N, D\] = \(2, 1\)"):
        loss(eta, torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="NaN or infinity"):
        loss(eta, torch.tensor([0.0, math.inf], dtype=DT))
    with pytest.raises(ValueError, match="reduction must be"):
        NaturalGaussianNLLLoss("avg")
    with pytest.raises(ValueError, match="link must be one of"):
        NaturalHead("relu")
    with pytest.raises(ValueError, match="even number of outputs"):
        NaturalHead()(torch.zeros(2, 3))


# ---- curvature operators -------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 2])
def test_ggn_and_empirical_fisher_operators(D):
    """ggn(model, NaturalGaussianNLLLoss(), data) = (1 / (N D)) sum_n J^T H_n J (H_n by autograd);
    the empirical Fisher = (1 / (N D)) sum_n grad l_n grad l_n^T; the MC Fisher's mean over many
    draws approaches the GGN."""
    model = _model(D)
    X, y = _data(12, D)
    loader = _loader(X, y, 5)
    want = _exact_ggn(model, loader) / (12 * D)
    got = ggn(model, NaturalGaussianNLLLoss(), loader).to_dense()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    J = ref.jacobians(model, X)
    f = ref.outputs(model, X)
    gr = torch.func.vmap(torch.func.grad(lambda o, t: _normal_nll(o[None], t[None]).sum()))(f, y)
    ef = torch.einsum("ncp,nc,nd,ndq->pq", J, gr, gr, J) / (12 * D)
    torch.testing.assert_close(fisher(model, NaturalGaussianNLLLoss(), loader, kind="empirical").to_dense(), ef,
                               rtol=1e-10, atol=1e-12)
    mc = fisher(model, NaturalGaussianNLLLoss(), loader, kind="mc", mc_samples=4000,
                generator=torch.Generator().manual_seed(0)).to_dense()
    assert float((mc - want).norm() / want.norm()) < 0.06


# ---- Laplace: curvature, evidence ----------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 2])
def test_full_and_diag_precision_are_the_exact_ggn(D):
    model = _model(D)
    X, y = _data(20, D)
    loader = _loader(X, y)
    H = _exact_ggn(model, loader)
    P = H.shape[0]
    full = _fit(model, loader, "full", prior_precision=0.5)
    torch.testing.assert_close(full.to_dense(), H + 0.5 * torch.eye(P, dtype=DT), rtol=1e-10, atol=1e-12)
    diag = _fit(model, loader, "diag", prior_precision=0.5)
    torch.testing.assert_close(diag.to_dense(), torch.diag(torch.diagonal(H) + 0.5), rtol=1e-10, atol=1e-12)
    low = _fit(model, loader, "lowrank", low_rank=P, prior_precision=0.5)
    torch.testing.assert_close(low.to_dense(), H + 0.5 * torch.eye(P, dtype=DT), rtol=1e-7, atol=1e-9)


def test_kron_factors_are_the_kfac_formula():
    """G = sum_n J_n^T H_n J_n over each layer's outputs, A = mean of [a, 1][a, 1]^T (joint bias)."""
    model = _model(2)
    X, y = _data(20, 2)
    loader = _loader(X, y)
    la = _fit(model, loader, "kron")
    mods = [m for m in model if isinstance(m, nn.Linear)]
    Gs = [0] * 3
    As = [0] * 3
    for x, t in loader:
        f, parts = ref.output_jacobians(model, x, mods)
        Hout = _output_hessians(f, t)
        for k, (a, Jo) in enumerate(parts):
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], -1)
            Gs[k] = Gs[k] + torch.einsum("ncto,ncd,ndtp->op", Jo, Hout, Jo)
            As[k] = As[k] + torch.einsum("nti,ntj->ij", a, a)
    for (name, L, R, s, d), G, A in zip(la.posterior_precision, Gs, As):
        torch.testing.assert_close(L, G, rtol=1e-10, atol=1e-12, msg=f"G of {name}")
        torch.testing.assert_close(R, A / 20, rtol=1e-10, atol=1e-12, msg=f"A of {name}")


def test_evidence_is_the_laplace_formula():
    """log Z = sum_n log N(y_n; mu_n, s2_n) - (log det P - P log delta) / 2 - delta |theta|^2 / 2,
    with P = GGN + delta I (dense), the log-likelihood by torch.distributions."""
    model = _model(1)
    X, y = _data(20, 1)
    loader = _loader(X, y)
    delta = 0.7
    la = _fit(model, loader, "full", prior_precision=delta)
    H = _exact_ggn(model, loader)
    P = H.shape[0]
    theta = ref.flat(model)
    loglik = -_normal_nll(ref.outputs(model, X), y).sum()
    want = loglik - 0.5 * (torch.logdet(H + delta * torch.eye(P, dtype=DT)) - P * math.log(delta)) \
        - 0.5 * delta * theta.square().sum()
    torch.testing.assert_close(la.log_marginal_likelihood(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(la.log_likelihood(), loglik, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("curvature", ["ef", "mc_fisher"])
def test_ef_and_mc_fisher_curvatures(curvature):
    """'ef': sum_n J^T g_n g_n^T J at the data; 'mc_fisher' with many draws: close to the GGN."""
    model = _model(1)
    X, y = _data(20, 1)
    loader = _loader(X, y)
    if curvature == "ef":
        J, f = ref.jacobians(model, X), ref.outputs(model, X)
        gr = torch.func.vmap(torch.func.grad(lambda o, t: _normal_nll(o[None], t[None]).sum()))(f, y)
        want = torch.einsum("ncp,nc,nd,ndq->pq", J, gr, gr, J)
        la = _fit(model, loader, "full", prior_precision=1e-3, curvature="ef")
        torch.testing.assert_close(la.to_dense() - 1e-3 * torch.eye(len(want), dtype=DT), want, rtol=1e-10, atol=1e-10)
        return
    la = Laplace(model, LIK, "all", "full", curvature="mc_fisher", mc_samples=3000, prior_precision=1e-3).fit(
        loader, progress=False, generator=torch.Generator().manual_seed(1))
    H = _exact_ggn(model, loader)
    assert float((la.to_dense() - 1e-3 * torch.eye(len(H), dtype=DT) - H).norm() / H.norm()) < 0.06


def test_subnetwork_and_last_layer_are_submatrices():
    model = _model(1)
    X, y = _data(20, 1)
    loader = _loader(X, y)
    H = _exact_ggn(model, loader)
    idx = torch.tensor([0, 3, 8, 20, 31, 40, 41])
    sub = Laplace(model, LIK, "subnetwork", "full", subnetwork_indices=idx).fit(loader, progress=False)
    torch.testing.assert_close(sub.to_dense(), H[idx][:, idx] + torch.eye(len(idx), dtype=DT), rtol=1e-10, atol=1e-12)
    ll = _fit(model, loader, "full", "last_layer")
    n_last = model[4].weight.numel() + model[4].bias.numel()
    torch.testing.assert_close(ll.to_dense(), H[-n_last:, -n_last:] + torch.eye(n_last, dtype=DT), rtol=1e-10,
                               atol=1e-12)


def test_targets_on_far_apart_scales_keep_their_curvature():
    """D = 2 targets on scales 1e5 apart (mean 1e5, sd 1e3; mean 0, sd 1e-5): every entry of the
    exact GGN, EF and MC Fisher survives (no entry of a row is negligible across targets: the tiny
    target's sqrt(2) s2 meets a Jacobian of eta2 ~ 1 / s2 through the head)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), NaturalHead()).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.copy_(torch.tensor([1e5 / 1e6, 0.0, math.log(1 / 1e6), math.log(1 / 1e-10)], dtype=DT))
    X = torch.randn(10, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, s2 = natural_to_mean_var(model(X))
    y = mu + s2.sqrt() * torch.randn(10, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    H = _exact_ggn(model, [(X, y)])
    eye = 1e-6 * torch.eye(len(H), dtype=DT)
    full = _fit(model, [(X, y)], "full", prior_precision=1e-6)
    # (rtol only: the entries span 1e-12 to 1e10; the small ones carry cancellation at 1e-8)
    torch.testing.assert_close(full.to_dense() - eye, H, rtol=1e-6, atol=0)
    diag = _fit(model, [(X, y)], "diag", prior_precision=1e-6)
    torch.testing.assert_close(torch.diagonal(diag.to_dense()) - 1e-6, torch.diagonal(H), rtol=1e-6, atol=0)
    J, f = ref.jacobians(model, X), ref.outputs(model, X)
    gr = torch.func.vmap(torch.func.grad(lambda o, t: _normal_nll(o[None], t[None]).sum()))(f, y)
    ef = _fit(model, [(X, y)], "full", prior_precision=1e-6, curvature="ef")
    torch.testing.assert_close(ef.to_dense() - eye, torch.einsum("ncp,nc,nd,ndq->pq", J, gr, gr, J), rtol=1e-6, atol=0)


def test_temperature_tempers_the_whole_log_density_but_2pi():
    """A constant-variance model (s2 = 0.49) is 'regression' with sigma_noise = 0.7: the same
    precision, evidence and predictive at T = 1. At T = 2 the precision and the predictive still
    agree; the evidence differs by N log(sigma) (1 - 1 / T) exactly: 'regression' leaves its noise
    normaliser N log(sigma sqrt(2 pi)) untempered (sigma is a hyper-parameter there, laplace-torch's
    convention), while here log(sigma) is the network's and part of the tempered likelihood; only
    the constant log(2 pi) / 2 per target stays untempered in both."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)

    class Const(nn.Module):  # natural parameters of N(body(x), 0.49), no parameter in the variance
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            m = self.body(x)
            return torch.cat([m / 0.49, torch.full_like(m, -0.5 / 0.49)], 1)

    X, y = _data(20, 1)
    loader = _loader(X, y)
    for T in (1.0, 2.0):
        het = _fit(Const(), loader, "full", prior_precision=0.8, temperature=T)
        reg = Laplace(body, "regression", "all", "full", prior_precision=0.8, sigma_noise=0.7,
                      temperature=T).fit(loader, progress=False)
        torch.testing.assert_close(het.to_dense(), reg.to_dense(), rtol=1e-10, atol=1e-12)
        gap = 20 * math.log(0.7) * (1 - 1 / T)
        torch.testing.assert_close(het.log_marginal_likelihood(), reg.log_marginal_likelihood() + gap, rtol=1e-10,
                                   atol=1e-10)
        want = -(_normal_nll(ref.outputs(Const(), X), y).sum() - 10 * math.log(2 * math.pi)) / T \
            - 10 * math.log(2 * math.pi)
        torch.testing.assert_close(het.log_likelihood(), want, rtol=1e-12, atol=1e-12)
        hp, rp = het.predict(X[:5]), reg.predict(X[:5])
        torch.testing.assert_close(hp.mean, rp.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hp.epistemic, rp.epistemic, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hp.aleatoric, rp.aleatoric, rtol=1e-12, atol=1e-12)


# ---- predictives --------------------------------------------------------------------------------------
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_glm_predictive_is_the_linearised_mean_and_variance(subset):
    """la(x) = (eta(x), J Sigma J^T) of the natural parameters; predict(x): mean mu(eta),
    aleatoric s2(eta), epistemic J_mu Sigma J_mu^T with J_mu the Jacobian of the mean mu(x; theta)
    (torch.func, not through the natural parameters' covariance)."""
    model = _model(2)
    X, y = _data(20, 2)
    la = _fit(model, _loader(X, y), "full", subset, prior_precision=2.0)
    Sigma = torch.linalg.inv(la.to_dense())
    Xt = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(9))
    named = ref.trainable(model)
    covered = named if subset == "all" else named[-2:]
    theta = torch.cat([p.detach().reshape(-1) for _, p in covered])
    sizes, shapes = [p.numel() for _, p in covered], [p.shape for _, p in covered]

    def eta_of(th):
        params = {n: t.view(s) for (n, _), t, s in zip(covered, th.split(sizes), shapes)}
        return functional_call(model, params, (Xt,))

    J = jacrev(eta_of)(theta)  # [N, 2D, P]
    Jmu = jacrev(lambda th: natural_to_mean_var(eta_of(th))[0])(theta)  # [N, D, P]
    f_mu, f_var = la(Xt)
    with torch.no_grad():
        torch.testing.assert_close(f_mu, eta_of(theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_var, torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J), rtol=1e-9, atol=1e-12)
    pred = la.predict(Xt)
    mu, s2 = natural_to_mean_var(f_mu)
    torch.testing.assert_close(pred.mean, mu)
    torch.testing.assert_close(pred.aleatoric, s2)
    torch.testing.assert_close(pred.epistemic, torch.einsum("ndp,pq,ndq->nd", Jmu, Sigma, Jmu), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.variance, pred.aleatoric + pred.epistemic)


@pytest.mark.parametrize("backprop", [False, True])
def test_nn_predictive_is_the_mixture_over_draws(backprop):
    """predict(pred_type='nn'): mean E[mu], aleatoric E[s2], epistemic Var[mu] (divided by n) over
    the networks at la.sample's draws (the same generator state)."""
    model = _model(1)
    X, y = _data(20, 1)
    la = _fit(model, _loader(X, y), "kron", prior_precision=5.0, enable_backprop=backprop)
    Xt = X[:6]
    n = 50
    pred = la.predict(Xt, n, pred_type="nn", generator=torch.Generator().manual_seed(3))
    draws = la.sample(n, generator=torch.Generator().manual_seed(3))
    named = ref.trainable(model)
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]
    mus, s2s = [], []
    with torch.no_grad():
        for th in draws:
            params = {k: t.view(s) for (k, _), t, s in zip(named, th.split(sizes), shapes)}
            m, v = natural_to_mean_var(functional_call(model, params, (Xt,)))
            mus.append(m), s2s.append(v)
    mus, s2s = torch.stack(mus), torch.stack(s2s)
    torch.testing.assert_close(pred.mean, mus.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.aleatoric, s2s.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.epistemic, mus.var(0, correction=0), rtol=1e-8, atol=1e-12)


def test_noise_is_learnt_and_the_predictive_tracks_it():
    """Trained by marglik_training on data whose noise grows with |x| (sd 0.05 at 0 to 0.65 at
    |x| = 2): the aleatoric sd follows the true one, the epistemic variance stays below it in the
    data, and the predictive NLL on fresh data beats the best homoscedastic Laplace's."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        x = torch.rand(n, 1, generator=g, dtype=DT) * 4 - 2
        sd = 0.05 + 0.3 * x.abs()
        return x, torch.sin(2 * x) + sd * torch.randn(n, 1, generator=g, dtype=DT), sd

    X, y, _ = data(400)
    Xt, yt, sdt = data(400)
    loader = [(X[i:i + 100], y[i:i + 100]) for i in range(0, 400, 100)]
    torch.manual_seed(0)
    het = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2), NaturalHead()).to(DT)
    la, _ = marglik_training(het, loader, LIK, hessian_structure="kron", n_epochs=300, lr=1e-2, n_epochs_burnin=50,
                             marglik_frequency=25, progress=False)
    assert math.isfinite(float(la.log_marginal_likelihood()))
    pred = la.predict(Xt)
    rel = (pred.aleatoric.sqrt() - sdt).abs() / sdt
    assert float(rel.median()) < 0.2, float(rel.median())
    assert float((pred.epistemic / pred.aleatoric).median()) < 0.5
    nll = float((0.5 * (torch.log(2 * math.pi * pred.variance) + (yt - pred.mean).square() / pred.variance)).mean())
    torch.manual_seed(0)
    hom = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(DT)
    la_h, _ = marglik_training(hom, loader, "regression", hessian_structure="kron", n_epochs=300, lr=1e-2,
                               n_epochs_burnin=50, marglik_frequency=25, progress=False)
    ph = la_h.predict(Xt)
    nll_h = float((0.5 * (torch.log(2 * math.pi * ph.variance) + (yt - ph.mean).square() / ph.variance)).mean())
    assert nll < nll_h - 0.2, (nll, nll_h)


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_gridsearch_picks_the_best_validation_nll(pred_type):
    """The gridsearch's prior is the grid point whose predict() has the lowest validation Gaussian
    NLL (mean, total variance), computed here from predict() itself."""
    model = _model(1)
    X, y = _data(40, 1)
    Xv, yv = _data(30, 1, seed=5)
    la = _fit(model, _loader(X, y, 10), "diag")
    grid = torch.logspace(-2, 3, 6, dtype=DT)
    scores = []
    for delta in grid:
        la.prior_precision = float(delta)
        p = la.predict(Xv, 200, pred_type=pred_type, generator=torch.Generator().manual_seed(0)) \
            if pred_type == "nn" else la.predict(Xv)
        scores.append(float((0.5 * (torch.log(2 * math.pi * p.variance) + (yv - p.mean).square() / p.variance)).mean()))
    assert max(scores) - min(scores) > 1e-3  # the grid matters here
    la.optimize_prior_precision(method="gridsearch", val_loader=_loader(Xv, yv, 10), log_prior_prec_range=(-2, 3),
                                grid_size=6, pred_type=pred_type, n_samples=200)
    if pred_type == "glm":
        assert math.isclose(float(la.prior_precision), float(grid[min(range(6), key=scores.__getitem__)]), rel_tol=1e-9)
    else:  # the draws differ from the ones above: the choice is among the best
        assert scores[int(torch.isclose(grid, la.prior_precision.reshape(())).nonzero())] <= sorted(scores)[1] + 1e-9


def test_gridsearch_nn_with_enable_backprop_and_the_joint_predictive():
    model = _model(1)
    X, y = _data(40, 1)
    la = _fit(model, _loader(X, y, 10), "kron", enable_backprop=True)
    la.optimize_prior_precision(method="gridsearch", val_loader=_loader(*_data(20, 1, seed=5), 10),
                                log_prior_prec_range=(-2, 3), grid_size=6, pred_type="nn", n_samples=20)
    assert float(la.prior_precision) in {float(v) for v in torch.logspace(-2, 3, 6, dtype=DT)}
    f_mu, f_cov = la(X[:3], joint=True)  # the natural parameters' joint covariance over the inputs
    mu, var = la(X[:3])
    torch.testing.assert_close(f_mu, mu.reshape(-1), rtol=1e-12, atol=1e-12)
    for n in range(3):
        torch.testing.assert_close(f_cov[2 * n:2 * n + 2, 2 * n:2 * n + 2], var[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backprop", [False, True])
def test_draws_that_are_no_gaussian_are_refused(backprop):
    """A model without NaturalHead whose MAP is a Gaussian (eta2 < 0) but whose weight draws are
    not: every 'nn' predictive says so instead of averaging them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2)).to(DT)
    with torch.no_grad():
        m[0].weight.mul_(0.01)
        m[0].bias.copy_(torch.tensor([0.0, -0.05]))
    X, y = _data(10, 1)
    la = _fit(m, [(X, y)], "full", enable_backprop=backprop)
    for call in (lambda: la.predict(X[:3], 50, pred_type="nn", generator=torch.Generator().manual_seed(0)),
                 lambda: la(X[:3], "nn", n_samples=50, generator=torch.Generator().manual_seed(0))):
        with pytest.raises(ValueError, match=r"outputs: the second half .*eta2 = -1 / \(2 sigma\^2\), must be < 0"):
            call()


def test_marglik_tuning_and_state_dict():
    model = _model(1)
    X, y = _data(40, 1)
    la = _fit(model, _loader(X, y, 10), "kron")
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=100, lr=0.1)
    assert float(la.log_marginal_likelihood()) > before
    again = Laplace(model, LIK, "all", "kron")
    again.load_state_dict(la.state_dict())
    torch.testing.assert_close(again.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.predict(X[:4]).variance, la.predict(X[:4]).variance, rtol=1e-12, atol=1e-14)


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_refused():
    X, y = _data(10, 1)
    no_head = nn.Sequential(nn.Linear(3, 2)).to(DT)
    with torch.no_grad():
        no_head[0].bias.copy_(torch.tensor([0.0, 5.0]))  # eta2 > 0 for these inputs' typical outputs
    with pytest.raises(ValueError, match=r"eta2 = -1 / \(2 sigma\^2\), must be < 0 .*NaturalHead"):
        _fit(no_head, _loader(X, y))
    odd = nn.Sequential(nn.Linear(3, 3)).to(DT)
    with pytest.raises(ValueError, match=r"outputs must be \[N, 2D\]"):
        _fit(odd, _loader(X, y))
    with pytest.raises(ValueError, match=r"targets must be \[N, D\]"):
        _fit(_model(1), _loader(X, torch.zeros(10, 2, dtype=DT)))
    with pytest.raises(ValueError, match="sigma_noise is the regression noise"):
        Laplace(_model(1), LIK, sigma_noise=2.0)
    la = _fit(_model(1), _loader(X, y), "diag")
    with pytest.raises(ValueError, match="tune_sigma=True needs likelihood='regression'"):
        la.optimize_prior_precision(method="marglik", tune_sigma=True)
