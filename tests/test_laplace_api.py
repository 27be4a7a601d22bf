"""pyfastbayes.laplace.Laplace's API: bad input refused with errors naming the argument (and a failed
fit changing nothing), state_dict round trips, the predictives (regression split into aleatoric and
epistemic parts; 'nn' = the Bayesian model average by hand), modes restored, the curvature types
(MC Fisher -> GGN with the exact sampling variance as tolerance, EF = per-example gradient outer
products), prior tuning (gridsearch = the grid point of lowest validation NLL computed here;
marglik raises the evidence), and torch.distributed (2 gloo processes = one process on the union).
fp64, small models."""
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.func import functional_call, grad, vmap

import _laplace_reference as ref
from _helpers import require, spawn_gloo
from pyfastbayes.laplace import Laplace, RegressionPredictive

DT = torch.float64
STRUCTURES = ["kron", "diag", "full"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny fp64 models: a second thread only adds spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(out=3, D=4, H=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, out)).to(DT)


def data(n=30, D=4, C=3, seed=0, likelihood="classification"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, C, (n,), generator=g)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (n,), generator=g).to(DT)
    else:
        y = torch.randn(n, C, generator=g, dtype=DT)
    return X, y


def loader_of(X, y, k=10):
    return [(X[i:i + k], y[i:i + k]) for i in range(0, X.shape[0], k)]


def fitted(structure="kron", likelihood="classification", out=3, **kw):
    model = mlp(out)
    X, y = data(likelihood=likelihood, C=out)
    la = Laplace(model, likelihood, hessian_structure=structure, **kw).fit(loader_of(X, y), progress=False)
    return la, model, X, y


def snapshot(la):
    return (float(la.log_marginal_likelihood()), la.to_dense().clone(), la.mean.clone(), la.n_data,
            la.prior_precision.clone())


def assert_same(a, b):
    assert a[0] == b[0] and a[3] == b[3]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[4], b[4])


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_before_fit_everything_asks_for_fit(structure):
    la = Laplace(mlp(), hessian_structure=structure)
    X, _ = data()
    calls = [lambda: la.log_marginal_likelihood(), lambda: la.predict(X), lambda: la.predict(X, pred_type="nn"),
             lambda: la(X), lambda: la.functional_variance(X), lambda: la.sample(3), lambda: la.to_dense(),
             lambda: la.state_dict(), lambda: la.optimize_prior_precision(), lambda: la.posterior_precision,
             lambda: la.mean, lambda: la.posterior_variance, lambda: la.log_det_ratio, lambda: la.scatter,
             lambda: la.predictive_samples(X), lambda: la.predictive_samples(X, "nn")]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"not fitted: call fit\(train_loader\) first"):
            call()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_empty_loaders(structure):
    la = Laplace(mlp(), hessian_structure=structure)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        la.fit([], progress=False)
    X, y = data()
    with pytest.raises(ValueError, match="batches hold no rows"):
        la.fit([(X[:0], y[:0]), (X[:0], y[:0])], progress=False)
    with pytest.raises(TypeError, match="not a tensor"):
        la.fit(X, progress=False)
    with pytest.raises(TypeError, match=r"batch 1 must be an \(inputs, targets\) pair"):
        la.fit([(X, y), X], progress=False)


@pytest.mark.parametrize("value, exc, text", [
    (0.0, ValueError, "finite and > 0"), (-1.0, ValueError, "finite and > 0"), (math.nan, ValueError, "finite and > 0"),
    (math.inf, ValueError, "finite and > 0"), (torch.tensor([1.0, -2.0]), ValueError, "finite and > 0"),
    (torch.ones(3, 3), ValueError, r"shape \[\], \[1\], \[n_blocks\] = \[2\] or \[P\] = \[43\]"),
    (torch.ones(4), ValueError, r"\[n_blocks\] = \[2\]"), ("1", TypeError, "positive float or a tensor"),
    (True, TypeError, "positive float or a tensor"),
])
def test_bad_prior_precision(value, exc, text):
    with pytest.raises(exc, match=f"prior_precision.*{text}"):
        Laplace(mlp(), prior_precision=value)
    la, *_ = fitted()
    before = snapshot(la)
    with pytest.raises(exc, match=text):
        la.prior_precision = value
    with pytest.raises(exc, match=text):
        la.log_marginal_likelihood(prior_precision=value)
    assert_same(before, snapshot(la))


def test_diag_prior_needs_diag_or_full():
    P = 43
    with pytest.raises(ValueError, match=r"hessian_structure='kron' takes a scalar or a per-block.*'diag' or 'full'"):
        Laplace(mlp(), prior_precision=torch.ones(P, dtype=DT))
    la, *_ = fitted("kron")
    with pytest.raises(ValueError, match="prior_structure='diag' does not fit hessian_structure='kron'"):
        la.optimize_prior_precision("marglik", "diag")
    d = torch.linspace(0.5, 2.0, P, dtype=DT)
    for structure in ("diag", "full"):
        la, model, X, y = fitted(structure, prior_precision=d)
        H = ref.exact_curvature(model, loader_of(X, y), "classification")
        H = H if structure == "full" else torch.diag(H.diagonal())
        torch.testing.assert_close(la.to_dense(), H + torch.diag(d), rtol=1e-10, atol=1e-12)
        # the evidence by hand: log p(D | theta) - 1/2 (log det P - sum log d + theta^T diag(d) theta)
        theta = ref.flat(model)
        loglik = -F.cross_entropy(ref.outputs(model, X), y, reduction="sum")
        lml = loglik - 0.5 * (torch.linalg.slogdet(H + torch.diag(d))[1] - d.log().sum() + (d * theta ** 2).sum())
        assert math.isclose(float(la.log_marginal_likelihood()), float(lml), rel_tol=1e-10)


@pytest.mark.parametrize("likelihood, out, y, exc, text", [
    ("classification", 3, lambda y: y.to(DT), ValueError, r"class indices \[N\] \(an integer tensor\)"),
    ("classification", 3, lambda y: y + 3, ValueError, r"class indices in \[0, 3\)"),
    ("classification", 3, lambda y: y - 5, ValueError, r"class indices in \[0, 3\)"),
    ("classification", 3, lambda y: y[:, None], ValueError, r"class indices \[N\]"),
    ("classification", 3, lambda y: y > 0, ValueError, r"integer tensor\), got \(10,\) torch.bool"),
    ("classification", 3, lambda y: y[:4], ValueError, "one target per input row"),
    ("binary", 1, lambda y: y + 1, ValueError, "targets 0 or 1"),
    ("binary", 1, lambda y: y * 0.5, ValueError, "targets 0 or 1"),
    ("binary", 1, lambda y: y[:, None].expand(-1, 2), ValueError, r"targets \[N\] or \[N, 1\], got \(10, 2\)"),
    ("regression", 2, lambda y: y[:, 0], ValueError, r"the outputs' shape \(10, 2\), got \(10,\)"),
    ("regression", 2, lambda y: torch.cat([y, y], 1), ValueError, r"the outputs' shape \(10, 2\), got \(10, 4\)"),
    ("regression", 2, lambda y: y * math.nan, ValueError, "NaN or infinity"),
    ("regression", 2, lambda y: y * math.inf, ValueError, "NaN or infinity"),
])
def test_bad_targets_leave_the_previous_fit_intact(likelihood, out, y, exc, text):
    la, model, X, yy = fitted("kron", likelihood, out)
    before = snapshot(la)
    bad = loader_of(X, yy)
    bad[1] = (bad[1][0], y(bad[1][1]))  # the second batch is bad: the first was already accumulated
    with pytest.raises(exc, match=text):
        la.fit(bad, progress=False)
    assert_same(before, snapshot(la))
    assert all(not m._forward_hooks for m in model.modules())  # the recording hooks are gone


def test_bad_output_shapes():
    X, y = data()
    with pytest.raises(ValueError, match=r"C >= 2.*likelihood='binary'"):
        Laplace(mlp(1)).fit([(X, y)], progress=False)
    with pytest.raises(ValueError, match=r"one logit per row.*likelihood='classification'"):
        Laplace(mlp(3), "binary").fit([(X, y.to(DT) * 0)], progress=False)
    with pytest.raises(ValueError, match="sigma_noise is the regression noise"):
        Laplace(mlp(3), sigma_noise=0.5)


def _overflowing_gradients():
    """Finite outputs and loss, but output gradients of the first layer ~1e200: G = sum g g^T = inf."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)).to(DT)
    with torch.no_grad():
        model[0].weight.fill_(1e-250)
        model[0].bias.zero_()
        model[1].weight.normal_().mul_(1e200)
    return model


class ShiftByInfinity(nn.Module):
    """Regression outputs +inf for rows whose first input exceeds 100: the curvature stays finite
    (the shift has no parameters), the loss does not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) + torch.where(x[:, :1] > 100, math.inf, 0.0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_non_finite_curvature_or_loss_is_refused_and_changes_nothing(structure):
    X, y = data()
    model = _overflowing_gradients()
    with pytest.raises(RuntimeError, match=r"curvature of block '(0.weight\+bias|full)' is not finite"):
        Laplace(model, hessian_structure=structure).fit([(X, y)], progress=False)
    model = ShiftByInfinity().to(DT)
    yr = torch.randn(30, 2, dtype=DT)
    la = Laplace(model, "regression", hessian_structure=structure).fit([(X, yr)], progress=False)
    before = snapshot(la)
    Xb = X.clone()
    Xb[3, 0] = 1000.0
    with pytest.raises(RuntimeError, match="loss .* is inf \\(not finite\\)"):
        la.fit([(X, yr), (Xb, yr)], progress=False)
    assert_same(before, snapshot(la))
    # logits that are NaN (classification)
    la, model, X, y = fitted(structure)
    before = snapshot(la)
    with pytest.raises(RuntimeError, match="not finite"):
        la.fit([(X * math.nan, y)], progress=False)
    assert_same(before, snapshot(la))


def test_other_bad_arguments_name_themselves():
    la, model, X, y = fitted()
    for kw, text in [(dict(likelihood="poisson"), "likelihood must be one of"),
                     (dict(hessian_structure="block"), "hessian_structure must be one of"),
                     (dict(curvature="hessian"), "curvature must be one of"),
                     (dict(kfac_approx="mean"), "kfac_approx must be one of"),
                     (dict(temperature=0.0), "temperature must be a finite number > 0"),
                     (dict(sigma_noise=-1.0), "sigma_noise must be a finite number > 0")]:
        with pytest.raises(ValueError, match=text):
            Laplace(model, **kw)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        la.sample(-1)
    assert la.sample(0).shape == (0, 43)
    with pytest.raises(ValueError, match="link_approx must be one of"):
        la(X, link_approx="sigmoid")
    with pytest.raises(ValueError, match="pred_type must be one of"):
        la.predict(X, pred_type="lin")
    with pytest.raises(ValueError, match="built for likelihood='classification', got 'regression'"):
        la.predict(X, likelihood="regression")
    with pytest.raises(TypeError, match="pred_type='glm' takes no"):
        la.predict(X, bn_loader=[X])
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision("bayes")
    with pytest.raises(ValueError, match="tune_sigma=True needs likelihood='regression'"):
        la.optimize_prior_precision("marglik", tune_sigma=True)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_noise_and_temperature_scale_the_curvature_and_the_evidence(structure):
    """P = H / (sigma^2 T) + delta I and log p(D) ~= -loss / (sigma^2 T) - N C log(sigma sqrt(2 pi))
    - 1/2 (log det P - P log delta + delta |theta|^2), by hand on a regression MLP."""
    sigma, temp, delta = 0.5, 2.0, 0.7
    la, model, X, y = fitted(structure, "regression", out=2, sigma_noise=sigma, temperature=temp,
                             prior_precision=delta)
    base, *_ = fitted(structure, "regression", out=2, prior_precision=delta)
    H = base.to_dense() - delta * torch.eye(base.n_params, dtype=DT)  # sigma = T = 1
    P = H / (sigma ** 2 * temp) + delta * torch.eye(la.n_params, dtype=DT)
    torch.testing.assert_close(la.to_dense(), P, rtol=1e-10, atol=1e-12)
    f = ref.outputs(model, X)
    loss = 0.5 * (f - y).square().sum()
    theta = ref.flat(model)
    lml = (-loss / (sigma ** 2 * temp) - 30 * 2 * math.log(sigma * math.sqrt(2 * math.pi))
           - 0.5 * (torch.linalg.slogdet(P)[1] - la.n_params * math.log(delta) + delta * theta.square().sum()))
    assert math.isclose(float(la.log_marginal_likelihood()), float(lml), rel_tol=1e-10)


# ---- state_dict -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip(structure, subset):
    la, model, X, y = fitted(structure, subset_of_weights=subset, prior_precision=0.7)
    la.optimize_prior_precision("marglik", "layerwise", n_steps=5)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    fresh = Laplace(model, hessian_structure=structure, subset_of_weights=subset)
    fresh.load_state_dict(torch.load(buf))
    assert float(fresh.log_marginal_likelihood()) == float(la.log_marginal_likelihood())
    assert torch.equal(fresh.prior_precision, la.prior_precision)
    torch.testing.assert_close(fresh(X), la(X), rtol=0, atol=0)
    torch.testing.assert_close(fresh.to_dense(), la.to_dense(), rtol=0, atol=0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(fresh.sample(4, generator=g()), la.sample(4, generator=g()))
    # another architecture / another configuration is refused, and the target stays unfitted
    other = Laplace(mlp(4), hessian_structure=structure, subset_of_weights=subset)
    with pytest.raises(ValueError, match="other trainable parameters"):
        other.load_state_dict(la.state_dict())
    other = Laplace(model, hessian_structure=structure, subset_of_weights=subset, curvature="ef")
    with pytest.raises(ValueError, match="state_dict was saved by a Laplace with"):
        other.load_state_dict(la.state_dict())
    with pytest.raises(RuntimeError, match="not fitted"):
        other.log_marginal_likelihood()


# ---- predictives ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predict_is_aleatoric_plus_epistemic(structure):
    la, model, X, y = fitted(structure, "regression", out=2, sigma_noise=0.3)
    Xs = X[:6]
    pred = la.predict(Xs)
    assert isinstance(pred, RegressionPredictive)
    J = ref.jacobians(model, Xs)
    epi = torch.diagonal(ref.logits_var(J, torch.linalg.inv(la.to_dense())), dim1=1, dim2=2)
    torch.testing.assert_close(pred.mean, ref.outputs(model, Xs))
    torch.testing.assert_close(pred.epistemic, epi, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(pred.aleatoric, torch.full((6, 2), 0.09, dtype=DT))
    torch.testing.assert_close(pred.variance, 0.09 + epi, rtol=1e-9, atol=1e-13)
    # pred_type='nn': the moments of the outputs over draws, plus sigma^2
    n = 50
    nn_pred = la.predict(Xs, n, pred_type="nn", generator=torch.Generator().manual_seed(4))
    f = _outputs_at_draws(la, model, Xs, n, 4)
    torch.testing.assert_close(nn_pred.mean, f.mean(0))
    torch.testing.assert_close(nn_pred.epistemic, f.var(0, unbiased=False))
    torch.testing.assert_close(nn_pred.variance, f.var(0, unbiased=False) + 0.09)
    # la(x, pred_type='nn') returns what laplace-torch does: (samples.mean(0), samples.var(0)), unbiased
    f_mu, f_var = la(Xs, pred_type="nn", n_samples=n, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(f_mu, f.mean(0))
    torch.testing.assert_close(f_var, f.var(0))


def _outputs_at_draws(la, model, X, n, seed):
    """[n, N, C] outputs at the draws of ``la.sample`` with the same generator, by hand."""
    draws = la.sample(n, generator=torch.Generator().manual_seed(seed))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    outs = []
    with torch.no_grad():
        for theta in draws:
            params = {k: t.view(s) for k, t, s in zip(names, theta.split([math.prod(s) for s in shapes]), shapes)}
            with ref.eval_mode(model):
                outs.append(functional_call(model, params, (X,)).reshape(X.shape[0], -1))
    return torch.stack(outs)


@pytest.mark.parametrize("likelihood, out", [("classification", 3), ("binary", 1)])
def test_nn_predictive_is_the_model_average_by_hand(likelihood, out):
    la, model, X, y = fitted("kron", likelihood, out, prior_precision=0.5)
    if likelihood == "binary":
        assert la(X).shape == (30,)
    n = 40
    got = la.predict(X, n, pred_type="nn", generator=torch.Generator().manual_seed(7))
    f = _outputs_at_draws(la, model, X, n, 7)
    want = f.softmax(-1).mean(0) if likelihood == "classification" else f[..., 0].sigmoid().mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert float((f.softmax(-1).std(0) if out > 1 else f.std(0)).max()) > 1e-3  # the draws differ
    torch.testing.assert_close(la(X, pred_type="nn", n_samples=n, generator=torch.Generator().manual_seed(7)), want,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("likelihood, out", [("classification", 3), ("binary", 1), ("regression", 2)])
def test_predictive_samples_are_the_draws_of_the_predictives(likelihood, out):
    """laplace-torch's predictive_samples: 'nn' = the outputs at la.sample's draws (same generator);
    'glm' = f ~ N(f_mu, f_var): its mean is the 'mc' link's probabilities for the same generator,
    and for regression the draws' moments converge to (f_mu, f_var)."""
    la, model, X, y = fitted("kron", likelihood, out, prior_precision=0.5)
    link = (lambda f: f.softmax(-1)) if likelihood == "classification" else (
        (lambda f: f[..., 0].sigmoid()) if likelihood == "binary" else (lambda f: f))
    n = 40
    got = la.predictive_samples(X, "nn", n, generator=torch.Generator().manual_seed(7), batch_size=7)
    want = link(_outputs_at_draws(la, model, X, n, 7))
    assert got.shape == want.shape == ((n, 30, out) if likelihood != "binary" else (n, 30))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got = la.predictive_samples(X, n_samples=n, generator=torch.Generator().manual_seed(3))
    assert got.shape == want.shape
    if likelihood != "regression":
        mc = la(X, link_approx="mc", n_samples=n, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got.mean(0), mc, rtol=1e-12, atol=1e-14)
        return
    f = la.predictive_samples(X, n_samples=20000, generator=torch.Generator().manual_seed(3))
    f_mu, f_var = la(X)
    centred = f - f_mu
    cov = torch.einsum("sni,snj->nij", centred, centred) / f.shape[0]
    scale = torch.diagonal(f_var, dim1=1, dim2=2).sqrt()
    assert float(((f.mean(0) - f_mu) / scale).abs().max()) < 5 / math.sqrt(f.shape[0])  # 5 standard errors
    torch.testing.assert_close(cov, f_var, rtol=0.05, atol=0.05 * float(f_var.diagonal(0, 1, 2).max()))
    with pytest.raises(ValueError, match="pred_type"):
        la.predictive_samples(X, "mc")
    with pytest.raises(ValueError, match="n_samples"):
        la.predictive_samples(X, n_samples=0)


@pytest.mark.parametrize("structure, subset", [("kron", "all"), ("diag", "all"), ("full", "all"), ("lowrank", "all"),
                                               ("kron", "last_layer"), ("full", "last_layer")])
def test_posterior_variance_log_dets_and_scatter_are_the_dense_ones(structure, subset):
    """posterior_variance = diag(P^-1), log_det_posterior_precision = log det P of to_dense(),
    log_det_prior_precision / scatter of the per-weight prior, and the evidence is their sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure,
                 prior_mean=0.1, temperature=0.7, **({"low_rank": 6} if structure == "lowrank" else {}))
    la.fit(loader_of(X, y), progress=False)
    if structure != "lowrank":  # one prior per block (lowrank takes one scalar)
        la.prior_precision = torch.linspace(0.5, 2.0, len(la.block_names), dtype=DT)
    P = la.to_dense()
    torch.testing.assert_close(la.posterior_variance, torch.linalg.inv(P).diagonal(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(la.posterior_covariance, torch.linalg.inv(P), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.log_det_posterior_precision, torch.linalg.slogdet(P)[1], rtol=1e-10, atol=1e-10)
    prior = torch.as_tensor(la.prior_precision, dtype=DT)
    per_weight = torch.empty(len(la.positions), dtype=DT)  # the prior of each covered weight
    for i, b in enumerate(la.blocks):
        per_weight[b.sel.reshape(-1)] = prior.reshape(-1)[i if prior.numel() > 1 else 0]
    d = la.mean[la.positions] - 0.1
    torch.testing.assert_close(la.log_det_prior_precision, torch.log(per_weight).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(la.scatter, (per_weight * d.square()).sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(la.log_det_ratio, la.log_det_posterior_precision - la.log_det_prior_precision)
    torch.testing.assert_close(la.log_marginal_likelihood(),
                               la.log_likelihood() - 0.5 * (la.log_det_ratio + la.scatter), rtol=1e-12, atol=1e-12)


def test_modes_restored_and_fit_in_eval_mode():
    X, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model.train()
    model[3].eval()
    modes = [m.training for m in model.modules()]
    la = Laplace(model, hessian_structure="full").fit(loader_of(X, y), progress=False)
    assert [m.training for m in model.modules()] == modes
    # dropout was off: the curvature is the deterministic eval-mode one
    H = ref.exact_curvature(model, loader_of(X, y), "classification")
    torch.testing.assert_close(la.to_dense() - torch.eye(43, dtype=DT), H, rtol=1e-10, atol=1e-12)
    la.predict(X)
    la.predict(X, 3, pred_type="nn")
    la(X, link_approx="mc", n_samples=3)
    la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], grid_size=2)
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(ValueError):
        la.fit([(X, y.to(DT))], progress=False)
    assert [m.training for m in model.modules()] == modes


# ---- curvature types ------------------------------------------------------------------------------------------
def _per_example_loss_grads(model, X, y, likelihood):
    """[N, P] gradients of each example's loss (torch.func.grad of F's losses; sigma = 1)."""
    named = [(k, p.detach()) for k, p in model.named_parameters()]

    def loss(params, x, t):
        f = functional_call(model, params, (x.unsqueeze(0),)).reshape(1, -1)
        if likelihood == "classification":
            return F.cross_entropy(f, t.reshape(1))
        if likelihood == "binary":
            return F.binary_cross_entropy_with_logits(f[:, 0], t.reshape(1))
        return 0.5 * (f - t.reshape(1, -1)).square().sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(dict(named), X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k, _ in named], 1)


@pytest.mark.parametrize("likelihood, out", [("classification", 3), ("binary", 1), ("regression", 2)])
def test_empirical_fisher_is_the_sum_of_gradient_outer_products(likelihood, out):
    model = mlp(out)
    if likelihood == "binary":
        model = nn.Sequential(model, nn.Flatten(0))
    X, y = data(likelihood=likelihood, C=out)
    Gn = _per_example_loss_grads(model, X, y, likelihood)
    EF = Gn.T @ Gn
    for structure in ("full", "diag"):
        la = Laplace(model, likelihood, hessian_structure=structure, curvature="ef").fit(loader_of(X, y),
                                                                                         progress=False)
        got = la.to_dense() - torch.eye(EF.shape[0], dtype=DT)
        torch.testing.assert_close(got, EF if structure == "full" else torch.diag(EF.diagonal()), rtol=1e-10,
                                   atol=1e-12)


def test_mc_fisher_converges_to_the_ggn():
    """'mc_fisher' with S sampled labels per input estimates F_n = E_y[g g^T] (g = J_n^T (p - e_y));
    its entries' standard deviation is computed EXACTLY here by enumerating the C labels:
    sd_pq = sqrt(sum_n Var_y[u_p u_q] / S), u = J_n^T (p_n - e_y). Every entry must lie within 6 sd
    of the GGN (P^2 = 1849 entries: a false alarm has probability ~ 1849 * 2e-9), and the
    estimate with S = 1 must be visibly off (the test sees the sampling)."""
    model = mlp()
    X, y = data(n=12)
    loader = loader_of(X, y, 6)
    ggn = Laplace(model, hessian_structure="full").fit(loader, progress=False).to_dense()
    J = ref.jacobians(model, X)  # [N, C, P]
    p = torch.softmax(ref.outputs(model, X), -1)
    C = p.shape[1]
    U = torch.einsum("ncp,nyc->nyp", J, p[:, None, :] - torch.eye(C, dtype=DT)[None])  # u for every label y
    prod = U[:, :, :, None] * U[:, :, None, :]  # [N, y, P, P]
    mean = torch.einsum("ny,nypq->npq", p, prod)
    var = torch.einsum("ny,nypq->npq", p, prod.square()) - mean.square()
    torch.testing.assert_close(mean.sum(0) + torch.eye(43, dtype=DT), ggn, rtol=1e-10, atol=1e-12)
    for S in (1, 4000):
        la = Laplace(model, hessian_structure="full", curvature="mc_fisher", mc_samples=S).fit(
            loader, progress=False, generator=torch.Generator().manual_seed(S))
        sd = (var.sum(0) / S).sqrt()
        err = (la.to_dense() - ggn).abs()
        if S == 1:
            assert float(err.max()) > 0.05
        else:
            assert (err <= 6 * sd + 1e-12).all()
            assert float(sd.max()) < 0.02 * float(ggn.abs().max())  # and 6 sd is a tight bound


# ---- prior tuning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood, out", [("classification", 3), ("regression", 2)])
def test_gridsearch_picks_the_lowest_validation_nll(likelihood, out):
    la, model, X, y = fitted("kron", likelihood, out, sigma_noise=0.8 if likelihood == "regression" else 1.0)
    Xv, yv = data(n=15, seed=1, likelihood=likelihood, C=out)
    grid = torch.logspace(-2, 3, 6, dtype=torch.float64).tolist()
    J = ref.jacobians(model, Xv)
    f = ref.outputs(model, Xv)
    nlls = []
    for delta in grid:
        la.prior_precision = delta
        V = ref.logits_var(J, torch.linalg.inv(la.to_dense()))
        d = torch.diagonal(V, dim1=1, dim2=2)
        if likelihood == "classification":
            prob = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * d), -1)
            nlls.append(float(-prob[torch.arange(15), yv].log().mean()))
        else:
            var = d + 0.64
            nlls.append(float((0.5 * (torch.log(2 * math.pi * var) + (yv - f).square() / var)).sum(1).mean()))
    best = min(range(len(grid)), key=nlls.__getitem__)
    assert max(nlls) - min(nlls) > 1e-3  # the grid matters
    got = la.optimize_prior_precision("gridsearch", val_loader=loader_of(Xv, yv, 7), log_prior_prec_range=(-2, 3),
                                      grid_size=6)
    assert math.isclose(float(got), grid[best], rel_tol=1e-12)
    assert math.isclose(float(la.prior_precision), grid[best], rel_tol=1e-12)


@pytest.mark.parametrize("structure, prior_structure", [("kron", "scalar"), ("kron", "layerwise"),
                                                        ("diag", "layerwise"), ("diag", "diag"),
                                                        ("full", "layerwise"), ("full", "diag")])
def test_marglik_tuning_raises_the_evidence(structure, prior_structure):
    la, *_ = fitted(structure, prior_precision=1.0)
    before = float(la.log_marginal_likelihood())
    prior = la.optimize_prior_precision("marglik", prior_structure, n_steps=60, lr=0.1)
    shape = {"scalar": (), "layerwise": (2,), "diag": (43,)}[prior_structure]
    assert prior.shape == shape and bool((prior > 0).all())
    after = float(la.log_marginal_likelihood())
    assert after > before + 0.5
    # a local maximum in every coordinate direction of log delta
    for k in range(max(1, prior.numel()) if prior_structure != "diag" else 0):
        for factor in (0.8, 1.25):
            moved = prior.clone().reshape(-1)
            moved[k] *= factor
            assert float(la.log_marginal_likelihood(moved.reshape(shape))) <= after + 1e-3
        la.prior_precision = prior


# ---- torch.distributed ----------------------------------------------------------------------------------------
def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = _fit_all(_shards()[rank])
        # the grid search scores each rank's validation shard (rank 1's: empty) and all-reduces
        Xv, yv = data(n=24, seed=5)
        la = Laplace(mlp()).fit(_shards()[rank], progress=False)
        results["grid"] = float(la.optimize_prior_precision(
            "gridsearch", val_loader=[(Xv, yv)] if rank == 0 else [], grid_size=9))
        results["grid_split"] = float(la.optimize_prior_precision(
            "gridsearch", val_loader=[(Xv[:7], yv[:7])] if rank == 0 else [(Xv[7:], yv[7:])], grid_size=9))
        # online fitting: the second fit's all-reduced part is added once, not once per process
        online = Laplace(mlp(), prior_precision=0.6).fit(_shards()[rank], progress=False)
        results["online"] = online.fit(_shards()[rank], progress=False, override=False).to_dense()
        # an error on one process (rank 1: an empty loader) must stop every process, not leave the
        # others waiting in the all-reduce
        try:
            Laplace(mlp()).fit(_shards()[0] if rank == 0 else [], progress=False)
            results["error"] = None
        except (ValueError, RuntimeError) as e:
            results["error"] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _shards():
    """Two unequal shards of 2 and 1 batches (the union is the single process's data)."""
    X, y = data(n=25)
    return [[(X[:8], y[:8]), (X[8:15], y[8:15])], [(X[15:], y[15:])]]


# every structure, and a subnetwork Laplace (its curvature is all-reduced the same way)
_DIST_CASES = {**{s: dict(hessian_structure=s) for s in STRUCTURES},
               "subnetwork": dict(subset_of_weights="subnetwork", hessian_structure="full",
                                  subnetwork_indices=torch.arange(3, 43, 3))}


def _fit_all(loader):
    out = {}
    for structure, kw in _DIST_CASES.items():
        la = Laplace(mlp(), prior_precision=0.6, **kw).fit(loader, progress=False)
        out[structure] = dict(lml=float(la.log_marginal_likelihood()), dense=la.to_dense(), n=la.n_data,
                              f_var=la.functional_variance(data(n=4, seed=2)[0])[1])
    return out


def test_distributed_fit_equals_one_process_on_the_union():
    ranks = spawn_gloo(_distributed_worker, 2)
    assert ranks[0]["error"].startswith("RuntimeError: Laplace.fit failed on another process"), ranks[0]["error"]
    assert ranks[1]["error"].startswith("ValueError: fit: the loader yielded no batches"), ranks[1]["error"]
    union = _fit_all([b for shard in _shards() for b in shard])
    alone = _fit_all(_shards()[0])
    Xv, yv = data(n=24, seed=5)
    la = Laplace(mlp()).fit([b for shard in _shards() for b in shard], progress=False)
    want_grid = float(la.optimize_prior_precision("gridsearch", val_loader=[(Xv, yv)], grid_size=9))
    for got in ranks:  # the union's choice on every rank (each rank chose by its own shard before)
        assert got["grid"] == want_grid and got["grid_split"] == want_grid
    both = [b for shard in _shards() for b in shard]
    online = Laplace(mlp(), prior_precision=0.6).fit(both, progress=False).fit(both, progress=False, override=False)
    for got in ranks:
        torch.testing.assert_close(got["online"], online.to_dense(), rtol=1e-10, atol=1e-12)
    for structure in _DIST_CASES:
        want = union[structure]
        assert "error" not in want
        for got in ranks:
            g = got[structure]
            assert g["n"] == 25
            assert abs(g["lml"] - want["lml"]) <= 1e-10 * abs(want["lml"])
            torch.testing.assert_close(g["dense"], want["dense"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g["f_var"], want["f_var"], rtol=1e-9, atol=1e-12)
        assert abs(alone[structure]["lml"] - want["lml"]) > 1.0  # a shard alone is different


def test_glm_predictive_and_load_refuse_other_weights():
    """The GLM predictive linearises at the fitted MAP: weights changed after fit (or a state_dict
    saved at other weights) are refused instead of mixing two points."""
    X, y = data(n=20)
    model = mlp()
    la = Laplace(model).fit([(X, y)], progress=False)
    state = la.state_dict()
    before = la.la(X)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    with pytest.raises(RuntimeError, match="weights changed since the Laplace was fitted"):
        la.la(X)
    with pytest.raises(ValueError, match="saved at other weights"):
        Laplace(model).load_state_dict(state)
    la.layout.write_(la.mean)
    torch.testing.assert_close(la.la(X), before)


def test_posterior_covariance_refuses_a_dense_matrix_too_large(monkeypatch):
    """'kron' / 'lowrank' form P^-1 densely: refused above COVARIANCE_BYTES with what to use instead."""
    from pyfastbayes.laplace import laplace as laplace_mod
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    la = Laplace(model, "classification").fit(loader_of(X, y), progress=False)
    monkeypatch.setattr(laplace_mod, "COVARIANCE_BYTES", 3 * 8 * la.n_params ** 2 - 1)
    with pytest.raises(RuntimeError, match="posterior_covariance of 43 parameters.*posterior_variance"):
        la.posterior_covariance


def test_options_after_the_structure_are_keyword_only():
    """laplace-torch's positional order after hessian_structure is (sigma_noise, prior_precision, ...),
    ours was (prior_precision, sigma_noise, ...): a positional call would silently swap them."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    with pytest.raises(TypeError, match="positional"):
        Laplace(model, "regression", "all", "kron", 0.5, 2.0)


def test_an_unbatched_input_is_named_as_such():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    la = Laplace(model, "classification").fit(loader_of(X, y), progress=False)
    with pytest.raises(ValueError, match=r"x: the model returned 3 output rows for inputs of shape \(4,\): pass the "
                                         r"inputs as a batch \[N, ...\] \(one example: x.unsqueeze\(0\)\)"):
        la.la(X[0])
    torch.testing.assert_close(la.la(X[:1]), la.la(X)[:1])


def test_fit_takes_a_dataloader_over_an_iterable_dataset_without_length():
    """DataLoader has __len__, which raises TypeError for an IterableDataset without one: the
    progress bar's total is then unknown, the fit goes on."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(20):
                yield torch.randn(4, generator=g, dtype=DT), int(torch.randint(0, 3, (), generator=g))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    la = Laplace(model, "classification").fit(DataLoader(Stream(), batch_size=5), progress=True)
    X = torch.stack([x for x, _ in Stream()])
    y = torch.tensor([t for _, t in Stream()])
    want = Laplace(model, "classification").fit([(X, y)], progress=False)
    assert la.n_data == 20
    torch.testing.assert_close(la.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-14)


def test_a_squeezed_batch_of_one_gets_the_likelihood_message():
    """A regression model ending in .squeeze() turns the last batch of one row into a 0-dim
    output: the inputs ARE a batch, so the message is about the outputs' shape."""
    class Squeeze(nn.Module):
        def forward(self, x):
            return x.squeeze()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), Squeeze()).to(DT)
    X, y = torch.randn(11, 4, dtype=DT), torch.randn(11, dtype=DT)
    with pytest.raises(ValueError, match=r"needs outputs \[N\] or \[N, C\]; the model outputs \(\)"):
        Laplace(model, "regression", hessian_structure="full").fit([(X[:10], y[:10]), (X[10:], y[10:])],
                                                                   progress=False)


def test_last_layer_name():
    """laplace-torch's ``last_layer_name``: the named nn.Linear is covered, set up at construction
    (n_params and a per-weight prior before fit), the same posterior as the one found in fit; a
    name that is not an nn.Linear with trainable parameters, or with another subset, is refused;
    a state saved for another last layer is refused."""
    X, y = data(n=20)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    found = Laplace(model, "classification", "last_layer", "full").fit([(X, y)], progress=False)
    named = Laplace(model, "classification", "last_layer", "full", last_layer_name="4",
                    prior_precision=torch.ones(18, dtype=DT))
    assert named.n_params == 18 and named.last_layer_name == "4"
    named.fit([(X, y)], progress=False)
    torch.testing.assert_close(named.to_dense(), found.to_dense(), rtol=0, atol=0)
    middle = Laplace(model, "classification", "last_layer", "kron", last_layer_name="2").fit([(X, y)], progress=False)
    assert middle.n_params == 30 and middle.block_names == ["2.weight+bias"]  # (through the rest of the net)
    for name, exc, words in [("1", ValueError, "not an nn.Linear"), ("9", ValueError, "not a module"),
                             (2, TypeError, "module name")]:
        with pytest.raises(exc, match=words):
            Laplace(model, "classification", "last_layer", last_layer_name=name)
    with pytest.raises(ValueError, match="last_layer_name is for subset_of_weights='last_layer'"):
        Laplace(model, "classification", "all", last_layer_name="4")
    other = Laplace(model, "classification", "last_layer", "kron", last_layer_name="4")
    with pytest.raises(ValueError, match="saved for the last layer '2'"):
        other.load_state_dict(middle.state_dict())


def test_last_layer_name_against_laplace_torch():
    laplace = require("laplace", "laplace-torch's last_layer_name is the reference")
    X, y = data(n=30)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    for structure in ("full", "kron", "diag"):
        ours = Laplace(model, "classification", "last_layer", structure, last_layer_name="4", bias_block="separate",
                       prior_precision=0.7).fit([(X, y)], progress=False)
        theirs = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure,
                                 last_layer_name="4", prior_precision=0.7)
        theirs.fit(DataLoader(TensorDataset(X, y), batch_size=30))
        torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().detach(),
                                   rtol=1e-8, atol=1e-8)
