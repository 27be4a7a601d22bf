"""Laplace(enable_backprop=True): predictives differentiable in their inputs, equal in value to the
default path; and float16 / bfloat16 models, computed in float32 against a float32 copy."""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace

STRUCTURES = ["kron", "diag", "full", "lowrank"]
DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).to(DT)


def _data(model_kind: str, likelihood: str, n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=DT) if model_kind == "mlp" else torch.randn(n, 1, 5, 5, generator=g,
                                                                                        dtype=DT)
    y = torch.randint(3, (n,), generator=g) if likelihood == "classification" else torch.randn(n, 3, generator=g,
                                                                                               dtype=DT)
    return X, y


def _pair(model, likelihood, structure, X, y, **kw):
    plain = Laplace(model, likelihood, hessian_structure=structure, prior_precision=0.5, **kw)
    grad = Laplace(model, likelihood, hessian_structure=structure, prior_precision=0.5, enable_backprop=True, **kw)
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]
    g = dict(generator=torch.Generator().manual_seed(0)) if structure == "lowrank" else {}
    plain.fit(batches, progress=False, **g)
    g = dict(generator=torch.Generator().manual_seed(0)) if structure == "lowrank" else {}
    grad.fit(batches, progress=False, **g)
    return plain, grad


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_enable_backprop_gives_the_same_values(structure, kind, subset):
    """The explicit-Jacobian GLM path and the functional_call 'nn' path equal the default paths."""
    model = _mlp() if kind == "mlp" else _cnn()
    X, y = _data(kind, "classification")
    plain, grad = _pair(model, "classification", structure, X, y, subset_of_weights=subset)
    Xt = X[:7]
    for a, b in zip(plain.functional_variance(Xt), grad.functional_variance(Xt.clone().requires_grad_(True))):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    for link in ("probit", "bridge"):
        torch.testing.assert_close(grad.la(Xt, link_approx=link), plain.la(Xt, link_approx=link), rtol=1e-9,
                                   atol=1e-12)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(grad.la(Xt, pred_type="nn", n_samples=5, generator=gen()),
                               plain.la(Xt, pred_type="nn", n_samples=5, generator=gen()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad.predictive_samples(Xt, n_samples=4, generator=gen()),
                               plain.predictive_samples(Xt, n_samples=4, generator=gen()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_probit_probabilities_are_differentiable_in_x(structure):
    model = _mlp()
    X, y = _data("mlp", "classification")
    _, la = _pair(model, "classification", structure, X, y)
    x = X[:5].clone().requires_grad_(True)
    probs = la.la(x, link_approx="probit")
    assert probs.requires_grad
    g = torch.autograd.grad(probs[:, 0].sum(), x)[0]
    # brute force: the probit link of f(x) and J(x) Sigma J(x)^T, Sigma the inverse of to_dense()
    Sigma = torch.linalg.inv(la.to_dense())
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def p0(xx):
        def f(flat):
            parts = dict(zip(names, flat.split([params[n].numel() for n in names])))
            return torch.func.functional_call(model, {n: parts[n].view_as(params[n]) for n in names}, (xx,))
        theta = torch.cat([params[n].reshape(-1) for n in names])
        J = torch.func.jacrev(f)(theta)
        var = torch.einsum("ncp,pq,nkq->nck", J, Sigma, J)
        kappa = 1 / torch.sqrt(1 + torch.pi / 8 * torch.diagonal(var, dim1=1, dim2=2))
        return (f(theta) * kappa).softmax(-1)[:, 0].sum()

    torch.testing.assert_close(g, torch.func.grad(p0)(X[:5]), rtol=1e-8, atol=1e-12)


def test_regression_predict_is_differentiable_in_x_for_both_predictives():
    model = _mlp()
    X, y = _data("mlp", "regression")
    _, la = _pair(model, "regression", "kron", X, y, sigma_noise=0.4)
    x = X[:4].clone().requires_grad_(True)
    for pred_type in ("glm", "nn"):
        out = la.predict(x, n_samples=6, pred_type=pred_type, generator=torch.Generator().manual_seed(0))
        assert out.mean.requires_grad and out.epistemic.requires_grad
        g = torch.autograd.grad(out.variance.sum(), x)[0]
        assert g.shape == x.shape and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_enable_backprop_refusals():
    model = _mlp()
    with pytest.raises(TypeError, match="enable_backprop"):
        Laplace(model, enable_backprop=1)
    X, y = _data("mlp", "classification")
    la = Laplace(model, enable_backprop=True).fit([(X, y)], progress=False)
    with pytest.raises(TypeError, match="enable_backprop=True.*progress"):
        la.predict(X, pred_type="nn", n_samples=2, progress=False)


def test_without_enable_backprop_predictives_carry_no_graph():
    """The default (laplace-torch's too): no graph, no Jacobian tensor."""
    model = _mlp()
    X, y = _data("mlp", "classification")
    la = Laplace(model).fit([(X, y)], progress=False)
    x = X[:3].clone().requires_grad_(True)
    assert not la.la(x).requires_grad
    assert not la.predictive_samples(x, pred_type="nn", n_samples=2).requires_grad


# ---- float16 / bfloat16 models ---------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_half_model_is_computed_in_float32(structure, likelihood, half):
    """Curvature, evidence and predictives of a half model in float32 (README): within the half
    forward's rounding of the float32 Laplace of the same (rounded) weights."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    m_half = copy.deepcopy(base).to(half)
    m32 = copy.deepcopy(base)
    m32.load_state_dict({k: v.float() for k, v in m_half.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, generator=g).to(half).float()
    Y = torch.randint(3, (40,), generator=g) if likelihood == "classification" else torch.randn(40, 3, generator=g)
    Yh = Y if likelihood == "classification" else Y.to(half)
    la = Laplace(m_half, likelihood, hessian_structure=structure).fit([(X.to(half), Yh)], progress=False)
    ref = Laplace(m32, likelihood, hessian_structure=structure).fit([(X, Yh.float() if Yh.is_floating_point() else Y)],
                                                                   progress=False)
    tol = (1e-3 if half == torch.float16 else 1e-2) * (4 if structure == "lowrank" else 1)  # (Lanczos in half)
    lml = la.log_marginal_likelihood()
    assert lml.dtype == torch.float32 and la.mean.dtype == torch.float32
    assert abs(float(lml) - float(ref.log_marginal_likelihood())) <= tol * abs(float(lml))
    out, want = la.la(X.to(half)), ref.la(X)
    for a, b in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        assert a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 2 * tol * float(b.abs().max())
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance, rtol=5 * tol, atol=0)
    assert la.predictive_samples(X.to(half), n_samples=3).dtype == torch.float32
    assert la.predictive_samples(X.to(half), pred_type="nn", n_samples=3).dtype == torch.float32
    m_half.load_state_dict({k: v for k, v in m_half.state_dict().items()})  # (unchanged weights)
    la.sample_(m_half, generator=torch.Generator().manual_seed(0))  # a float32 draw written into the half model
    assert next(m_half.parameters()).dtype == half


# ---- the joint GLM predictive and diagonal outputs (laplace-torch's joint / diagonal_output) ----------------
def _brute_force_cov(la, model, X):
    """J P^-1 J^T [N C, N C] from torch.func Jacobians of the covered parameters and the inverse of
    to_dense() (rows n C + c)."""
    names = [n for n, p in model.named_parameters()]
    covered = set(la.positions.tolist())
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        parts = dict(zip(names, flat.split([params[n].numel() for n in names])))
        return torch.func.functional_call(model, {n: parts[n].view_as(params[n]) for n in names}, (X,))

    J = torch.func.jacrev(f)(theta).reshape(-1, theta.numel())[:, sorted(covered)]
    return f(theta).reshape(-1), J @ torch.linalg.inv(la.to_dense()) @ J.t()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_joint_covariance_against_brute_force(structure, kind, subset):
    model = _mlp() if kind == "mlp" else _cnn()
    X, y = _data(kind, "regression")
    plain, grad = _pair(model, "regression", structure, X, y, subset_of_weights=subset, sigma_noise=0.5)
    Xt = X[:5]
    want_mu, want_cov = _brute_force_cov(plain, model, Xt)
    for la in (plain, grad):
        f_mu, f_cov = la.la(Xt, joint=True, batch_size=2)  # (rows in chunks of 2)
        assert f_mu.shape == (15,) and f_cov.shape == (15, 15)
        torch.testing.assert_close(f_mu, want_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f_cov, want_cov, rtol=1e-8, atol=1e-12)
        # each input's own block is the marginal predictive's f_var
        f_var = la.functional_variance(Xt)[1]
        blocks = f_cov.reshape(5, 3, 5, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        torch.testing.assert_close(blocks, f_var, rtol=1e-8, atol=1e-12)
    x = Xt.clone().requires_grad_(True)
    g = torch.autograd.grad(grad.functional_covariance(x)[1].sum(), x)[0]
    assert g.shape == x.shape and float(g.abs().sum()) > 0
    assert not plain.functional_covariance(x)[1].requires_grad


def test_diagonal_output():
    model = _mlp()
    X, y = _data("mlp", "regression")
    la = Laplace(model, "regression", sigma_noise=0.5).fit([(X, y)], progress=False)
    f_mu, f_var = la.la(X[:4])
    d_mu, d_var = la.la(X[:4], diagonal_output=True)
    torch.testing.assert_close(d_mu, f_mu, rtol=0, atol=0)
    torch.testing.assert_close(d_var, torch.diagonal(f_var, dim1=1, dim2=2), rtol=0, atol=0)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    s = la.predictive_samples(X[:4], n_samples=20000, generator=gen(), diagonal_output=True)
    c = torch.einsum("snc,snd->ncd", s - s.mean(0), s - s.mean(0)) / 20000
    off = c - torch.diag_embed(torch.diagonal(c, dim1=1, dim2=2))
    assert float(off.abs().max()) < 0.05 * float(d_var.max())  # independent outputs
    Xc, yc = _data("mlp", "classification")
    lc = Laplace(model).fit([(Xc, yc)], progress=False)
    # probit reads the diagonal only and the bridge links ignore the option (laplace-torch's rule):
    # unchanged; 'mc' draws from the diagonal covariance
    for link in ("probit", "bridge", "bridge_norm"):
        torch.testing.assert_close(lc.la(Xc[:4], link_approx=link, diagonal_output=True),
                                   lc.la(Xc[:4], link_approx=link), rtol=0, atol=0)
    fm, fv = lc.functional_variance(Xc[:4])
    from pyfastbayes.laplace.predictive import draws
    want = draws(fm, torch.diag_embed(torch.diagonal(fv, dim1=1, dim2=2)), 7, gen()).softmax(-1).mean(0)
    torch.testing.assert_close(lc.la(Xc[:4], link_approx="mc", n_samples=7, generator=gen(), diagonal_output=True),
                               want, rtol=1e-12, atol=0)


def test_joint_and_diagonal_output_refusals():
    model = _mlp()
    X, y = _data("mlp", "classification")
    lc = Laplace(model).fit([(X, y)], progress=False)
    with pytest.raises(ValueError, match="joint=True"):
        lc.la(X, joint=True)
    Xr, yr = _data("mlp", "regression")
    lr = Laplace(model, "regression").fit([(Xr, yr)], progress=False)
    assert lr.la(Xr[:3], joint=True, diagonal_output=True)[1].shape == (9, 9)  # joint wins (laplace-torch's rule)
    with pytest.raises(ValueError, match="pred_type='glm'"):
        lr.la(Xr, pred_type="nn", joint=True)
    with pytest.raises(ValueError, match="pred_type='glm'"):
        lr.predictive_samples(Xr, pred_type="nn", diagonal_output=True)
    with pytest.raises(TypeError, match="joint"):
        lr.la(Xr, joint=1)


def test_enable_backprop_caps_the_rows_per_jacobian():
    """jacrev of n rows costs n C backward passes over all n rows: the explicit path takes at most
    _BACKPROP_ROWS rows at a time (a 256-row chunk took 16 s on a small CNN, 32-row chunks 2 s)."""
    from pyfastbayes.laplace.laplace import _BACKPROP_ROWS
    model = _mlp()
    X, y = _data("mlp", "classification", n=80)
    plain, grad = _pair(model, "classification", "kron", X, y)
    assert plain._glm_rows(X, 256) > _BACKPROP_ROWS
    assert grad._glm_rows(X, 256) == _BACKPROP_ROWS
    torch.testing.assert_close(grad.la(X), plain.la(X), rtol=1e-9, atol=1e-12)


def test_joint_covariance_empty_inputs_and_memory_guard(monkeypatch):
    from pyfastbayes.laplace import laplace as laplace_mod
    model = _mlp()
    X, y = _data("mlp", "regression")
    la = Laplace(model, "regression").fit([(X, y)], progress=False)
    f_mu, f_cov = la.la(X[:0], joint=True)
    assert f_mu.shape == (0,) and f_cov.shape == (0, 0)
    with pytest.raises(ValueError, match="no inputs"):
        la.functional_covariance([])
    # the guard counts f_cov [N C, N C] too: 24 rows x 3 outputs of a last-layer Laplace (P_c = 21)
    ll = Laplace(model, "regression", subset_of_weights="last_layer").fit([(X, y)], progress=False)
    need = (72 * 21 + 72 * 72) * 8
    monkeypatch.setattr(laplace_mod, "COVARIANCE_BYTES", need - 1)
    with pytest.raises(RuntimeError, match="f_cov"):
        ll.functional_covariance(X)
    monkeypatch.setattr(laplace_mod, "COVARIANCE_BYTES", need)
    assert ll.functional_covariance(X)[1].shape == (72, 72)
