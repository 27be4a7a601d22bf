"""Ported from laplace-torch's own suite (tests/test_baselaplace.py, second half, at 44ea62a).

The tests from ``test_regression_predictive`` to the end of the file, re-expressed against
``pyfastbayes.laplace.Laplace`` (its 'full', 'kron', 'diag' and 'lowrank' structures stand for
laplace-torch's FullLaplace, KronLaplace, DiagLaplace and LowRankLaplace; its ``curvature='ggn'`` /
``'ef'`` for the GGN / EF backends). Where upstream only checks shapes, these tests also check the
values: J P^-1 J^T against torch.func Jacobians and the dense posterior covariance, the link
functions against their formulas, draws against the predictive moments and against the network at
``la.sample`` weights, the grid search against the validation NLL computed by hand, gradients
against brute-force autograd; and against laplace-torch itself where it is installed.

Conventions of ours the ports follow (README "Coming from laplace-torch", the docstrings of
``pyfastbayes.laplace.laplace``): options after ``hessian_structure`` are keyword-only;
``bias_block='separate'`` gives laplace-torch's blocks; dict batches carry the targets under
``dict_key_y`` and go to the model whole (no ``dict_key_x``), a missing key is a ValueError naming
``dict_key_y`` (laplace-torch: a KeyError); the regression grid search scores the Gaussian NLL
(``optimize_prior_precision`` docstring; laplace-torch: MSE); regression targets [N] for a
one-output model mean [N, 1] (``_likelihood.check_targets``; laplace-torch refuses them); the
Laplace of a float16 / bfloat16 model computes, and returns, in float32 (README); gradients with
respect to the inputs need ``enable_backprop=True`` (laplace-torch's option).

Upstream tests left out (or parts of them):

- test_functional_samples' change of ``lap.likelihood`` after fit: ours has no settable
  likelihood; a classification Laplace's functional_samples are checked to be the f draws whose
  softmax its predictive_samples are.
- test_dict_data's ``backend`` parametrisation (Asdl / BackPACK / Curvlinops, and BackPACK's
  refusal of dict batches): ours has no backends (the GGN / EF curvatures are parametrised).
- test_dict_data_diagEF_curvlinops_fails: a curvlinops limitation; ours fits 'diag' + 'ef' on
  dict batches (checked in test_dict_data).
- test_backprop_*'s ``backend`` parametrisation: no backends.
- test_dtype's ``backend`` parametrisation and its ``la.H`` / ``KronDecomposed`` internals: the
  dtypes are checked through ``posterior_variance`` / ``to_dense()`` instead.
"""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pyfastbayes.laplace import Laplace

STRUCTURES = ["full", "kron", "diag", "lowrank"]
DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine, two threads' barriers made every
    small matmul ~100x slower); the previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- helpers -------------------------------------------------------------------------------------------
def _model(out: int = 2):
    torch.manual_seed(240)
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, out)).to(DTYPE)


def _data(likelihood: str, seed: int = 1, n: int = 10, out: int = 2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    y = torch.randint(2, (n,), generator=g) if likelihood in ("classification", "reward_modeling") else \
        torch.randn(n, out, generator=g, dtype=DTYPE)
    return X, y, DataLoader(TensorDataset(X, y), batch_size=3)


def _fit(model, likelihood, structure, loader, **kw):
    return Laplace(model, likelihood, hessian_structure=structure, **kw).fit(loader, progress=False)


def _unflatten(model, theta):
    out, o = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[o:o + p.numel()].view_as(p)
        o += p.numel()
    return out


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _brute_fvar(la, model, X):
    """J P^-1 J^T [N, C, C] from torch.func Jacobians [N, C, P] and the dense posterior covariance."""
    mean = la.mean
    assert torch.equal(mean, _flat(model))  # mean is the flat parameter order of model.parameters()
    J = torch.func.jacrev(lambda th: torch.func.functional_call(model, _unflatten(model, th), (X,)))(mean)
    Sigma = torch.linalg.inv(la.to_dense())
    return torch.einsum("ncp,pq,nkq->nck", J, Sigma, J)


def _sums_to_one(p, n_rows):
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), atol=1e-10, rtol=0)
    assert p.sum().item() == pytest.approx(n_rows, abs=1e-8 * n_rows)


def _net_draws(la, model, X, n, seed):
    """The network at la.sample(n) weights (the 'nn' predictive's draws) [n, N, C]."""
    thetas = la.sample(n, generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.func.functional_call(model, _unflatten(model, t), (X,)) for t in thetas])


# ---- test_regression_predictive ------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive(structure):
    model = _model()
    X, y, loader = _data("regression")
    la = _fit(model, "regression", structure, loader, sigma_noise=0.3, prior_precision=0.7)
    f = model(X).detach()

    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")

    # GLM: the MAP outputs and J P^-1 J^T
    f_mu, f_var = la(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f, atol=1e-12, rtol=0)
    assert f_var.shape == (len(X), 2, 2)
    torch.testing.assert_close(f_var, f_var.mT, atol=1e-12, rtol=0)
    torch.testing.assert_close(f_var, _brute_fvar(la, model, X), atol=1e-10, rtol=1e-8)
    # the regression GLM ignores the link ('mc' included: upstream's test_backprop_glm_mc calls it)
    for link in ("mc", "bridge"):
        m2, v2 = la(X, pred_type="glm", link_approx=link)
        torch.testing.assert_close(m2, f_mu, atol=0, rtol=0)
        torch.testing.assert_close(v2, f_var, atol=0, rtol=0)

    # NN predictive: diagonal variance only
    f_mu_nn, f_var_nn = la(X, pred_type="nn", link_approx="mc")
    assert f_mu_nn.shape == f_var_nn.shape == (len(X), 2)
    assert bool((f_var_nn >= 0).all())

    # the joint predictive: f_mu flattened, f_cov [N C, N C] whose diagonal blocks are f_var
    f_mu_joint, f_cov_joint = la(X, pred_type="glm", joint=True)
    assert f_mu_joint.shape == (20,) and f_cov_joint.shape == (20, 20)
    torch.testing.assert_close(f_mu_joint, f_mu.reshape(-1))
    torch.testing.assert_close(torch.einsum("bkbl->bkl", f_cov_joint.reshape(10, 2, 10, 2)), f_var)
    # predict()'s epistemic part is diag(f_var), its total adds sigma^2
    pred = la.predict(X)
    torch.testing.assert_close(pred.mean, f_mu)
    torch.testing.assert_close(pred.epistemic, torch.diagonal(f_var, dim1=1, dim2=2))
    torch.testing.assert_close(pred.variance, pred.epistemic + 0.09)


# ---- test_classification_predictive --------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_classification_predictive(structure):
    model = _model()
    X, y, loader = _data("classification")
    la = _fit(model, "classification", structure, loader, prior_precision=0.7)
    logits = model(X).detach()

    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")

    for link in ("mc", "probit", "bridge", "bridge_norm"):
        p = la(X, pred_type="glm", link_approx=link, n_samples=100)
        assert p.shape == logits.shape
        _sums_to_one(p, len(X))
    p = la(X, pred_type="nn", link_approx="mc", n_samples=100)
    assert p.shape == logits.shape
    _sums_to_one(p, len(X))

    # values: the logits' moments, then the probit formula on them
    f_mu, f_var = la.functional_variance(X)
    torch.testing.assert_close(f_mu, logits, atol=1e-12, rtol=0)
    torch.testing.assert_close(f_var, _brute_fvar(la, model, X), atol=1e-10, rtol=1e-8)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    torch.testing.assert_close(la(X, link_approx="probit"), torch.softmax(kappa * f_mu, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_glm_predictive_matches_laplace_torch(structure, likelihood):
    """The numbers behind the shapes: ours against laplace-torch's own predictive (its blocks)."""
    from _helpers import require
    lt = require("laplace", "laplace-torch is the reference Laplace library")
    model = _model()
    X, y, loader = _data(likelihood)
    kw = dict(sigma_noise=0.3) if likelihood == "regression" else {}
    ours = _fit(model, likelihood, structure, loader, prior_precision=0.7, bias_block="separate", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lt.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                            prior_precision=0.7, **kw)
        theirs.fit(loader)
        if likelihood == "regression":
            (m_o, v_o), (m_t, v_t) = ours(X), theirs(X)
            torch.testing.assert_close(m_o, m_t.detach(), atol=1e-12, rtol=0)
            torch.testing.assert_close(v_o, v_t.detach(), atol=1e-8, rtol=1e-6)
        else:
            for link in ("probit", "bridge", "bridge_norm"):
                torch.testing.assert_close(ours(X, link_approx=link), theirs(X, link_approx=link).detach(),
                                           atol=1e-6, rtol=0)  # (laplace-torch's curvlinops GGN is off the exact one by ~1e-7)


# ---- test_regression_predictive_samples / test_classification_predictive_samples -----------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive_samples(structure):
    model = _model()
    X, y, loader = _data("regression")
    la = _fit(model, "regression", structure, loader, sigma_noise=0.3, prior_precision=0.7)
    f = model(X).detach()

    with pytest.raises(ValueError, match="pred_type"):
        la.predictive_samples(X, pred_type="linear", n_samples=5)

    s = la.predictive_samples(X, pred_type="glm", n_samples=100)
    assert s.shape == (100, *f.shape)
    s = la.predictive_samples(X, pred_type="nn", n_samples=100)
    assert s.shape == (100, *f.shape)

    # values: GLM draws are N(f_mu, f_var) (no observation noise)
    f_mu, f_var = la(X)
    n = 20000
    s = la.predictive_samples(X, pred_type="glm", n_samples=n, generator=torch.Generator().manual_seed(3))
    sd = torch.diagonal(f_var, dim1=1, dim2=2).sqrt()
    assert bool(((s.mean(0) - f_mu).abs() <= 5 * sd / math.sqrt(n) + 1e-12).all())
    d = s - s.mean(0)
    cov = torch.einsum("snc,snk->nck", d, d) / (n - 1)
    scale = sd.unsqueeze(2) * sd.unsqueeze(1)
    assert bool(((cov - f_var).abs() <= 0.06 * scale + 1e-14).all())
    # 'nn' draws: the network at la.sample's weights; la(x, 'nn') is their mean and unbiased variance
    s = la.predictive_samples(X, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s, _net_draws(la, model, X, 7, 5))
    m, v = la(X, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m, s.mean(0))
    torch.testing.assert_close(v, s.var(0))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_classification_predictive_samples(structure):
    model = _model()
    X, y, loader = _data("classification")
    la = _fit(model, "classification", structure, loader, prior_precision=0.7)
    f = model(X).detach()

    with pytest.raises(ValueError, match="pred_type"):
        la.predictive_samples(X, pred_type="linear", n_samples=5)

    for pred_type in ("glm", "nn"):
        s = la.predictive_samples(X, pred_type=pred_type, n_samples=100)
        assert s.shape == (100, *f.shape)
        _sums_to_one(s, 100 * len(X))

    # the draws average to the MC predictives (the same generator: the same draws)
    s = la.predictive_samples(X, pred_type="glm", n_samples=50, generator=torch.Generator().manual_seed(3))
    p = la(X, pred_type="glm", link_approx="mc", n_samples=50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s.mean(0), p)
    s = la.predictive_samples(X, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s, _net_draws(la, model, X, 7, 5).softmax(-1))
    p = la(X, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(p, s.mean(0))


# ---- test_functional_samples ---------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_functional_samples_are_the_f_draws(structure):
    """functional_samples: f draws [S, N, C] before the link, reproducible with a generator; the
    predictive_samples are their link (same draws); 'glm' draws have the moments of la(x); 'nn'
    draws are the network at la.sample weights."""
    model = _model()
    X, y, loader = _data("regression")
    la = _fit(model, "regression", structure, loader, sigma_noise=0.3, prior_precision=0.7)
    f = model(X).detach()
    g = torch.Generator()
    for pred_type in ("glm", "nn"):
        a = la.functional_samples(X, pred_type=pred_type, n_samples=100, generator=g.manual_seed(123))
        b = la.functional_samples(X, pred_type=pred_type, n_samples=100, generator=g.manual_seed(123))
        c = la.functional_samples(X, pred_type=pred_type, n_samples=100, generator=g.manual_seed(124))
        assert a.shape == (100, *f.shape)
        assert torch.equal(a, b) and not torch.allclose(a, c)
        torch.testing.assert_close(la.predictive_samples(X, pred_type=pred_type, n_samples=100,
                                                         generator=g.manual_seed(123)), a, rtol=0, atol=0)
    torch.testing.assert_close(la.functional_samples(X, "nn", 3, generator=g.manual_seed(5)),
                               _net_draws(la, model, X, 3, 5).detach(), rtol=1e-12, atol=1e-12)
    s = la.functional_samples(X, n_samples=20000, generator=g.manual_seed(6))
    f_mu, f_var = la(X)
    torch.testing.assert_close(s.mean(0), f_mu, rtol=0, atol=5 * float(f_var.diagonal(dim1=1, dim2=2).max()) ** 0.5
                               / 20000 ** 0.5)
    # a classification Laplace: predictive_samples are the softmax of the same f draws, whose
    # average is la(x, 'mc')
    Xc, yc, loader_c = _data("classification")
    lc = _fit(model, "classification", structure, loader_c, prior_precision=0.7)
    fc = lc.functional_samples(X, n_samples=30, generator=g.manual_seed(9))
    s = lc.predictive_samples(X, n_samples=30, generator=g.manual_seed(9))
    assert fc.shape == s.shape == (30, *f.shape)
    torch.testing.assert_close(s, fc.softmax(-1), rtol=0, atol=0)
    torch.testing.assert_close(lc(X, link_approx="mc", n_samples=30, generator=g.manual_seed(9)), s.mean(0))


# ---- test_dict_data ------------------------------------------------------------------------------------
class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(batch):
    from collections import UserDict  # upstream's collator returns a UserDict (a MutableMapping)
    return UserDict({k: torch.stack([b[k] for b in batch]).squeeze(-1) for k in batch[0]})


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 2))

    def forward(self, data):
        x = data if torch.is_tensor(data) else data["test_input_key"]
        return self.net(x)


def _dict_loaders(likelihood):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(10, 5, generator=g, dtype=DTYPE)
    Y = torch.randint(2, (10, 1), generator=g) if likelihood != "regression" else \
        torch.randn(10, 2, generator=g, dtype=DTYPE)
    items = [{"test_input_key": X[i], "test_label_key": Y[i]} for i in range(10)]
    dict_loader = DataLoader(_ListDataset(items), batch_size=3, collate_fn=_collate)
    y = Y[:, 0] if likelihood != "regression" else Y
    return dict_loader, DataLoader(TensorDataset(X, y), batch_size=3)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression", "reward_modeling"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dict_data(structure, likelihood, curvature):
    """(reward_modeling as upstream: fitted on the classification loader, predicted as regression)"""
    torch.manual_seed(0)
    model = _DictModel().to(DTYPE)
    loader, tensor_loader = _dict_loaders(likelihood)

    # the targets' key is not the default ('labels'): refused, naming the option (upstream: KeyError)
    with pytest.raises(ValueError, match="dict_key_y"):
        _fit(model, likelihood, structure, loader, curvature=curvature)

    la = _fit(model, likelihood, structure, loader, curvature=curvature, dict_key_y="test_label_key")
    batch = next(iter(loader))
    f = model(batch).detach()
    if likelihood == "classification":
        for kw in (dict(pred_type="glm"), dict(pred_type="nn", link_approx="mc")):
            p = la(batch, **kw)
            assert p.shape == f.shape
            _sums_to_one(p, len(f))
    else:
        f_mu, f_var = la(batch, pred_type="glm")
        assert f_mu.shape == f.shape
        torch.testing.assert_close(f_mu, f, atol=1e-12, rtol=0)
        assert f_var.shape == (f.shape[0], f.shape[1], f.shape[1])
        f_mu, f_var = la(batch, pred_type="nn", link_approx="mc")
        assert f_mu.shape == f_var.shape == f.shape

    # values: the same Laplace as on the plain tensors
    ref = _fit(model, likelihood, structure, tensor_loader, curvature=curvature)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), atol=1e-10, rtol=1e-10)
    mine, theirs = la.functional_variance(batch), ref.functional_variance(batch["test_input_key"])
    torch.testing.assert_close(mine[1], theirs[1], atol=1e-10, rtol=1e-8)
    s = la.predictive_samples(batch, n_samples=4)
    assert s.shape == (4, *f.shape)


# ---- test_backprop_glm / _glm_mc / _nn -----------------------------------------------------------------
# With enable_backprop=True (laplace-torch's option) the predictives carry autograd to the inputs (e.g. for
# Bayesian-optimisation acquisition functions): gradients against brute force through torch.func.
_BACKPROP = {"enable_backprop": True}


def _backprop_setup(structure):
    model = _model()
    X, y, loader = _data("regression")
    la = _fit(model, "regression", structure, loader, **_BACKPROP)
    return model, la, X.clone().requires_grad_(True)


@pytest.mark.parametrize("link", ["probit", "mc"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_backprop_glm(structure, link):
    model, la, X = _backprop_setup(structure)
    f_mu, f_var = la(X, pred_type="glm", link_approx=link)
    g_mu = torch.autograd.grad(f_mu.sum(), X, retain_graph=True)[0]
    g_var = torch.autograd.grad(f_var.sum(), X)[0]
    assert g_mu.shape == g_var.shape == X.shape
    # brute force: d/dx sum f(x) and d/dx sum J(x) P^-1 J(x)^T
    Sigma = torch.linalg.inv(la.to_dense()).detach()
    mean = la.mean

    def fvar_sum(x):
        J = torch.func.jacrev(lambda th: torch.func.functional_call(model, _unflatten(model, th), (x,)))(mean)
        return torch.einsum("ncp,pq,nkq->", J, Sigma, J)

    x0 = X.detach()
    torch.testing.assert_close(g_mu, torch.func.grad(lambda x: model(x).sum())(x0), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g_var, torch.func.grad(fvar_sum)(x0), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_backprop_glm_joint(structure):
    model, la, X = _backprop_setup(structure)
    f_mu, f_cov = la(X, pred_type="glm", joint=True)
    g_mu = torch.autograd.grad(f_mu.sum(), X, retain_graph=True)[0]
    g_cov = torch.autograd.grad(f_cov.sum(), X)[0]
    Sigma = torch.linalg.inv(la.to_dense()).detach()

    def fcov_sum(x):
        J = torch.func.jacrev(lambda th: torch.func.functional_call(model, _unflatten(model, th), (x,)))(la.mean)
        J = J.reshape(-1, J.shape[-1])
        return (J @ Sigma @ J.t()).sum()

    x0 = X.detach()
    torch.testing.assert_close(g_mu, torch.func.grad(lambda x: model(x).sum())(x0), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g_cov, torch.func.grad(fcov_sum)(x0), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_backprop_nn(structure):
    model, la, X = _backprop_setup(structure)
    f_mu, f_var = la(X, pred_type="nn", link_approx="mc", n_samples=10, generator=torch.Generator().manual_seed(2))
    g_mu = torch.autograd.grad(f_mu.sum(), X, retain_graph=True)[0]
    g_var = torch.autograd.grad(f_var.sum(), X)[0]
    assert g_mu.shape == g_var.shape == X.shape
    # brute force: the same draws (la.sample with the same generator) through functional_call
    thetas = la.sample(10, generator=torch.Generator().manual_seed(2))

    def draws(x):
        return torch.stack([torch.func.functional_call(model, _unflatten(model, t), (x,)) for t in thetas])

    x0 = X.detach()
    torch.testing.assert_close(g_mu, torch.func.grad(lambda x: draws(x).mean(0).sum())(x0), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g_var, torch.func.grad(lambda x: draws(x).var(0).sum())(x0), atol=1e-10, rtol=1e-8)


# ---- test_reg_glm_predictive_correct_behavior ----------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_reg_glm_predictive_shapes(structure):
    """joint ignores diagonal_output (as upstream); diagonal_output gives [N, C] otherwise; and
    predict()'s epistemic part is the same diagonal."""
    model = _model()
    X, y, loader = _data("regression")
    la = _fit(model, "regression", structure, loader)
    for diagonal in (True, False):
        assert la(X, pred_type="glm", joint=True, diagonal_output=diagonal)[1].shape == (20, 20)
    assert la(X, pred_type="glm", diagonal_output=True)[1].shape == (10, 2)
    f_mu, f_var = la(X, pred_type="glm")
    assert f_mu.shape == (10, 2) and f_var.shape == (10, 2, 2)
    pred = la.predict(X)
    assert pred.epistemic.shape == pred.variance.shape == pred.aleatoric.shape == (10, 2)
    torch.testing.assert_close(pred.epistemic, torch.diagonal(f_var, dim1=1, dim2=2))


# ---- test_gridsearch -----------------------------------------------------------------------------------
def _val_nll(la, X, y):
    """The validation NLL the grid search minimises, from the public predictive."""
    if la.likelihood == "regression":
        f_mu, f_var = la(X)
        var = torch.diagonal(f_var, dim1=1, dim2=2) + la.sigma_noise ** 2
        return float((0.5 * (torch.log(2 * math.pi * var) + (y - f_mu) ** 2 / var)).sum(1).mean())
    p = la(X, link_approx="probit", fitting=True)  # (reward_modeling: the pairs' classification)
    return float(-p.gather(1, y[:, None]).log().mean())


@pytest.mark.parametrize("prior_type", ["scalar", "layerwise", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression", "reward_modeling"])
@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_gridsearch(structure, likelihood, prior_type):
    """(reward_modeling as upstream: a classifier fitted and scored on class_loader as pairs'
    classification, the validation NLL of la(x, fitting=True))"""
    model = _model()
    X, y, loader = _data(likelihood)
    probe = Laplace(model, likelihood, hessian_structure=structure)
    n_blocks, n_params = len(probe.block_names), probe.n_params
    prior = {"scalar": 1.0, "layerwise": torch.ones(n_blocks, dtype=DTYPE),
             "diag": torch.ones(n_params, dtype=DTYPE)}[prior_type]
    if structure == "kron" and prior_type == "diag":  # (documented: one exact damping per Kronecker block)
        with pytest.raises(ValueError, match="per-block"):
            Laplace(model, likelihood, hessian_structure=structure, prior_precision=prior)
        return
    la = _fit(model, likelihood, structure, loader, prior_precision=prior)
    grid_range, grid_size = (-2.0, 2.0), 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an optimum at the grid's edge warns)
        best = la.optimize_prior_precision(method="gridsearch", val_loader=loader, n_steps=10,
                                           log_prior_prec_range=grid_range, grid_size=grid_size)
    assert best.numel() == 1 and la.prior_precision.numel() == 1  # a scalar prior, as upstream
    # the chosen prior is the grid's minimiser of the validation NLL, computed by hand
    grid = torch.logspace(*grid_range, grid_size, dtype=torch.float64).tolist()
    nlls = []
    for delta in grid:
        la.prior_precision = delta
        nlls.append(_val_nll(la, X, y))
    assert float(best) == pytest.approx(grid[min(range(grid_size), key=nlls.__getitem__)], rel=1e-12)


# ---- test_reward_modeling -------------------------------------------------------------------------------
class _RewardModel(nn.Module):
    """Upstream's reward model: pairs [B, 2, 3] -> the pair's rewards [B, 2], inputs [B, 3] -> [B, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 100), nn.ReLU(), nn.Linear(100, 1))

    def forward(self, x):
        if x.dim() == 3:
            b, _, d = x.shape
            return self.net(x.reshape(-1, d)).reshape(b, 2)
        return self.net(x)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_reward_modeling(structure):
    """Upstream's shapes (KronLaplace, DiagLaplace there; every structure here), and the values:
    f_mu the network's rewards, f_var J P^-1 J^T of the single inputs' Jacobians."""
    torch.manual_seed(0)
    model = _RewardModel().to(DTYPE)
    g = torch.Generator().manual_seed(5)
    pairs, y = torch.randn(10, 2, 3, generator=g, dtype=DTYPE), torch.randint(2, (10,), generator=g)
    X = torch.randn(10, 3, generator=g, dtype=DTYPE)
    la = _fit(model, "reward_modeling", structure, DataLoader(TensorDataset(pairs, y), batch_size=3))
    f = model(X).detach()
    with pytest.raises(ValueError):
        la(X, pred_type="linear")
    f_mu, f_var = la(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f, atol=1e-12, rtol=0)
    assert f_var.shape == (f_mu.shape[0], f_mu.shape[1], f_mu.shape[1]) and len(f_mu) == len(X)
    torch.testing.assert_close(f_var, _brute_fvar(la, model, X), atol=1e-12, rtol=1e-8)
    f_mu, f_var = la(X, pred_type="nn", link_approx="mc")
    assert f_mu.shape == f_var.shape == (len(X), 1)


# ---- test_parametric_fit_y_shape -----------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_parametric_fit_y_shape(structure):
    model = _model(out=1)
    g = torch.Generator().manual_seed(9999)
    X = torch.randn(10, 3, generator=g, dtype=DTYPE)
    y = torch.randn(10, 1, generator=g, dtype=DTYPE)
    col = _fit(model, "regression", structure, DataLoader(TensorDataset(X, y), batch_size=3))  # OK
    # upstream refuses flat targets [N] (its MSE would broadcast [N] against [N, 1] to [N, N]); ours
    # documents [N] as [N, 1] for a one-output model (_likelihood.check_targets): the same posterior
    flat_loader = DataLoader(TensorDataset(X, y[:, 0]), batch_size=3)
    flat = _fit(model, "regression", structure, flat_loader)
    torch.testing.assert_close(flat.log_marginal_likelihood(), col.log_marginal_likelihood(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(flat.posterior_variance, col.posterior_variance, atol=1e-12, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = flat.optimize_prior_precision("gridsearch", val_loader=flat_loader, grid_size=5)
        b = col.optimize_prior_precision("gridsearch", val_loader=DataLoader(TensorDataset(X, y), batch_size=3),
                                         grid_size=5)
    assert float(a) == float(b)
    # what upstream guards against is still refused: targets of another shape
    with pytest.raises(ValueError, match="targets"):
        _fit(model, "regression", structure, DataLoader(TensorDataset(X, torch.randn(10, 2, dtype=DTYPE)),
                                                        batch_size=3))


# ---- test_dtype ----------------------------------------------------------------------------------------
def _dtype_data(likelihood, dtype):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(10, 3, generator=g).to(dtype)
    # (upstream feeds float targets to classification too; ours takes class indices)
    Y = torch.randn(10, 3, generator=g).to(dtype) if likelihood == "regression" else torch.randint(3, (10,), generator=g)
    return X, DataLoader(TensorDataset(X, Y), batch_size=10)


def _dtypes(out):
    return [t.dtype for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dtype(structure, dtype, curvature, likelihood):
    torch.manual_seed(0)
    X, loader = _dtype_data(likelihood, dtype)
    model = nn.Linear(3, 3, dtype=dtype)
    la = _fit(model, likelihood, structure, loader, curvature=curvature)
    assert la.to_dense().dtype == dtype  # (upstream: la.H / its Kronecker eigenbases)
    assert la.posterior_variance.dtype == dtype
    assert la.log_marginal_likelihood().dtype == dtype
    assert set(_dtypes(la(X, pred_type="glm"))) == {dtype}
    assert set(_dtypes(la(X, pred_type="nn", n_samples=3))) == {dtype}
    assert la.predictive_samples(X, n_samples=3).dtype == dtype
    assert la.sample(2).dtype == dtype


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dtype_half(structure, likelihood, half):
    """Upstream's torch.half. Ours computes a half model's Laplace in float32 (README): every result
    is float32 and equals, to the half forward's rounding, the Laplace of the same weights in a
    float32 model; the GLM draws (a Cholesky, which torch lacks in half on the CPU) work too."""
    X, loader = _dtype_data(likelihood, half)
    model = nn.Linear(3, 3, dtype=half)
    la = _fit(model, likelihood, structure, loader)
    m32 = nn.Linear(3, 3)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    X32, Y = X.float(), loader.dataset.tensors[1]
    ref = _fit(m32, likelihood, structure,
               DataLoader(TensorDataset(X32, Y.float() if Y.is_floating_point() else Y), batch_size=10))
    lml, want = la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert lml.dtype == torch.float32 and abs(float(lml) - float(want)) <= 2e-2 * abs(float(want))
    got, exp = la(X, pred_type="glm"), ref(X32, pred_type="glm")
    for g, e in zip(got if isinstance(got, tuple) else (got,), exp if isinstance(exp, tuple) else (exp,)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=3e-2, atol=3e-2 * float(e.abs().max()))
    assert set(_dtypes(la(X, pred_type="nn", n_samples=3))) == {torch.float32}
    assert la.sample(2).dtype == torch.float32 and la.posterior_variance.dtype == torch.float32
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance, rtol=3e-2, atol=0)
    s = la.predictive_samples(X, pred_type="glm", n_samples=4)
    assert s.shape == (4, 10, 3) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    if likelihood == "classification":
        p = la(X, pred_type="glm", link_approx="mc", n_samples=4)
        assert p.shape == (10, 3) and bool(torch.isfinite(p).all())
