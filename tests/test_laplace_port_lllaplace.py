"""Ported from laplace-torch's own suite (tests/test_lllaplace.py at 44ea62a).

laplace-torch's last-layer Laplace tests (``FullLLLaplace`` / ``KronLLLaplace`` /
``DiagLLLaplace``) re-expressed against ``Laplace(model, likelihood, subset_of_weights='last_layer',
hessian_structure=...)``. Where the upstream test compares against a brute-force formula (log
likelihood, log marginal likelihood, last-layer Jacobians and J Sigma J^T), these tests build the
formula from scratch (torch.func Jacobians of the last layer, the exact GGN, the Kronecker factors)
and additionally check ours against laplace-torch itself where it is installed.

Conventions of ours that the ports follow (README, "Coming from laplace-torch", and the docstrings
of ``pyfastbayes.laplace.laplace``): options after ``hessian_structure`` are keyword-only; under
'kron' the default ``bias_block='joint'`` gives the last layer ONE block (a layerwise prior has one
entry), ``bias_block='separate'`` gives laplace-torch's two; ``mean`` and ``sample(n)`` span all
trainable parameters (the covered ones are ``[..., la.positions]``); the last layer is found in
``fit`` unless ``last_layer_name`` names it, so without it a 1-D prior's length is checked there;
``log_likelihood`` is a method and nothing is defined before ``fit``; a float16 / bfloat16
model's Laplace computes in float32 and returns float32.

Upstream tests left out:

- test_laplace_init (the ``la.H`` / ``_init_H`` part): backend Hessian internals we do not have;
  its API part (mean before fit) is in test_laplace_init_before_fit.
- test_laplace_large_init / test_laplace_large_init_nollname: need torchvision's
  wide_resnet50_2 (68 M weights; torchvision is not installed); the same intent (a last-layer
  Laplace of a conv net covers only its ``fc``) is in test_laplace_conv_net_last_layer_only.
- test_laplace_functionality's ``feature_reduction`` parametrisation and its
  ``FeatureExtractor`` / ``backend.last_layer_jacobians`` / ``functional_variance(Js)`` calls:
  laplace-torch internals (ours has no feature extractor or backends; the reduction lives in the
  model); the values they check are compared against our public API.
- test_functional_variance_fast: ``functional_variance_fast`` does not exist in ours; the same
  diagonal predictive variance is checked through ``predict(x).epistemic``.
- test_backprop_glm_joint and test_reg_glm_predictive_correct_behavior (``joint=True``,
  ``diagonal_output``): ported in test_laplace_port_baselaplace_predictive.py (all weights) and
  test_laplace_backprop_and_half.py (also last-layer, against brute force).
- test_dtype's ``backend`` parametrisation (Asdl / BackPack / Curvlinops, EF / GGN): ours has no
  backends; the dtypes are ported (``curvature='ggn'`` and ``'ef'``).
"""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal
from torch.utils.data import DataLoader, TensorDataset

from pyfastbayes.laplace import Laplace

STRUCTURES = ["full", "kron", "diag"]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_default_dtype(old)


def _mlp():
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2))


class _Reduced(nn.Module):
    """The upstream ``model_with_reduction``: inputs [N, 6, 3], mean over the 6 positions before the
    last layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).mean(1))


@pytest.fixture
def model():
    return _mlp()


def _loader(kind, multidim=False):
    X = torch.randn(10, 6, 3) if multidim else torch.randn(10, 3)
    y = torch.randint(2, (10,)) if kind == "classification" else torch.randn(10, 2)
    return DataLoader(TensorDataset(X, y), batch_size=3)


@pytest.fixture
def class_loader():
    return _loader("classification")


@pytest.fixture
def reg_loader():
    return _loader("regression")


def _lap(model, likelihood, structure, **kw):
    return Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure=structure, **kw)


def _fit(model, likelihood, structure, loader, **kw):
    return _lap(model, likelihood, structure, **kw).fit(loader, progress=False)


# ---- brute force ----------------------------------------------------------------------------------------
def _last_layer_names(model, layer):
    return [f"{layer}.{k}" for k, _ in getattr(model, layer).named_parameters()]


def _jacobians(model, layer, X):
    """(J [N, C, P_c], f [N, C]) of the outputs in the last layer's parameters (weight row-major, then
    bias: laplace-torch's parameters_to_vector order), by torch.func."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = _last_layer_names(model, layer)

    def f(sub):
        return torch.func.functional_call(model, {**params, **sub}, (X,))

    J = torch.func.jacrev(f)({k: params[k] for k in names})
    out = f({k: params[k] for k in names}).detach()
    N, C = out.shape
    return torch.cat([J[k].reshape(N, C, -1) for k in names], -1), out


def _features(model, layer, X):
    """The last layer's inputs [N, H]."""
    seen = []
    h = getattr(model, layer).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(X)
    finally:
        h.remove()
    return seen[0]


def _output_hessians(f, likelihood, sigma):
    """The loss Hessian in the outputs per row [N, C, C] (softmax: diag(p) - p p^T; Gaussian: I / sigma^2)."""
    N, C = f.shape
    if likelihood == "classification":
        p = f.softmax(-1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.eye(C).expand(N, C, C) / sigma ** 2


def _brute_curvature(model, layer, X, f, J, likelihood, sigma, structure, bias_block):
    """The likelihood curvature over the last layer in flat order: the exact GGN ('full'), its
    diagonal ('diag'), or KFAC kron(sum_n Lambda_n, mean_n a a^T) with the bias joined to the
    activations or as its own block ('kron')."""
    Lam = _output_hessians(f, likelihood, sigma)
    if structure in ("full", "diag"):
        H = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
        return H if structure == "full" else torch.diag(torch.diag(H))
    phi = _features(model, layer, X)
    N, Hd = phi.shape
    C = f.shape[1]
    G = Lam.sum(0)
    P = C * Hd + C
    out = torch.zeros(P, P)
    if bias_block == "separate":
        out[: C * Hd, : C * Hd] = torch.kron(G, phi.T @ phi / N)
        out[C * Hd:, C * Hd:] = G
        return out
    a = torch.cat([phi, torch.ones(N, 1)], 1)
    idx = torch.tensor([c * Hd + h if h < Hd else C * Hd + c for c in range(C) for h in range(Hd + 1)])
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G, a.T @ a / N)
    return out


def _dense_precision(la, structure):
    pp = la.posterior_precision
    if structure == "full":
        return pp
    if structure == "diag":
        return torch.diag(pp)
    return la.to_dense()


# ---- construction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_before_fit(structure, model, class_loader):
    """Upstream test_laplace_init / test_laplace_init_nollname: with the last layer not yet known
    there is no mean. Ours finds the layer in fit: before it ``mean`` is refused (RuntimeError, not
    None), the prior is the constructor's; after it ``mean[positions]`` is the last layer's
    parameters."""
    la = _lap(model, "classification", structure)
    with pytest.raises(RuntimeError, match="fit"):
        la.mean
    with pytest.raises(RuntimeError, match="fit"):
        la.block_names
    assert float(la.prior_mean) == 0.0 and float(la.prior_precision) == 1.0
    la.fit(class_loader, progress=False)
    assert la.last_layer_name == "1"
    theta = torch.cat([p.detach().reshape(-1) for p in model[1].parameters()])
    assert la.n_params == theta.numel() == 42
    torch.testing.assert_close(la.mean[la.positions], theta, rtol=0, atol=0)
    torch.testing.assert_close(la.mean, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_with_last_layer_name(model, class_loader, structure):
    """Upstream test_laplace_init (``last_layer_name='1'``): the layer is set up at construction
    (laplace-torch then sets mean = prior_mean; ours refuses ``mean`` before fit, as without the
    name), its parameter count and a per-weight prior are known before fit, and the fit equals
    the one that finds the layer itself."""
    la = _lap(model, "classification", structure, last_layer_name="1")
    assert la.n_params == 42 and la.last_layer_name == "1"
    with pytest.raises(RuntimeError, match="fit"):
        la.mean
    if structure != "kron":
        _lap(model, "classification", structure, last_layer_name="1", prior_precision=torch.ones(42))
        with pytest.raises(ValueError):
            _lap(model, "classification", structure, last_layer_name="1", prior_precision=torch.ones(41))
    la.fit(class_loader, progress=False)
    found = _fit(model, "classification", structure, class_loader)
    torch.testing.assert_close(la.to_dense(), found.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_laplace_conv_net_last_layer_only(structure):
    """Upstream test_laplace_large_init (a wide ResNet with last layer 'fc'), on a small conv net:
    only ``fc`` is covered, and nothing of the convolutional body enters the posterior."""
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3),
                                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("fc", nn.Linear(32, 10))
    X, y = torch.randn(6, 3, 12, 12), torch.randint(10, (6,))
    la = _fit(net, "classification", structure, [(X[:3], y[:3]), (X[3:], y[3:])])
    assert la.last_layer_name == "fc"
    assert la.n_params == 32 * 10 + 10
    assert la.posterior_variance.shape == (330,)
    draws = la.sample(3)
    body = torch.ones(draws.shape[1], dtype=torch.bool)
    body[la.positions] = False
    assert torch.equal(draws[:, body], la.mean[body].expand(3, -1))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_invalid_likelihood(structure, model):
    with pytest.raises(ValueError, match="likelihood"):
        _lap(model, "otherlh", structure)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_noise(structure, model):
    for sigma in (1.2, torch.tensor(1.2), torch.tensor(1.2).reshape(-1)):
        la = _lap(model, "regression", structure, sigma_noise=sigma)
        assert float(la.sigma_noise) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="sigma_noise"):
        _lap(model, "classification", structure, sigma_noise=1.2)
    # upstream refuses a [1, 1] tensor; ours takes any one-value tensor as the scalar it holds
    # (its documented "a float or a one-value tensor"), which is harmless: the same sigma
    la = _lap(model, "regression", structure, sigma_noise=torch.tensor(1.2).reshape(1, 1))
    assert la.sigma_noise.shape == () and float(la.sigma_noise) == pytest.approx(1.2)
    # a string: ours raises TypeError (the wrong type) where upstream raises ValueError
    with pytest.raises(TypeError, match="sigma_noise"):
        _lap(model, "regression", structure, sigma_noise="1.2")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_precision(structure, model, reg_loader):
    P = 20 * 2 + 2
    for prec in (10.6, torch.tensor(10.6), torch.tensor(10.7).reshape(-1)):
        _fit(model, "regression", structure, reg_loader, prior_precision=prec)
    per_param = torch.full((P,), 10.7)
    if structure == "kron":  # one value per Kronecker block only
        with pytest.raises(ValueError, match="kron"):
            _fit(model, "regression", structure, reg_loader, prior_precision=per_param)
    else:
        la = _fit(model, "regression", structure, reg_loader, prior_precision=per_param)
        assert la.prior_precision.shape == (P,)
    # per layer: laplace-torch's two parameter groups (weight, bias) are two blocks with
    # bias_block='separate'; the default 'joint' makes the layer one block (README), so [2] is refused
    la = _fit(model, "regression", structure, reg_loader, prior_precision=torch.full((2,), 10.7),
              bias_block="separate")
    assert la.block_names == ["1.weight", "1.bias"] and la.prior_precision.shape == (2,)
    la = _fit(model, "regression", structure, reg_loader, prior_precision=torch.full((1,), 10.7))
    assert len(la.block_names) == 1
    with pytest.raises(ValueError, match="prior_precision"):
        _fit(model, "regression", structure, reg_loader, prior_precision=torch.full((2,), 10.7))
    # too many dimensions: refused at construction
    with pytest.raises(ValueError, match="prior_precision"):
        _lap(model, "regression", structure, prior_precision=torch.tensor(10.6).reshape(1, 1))
    # a length that fits nothing: the last layer is found in fit, so the length is checked there
    with pytest.raises(ValueError, match="prior_precision"):
        _fit(model, "regression", structure, reg_loader, prior_precision=torch.full((17,), 10.6))
    # a string: TypeError in ours (upstream ValueError)
    with pytest.raises(TypeError, match="prior_precision"):
        _lap(model, "regression", structure, prior_precision="1.5")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_prior_mean_and_scatter(structure, model, class_loader):
    P = 20 * 2 + 2
    means = [1.0, torch.ones(1), torch.ones(1)[0], torch.ones(P)]
    laps = [_lap(model, "classification", structure, prior_precision=1e-2, prior_mean=m) for m in means]
    torch.testing.assert_close(laps[0].prior_mean.reshape(-1), torch.ones(1))
    torch.testing.assert_close(laps[1].prior_mean, torch.ones(1))
    torch.testing.assert_close(laps[2].prior_mean, torch.tensor(1.0))
    torch.testing.assert_close(laps[3].prior_mean, torch.ones(P))
    for la in laps:
        la.fit(class_loader, progress=False)
    expected = laps[0].scatter
    assert expected.ndim == 0
    theta = torch.cat([p.detach().reshape(-1) for p in model[1].parameters()])
    torch.testing.assert_close(expected, 1e-2 * (theta - 1).square().sum())  # brute force
    for la in laps[1:]:
        assert la.scatter.shape == expected.shape
        torch.testing.assert_close(la.scatter, expected)
    with pytest.raises(ValueError, match="prior_mean"):
        _lap(model, "classification", structure, prior_precision=1e-2, prior_mean=torch.ones(P).unsqueeze(-1))
    with pytest.raises(ValueError, match="prior_mean"):  # the length: checked when fit finds the layer
        _fit(model, "classification", structure, class_loader, prior_precision=1e-2, prior_mean=torch.ones(P - 5))
    with pytest.raises(TypeError, match="prior_mean"):  # a string: TypeError in ours (upstream ValueError)
        _lap(model, "classification", structure, prior_precision=1e-2, prior_mean="72")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_init_temperature(structure, model):
    la = _lap(model, "classification", structure, temperature=1.1)
    assert la.temperature == 1.1


# ---- fit, evidence, draws, functional variance against brute force -------------------------------------
FLAVOURS = [("full", "joint"), ("diag", "joint"), ("kron", "joint"), ("kron", "separate")]


@pytest.mark.parametrize("structure,bias_block", FLAVOURS, ids=lambda v: v)
@pytest.mark.parametrize("lh", ["classification", "regression"])
@pytest.mark.parametrize("multidim", [False, True])
def test_laplace_functionality(structure, bias_block, lh, multidim):
    loader = _loader(lh, multidim)
    sigma = 1.0 if lh == "classification" else 0.3
    model, layer = (_Reduced(), "fc2") if multidim else (_mlp(), "1")
    la = _fit(model, lh, structure, loader, sigma_noise=sigma, prior_precision=0.7, bias_block=bias_block)
    assert la.n_data == 10
    assert la.n_outputs == 2
    assert la.last_layer_name == layer
    X, y = loader.dataset.tensors
    with torch.no_grad():
        f = model(X)
    assert f.shape == (10, 2)

    # the training log likelihood
    if lh == "classification":
        log_lik = Categorical(logits=f).log_prob(y).sum()
    else:
        log_lik = Normal(f, sigma).log_prob(y).sum()
    torch.testing.assert_close(la.log_likelihood(), log_lik)
    if lh == "regression":
        la.sigma_noise = 0.72
        torch.testing.assert_close(la.log_likelihood(), Normal(f, 0.72).log_prob(y).sum())
        la.sigma_noise = sigma

    # the posterior precision and the log marginal likelihood, term by term
    J, f_j = _jacobians(model, layer, X)
    torch.testing.assert_close(f_j, f)
    theta = torch.cat([p.detach().reshape(-1) for p in getattr(model, layer).parameters()])
    torch.testing.assert_close(la.mean[la.positions], theta, rtol=0, atol=0)
    P = theta.numel()
    prior = torch.full((P,), 0.7)
    torch.testing.assert_close(la.prior_precision_diag, prior)
    H = _brute_curvature(model, layer, X, f, J, lh, sigma, structure, bias_block)
    post = H + torch.diag(prior)
    torch.testing.assert_close(_dense_precision(la, structure), post)
    lml = log_lik - 0.5 * (theta * prior * theta).sum() + 0.5 * (prior.log().sum() - torch.logdet(post))
    torch.testing.assert_close(la.log_marginal_likelihood(), lml)
    torch.testing.assert_close(la.log_det_ratio, torch.logdet(post) - prior.log().sum())

    # the posterior covariance and variances
    Sigma = torch.linalg.inv(post)
    torch.testing.assert_close(la.posterior_covariance, Sigma)
    torch.testing.assert_close(la.posterior_variance, torch.diag(Sigma))

    # draws: [n, all parameters], the uncovered ones at the MAP, the covered ones ~ N(theta, Sigma)
    torch.manual_seed(61)
    one = la.sample(1)
    assert one.shape == (1, la.mean.numel())
    n = 40000
    draws = la.sample(n)
    assert draws.shape == (n, la.mean.numel())
    rest = torch.ones(la.mean.numel(), dtype=torch.bool)
    rest[la.positions] = False
    assert torch.equal(draws[:, rest], la.mean[rest].expand(n, -1))
    cov = draws[:, la.positions]
    sd = torch.diag(Sigma).sqrt()
    assert ((cov.mean(0) - theta).abs() <= 5 * sd / math.sqrt(n)).all()
    emp = torch.cov(cov.T)
    assert ((emp - Sigma).abs() <= 6 * torch.outer(sd, sd) * math.sqrt(2 / n)).all()

    # the functional (GLM) variance J Sigma J^T
    true_f_var = torch.einsum("nkp,pq,ncq->nkc", J, Sigma, J)
    f_mu, f_var = la.functional_variance(X)
    torch.testing.assert_close(f_mu, f)
    torch.testing.assert_close(f_var, true_f_var)


@pytest.mark.parametrize("lh", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_marginal_likelihood_matches_laplace_torch(structure, lh):
    """Cross-check on laplace-torch itself (bias_block='separate', its blocks)."""
    laplace = pytest.importorskip("laplace")
    loader = _loader(lh)
    model = _mlp()
    sigma = 1.0 if lh == "classification" else 0.3
    theirs = laplace.Laplace(model, lh, subset_of_weights="last_layer", hessian_structure=structure,
                             sigma_noise=sigma, prior_precision=0.7, temperature=1.7, prior_mean=0.2)
    theirs.fit(loader)
    ours = _fit(model, lh, structure, loader, sigma_noise=sigma, prior_precision=0.7, bias_block="separate",
                temperature=1.7, prior_mean=0.2)
    torch.testing.assert_close(ours.log_likelihood(), theirs.log_likelihood.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().detach(),
                               rtol=1e-10, atol=1e-10)
    X = loader.dataset.tensors[0]
    if lh == "regression":
        for a, b in zip(ours.la(X), theirs(X, pred_type="glm")):
            torch.testing.assert_close(a, b.detach(), rtol=1e-8, atol=1e-10)
    else:
        for link in ("probit", "bridge", "bridge_norm"):
            torch.testing.assert_close(ours.la(X, link_approx=link), theirs(X, link_approx=link).detach(),
                                       rtol=0, atol=1e-8)


@pytest.mark.parametrize("structure,bias_block", FLAVOURS, ids=lambda v: v)
@pytest.mark.parametrize("lh", ["classification", "regression"])
def test_marglik_temperature_prior_mean_and_arguments(structure, bias_block, lh):
    """Beyond upstream's defaults: the log marginal likelihood at T = 1.7 and prior mean 0.2, and
    with prior_precision / sigma_noise passed to it (scalar and layerwise), against the brute-force
    formula. Temperature follows laplace-torch: the curvature and the data-fit term are divided by
    T, the Gaussian normaliser N C log(sigma sqrt(2 pi)) is not (checked against laplace-torch in
    test_log_marginal_likelihood_matches_laplace_torch)."""
    loader = _loader(lh)
    X, y = loader.dataset.tensors
    model = _mlp()
    sigma, T = (1.0 if lh == "classification" else 0.3), 1.7
    la = _fit(model, lh, structure, loader, sigma_noise=sigma, prior_precision=0.7, bias_block=bias_block,
              temperature=T, prior_mean=0.2)
    J, f = _jacobians(model, "1", X)
    theta = la.mean[la.positions]

    def brute(sig, prior):
        H = _brute_curvature(model, "1", X, f, J, lh, sig, structure, bias_block) / T
        if lh == "classification":
            ll = Categorical(logits=f).log_prob(y).sum() / T
        else:
            ll = -0.5 * (y - f).square().sum() / (sig ** 2 * T) - y.numel() * math.log(sig * math.sqrt(2 * math.pi))
        post = H + torch.diag(prior)
        return ll - 0.5 * (prior * (theta - 0.2).square()).sum() + 0.5 * (prior.log().sum() - torch.logdet(post))

    P = theta.numel()
    torch.testing.assert_close(la.log_marginal_likelihood(), brute(sigma, torch.full((P,), 0.7)))
    sig2 = 0.5 if lh == "regression" else None
    torch.testing.assert_close(la.log_marginal_likelihood(prior_precision=2.0, sigma_noise=sig2),
                               brute(sig2 or 1.0, torch.full((P,), 2.0)))
    # the given values replace the current ones (laplace-torch's behaviour)
    assert float(la.prior_precision) == 2.0 and float(la.sigma_noise) == (sig2 or 1.0)
    n_blocks = len(la.block_names)
    layerwise = torch.tensor([0.5, 3.0])[:n_blocks]
    per_param = torch.cat([torch.full((40,), 0.5), torch.full((2,), float(layerwise[-1]))])
    torch.testing.assert_close(la.log_marginal_likelihood(prior_precision=layerwise), brute(sig2 or 1.0, per_param))


@pytest.mark.parametrize("lh", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_last_layer_without_bias(structure, lh):
    """Upstream's ``model_no_output_bias`` fixture (defined there, unused): a last layer without bias
    is one block of its weight; evidence and functional variance against brute force."""
    loader = _loader(lh)
    X, _ = loader.dataset.tensors
    model = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2, bias=False))
    sigma = 1.0 if lh == "classification" else 0.3
    la = _fit(model, lh, structure, loader, sigma_noise=sigma, prior_precision=0.7)
    assert la.n_params == 40 and la.block_names == ["1.weight"]
    J, f = _jacobians(model, "1", X)
    Lam = _output_hessians(f, lh, sigma)
    if structure == "kron":
        phi = _features(model, "1", X)
        H = torch.kron(Lam.sum(0), phi.T @ phi / phi.shape[0])
    else:
        H = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
        H = H if structure == "full" else torch.diag(torch.diag(H))
    post = H + 0.7 * torch.eye(40)
    torch.testing.assert_close(_dense_precision(la, structure), post)
    Sigma = torch.linalg.inv(post)
    torch.testing.assert_close(la.functional_variance(X)[1], torch.einsum("nkp,pq,ncq->nkc", J, Sigma, J))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictives_against_brute_force(structure):
    """The last layer is linear in its weights, so the 'nn' predictive (weight draws) and the GLM
    one are the same Gaussian N(f, J Sigma J^T): regression moments of 'nn' and of GLM
    predictive_samples within 6 standard errors; classification probit exactly
    softmax(f / sqrt(1 + pi/8 diag(f_var))); 'mc' and 'nn' close to a reference Monte Carlo."""
    torch.manual_seed(3)
    for lh in ("regression", "classification"):
        loader = _loader(lh)
        X, _ = loader.dataset.tensors
        model = _mlp()
        sigma = 1.0 if lh == "classification" else 0.3
        la = _fit(model, lh, structure, loader, sigma_noise=sigma, prior_precision=0.7)
        J, f = _jacobians(model, "1", X)
        fv = torch.einsum("nkp,pq,ncq->nkc", J, la.posterior_covariance, J)
        ev = torch.diagonal(fv, dim1=1, dim2=2)
        n = 4000
        if lh == "regression":
            m, v = la(X, pred_type="nn", n_samples=n)
            assert ((m - f).abs() <= 6 * (ev / n).sqrt()).all()
            assert ((v - ev).abs() <= 6 * ev * math.sqrt(2 / n)).all()
            s = la.predictive_samples(X, pred_type="glm", n_samples=n)
            assert ((s.mean(0) - f).abs() <= 6 * (ev / n).sqrt()).all()
            assert ((s.var(0) - ev).abs() <= 6 * ev * math.sqrt(2 / n)).all()
            continue
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * ev)
        torch.testing.assert_close(la(X, link_approx="probit"), torch.softmax(f * kappa, -1))
        ref = torch.distributions.MultivariateNormal(f, fv + 1e-12 * torch.eye(2)).sample((50000,)).softmax(-1).mean(0)
        torch.testing.assert_close(la(X, link_approx="mc", n_samples=n), ref, rtol=0, atol=0.02)
        torch.testing.assert_close(la(X, pred_type="nn", n_samples=n), ref, rtol=0, atol=0.02)


# ---- predictives ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive(structure, model, reg_loader):
    la = _fit(model, "regression", structure, reg_loader, sigma_noise=0.3, prior_precision=0.7)
    X, _ = reg_loader.dataset.tensors
    with torch.no_grad():
        f = model(X)
    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")
    f_mu, f_var = la(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f)
    assert f_var.shape == (10, 2, 2)
    # upstream's diagonal_output: ours gives the diagonal through predict (epistemic + sigma^2)
    pred = la.predict(X)
    assert pred.epistemic.shape == pred.variance.shape == (10, 2)
    torch.testing.assert_close(pred.epistemic, torch.diagonal(f_var, dim1=1, dim2=2))
    torch.testing.assert_close(pred.variance, pred.epistemic + 0.09)
    f_mu, f_var = la(X, pred_type="nn", link_approx="mc")
    assert f_mu.shape == f_var.shape == (10, 2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_classification_predictive(structure, model, class_loader):
    la = _fit(model, "classification", structure, class_loader, prior_precision=0.7)
    X, _ = class_loader.dataset.tensors
    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")
    for kwargs in (dict(link_approx="mc", n_samples=100), dict(link_approx="probit"), dict(link_approx="bridge"),
                   dict(link_approx="bridge_norm")):
        p = la(X, pred_type="glm", **kwargs)
        assert p.shape == (10, 2)
        torch.testing.assert_close(p.sum(-1), torch.ones(10))
    p = la(X, pred_type="nn", link_approx="mc", n_samples=100)
    assert p.shape == (10, 2)
    torch.testing.assert_close(p.sum(-1), torch.ones(10))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive_samples(structure, model, reg_loader):
    la = _fit(model, "regression", structure, reg_loader, sigma_noise=0.3, prior_precision=0.7)
    X, _ = reg_loader.dataset.tensors
    with pytest.raises(ValueError, match="pred_type"):
        la.predictive_samples(X, pred_type="linear")
    for pred_type in ("glm", "nn"):
        assert la.predictive_samples(X, pred_type=pred_type, n_samples=100).shape == (100, 10, 2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_classification_predictive_samples(structure, model, class_loader):
    la = _fit(model, "classification", structure, class_loader, prior_precision=0.7)
    X, _ = class_loader.dataset.tensors
    for pred_type in ("glm", "nn"):
        s = la.predictive_samples(X, pred_type=pred_type, n_samples=100)
        assert s.shape == (100, 10, 2)
        torch.testing.assert_close(s.sum(-1), torch.ones(100, 10))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_diagonal_functional_variance(structure, model, reg_loader):
    """Upstream test_functional_variance_fast (the diagonal of J Sigma J^T), via predict's epistemic
    part, against the naive einsum with ours's own posterior covariance / variances."""
    la = _fit(model, "regression", structure, reg_loader)
    X, y = reg_loader.dataset.tensors
    pred = la.predict(X)
    assert pred.mean.shape == pred.epistemic.shape == (X.shape[0], y.shape[-1])
    J, f = _jacobians(model, "1", X)
    if structure == "diag":
        naive = torch.einsum("ncp,p,ncp->nc", J, la.posterior_variance, J)
    else:
        naive = torch.einsum("ncp,pq,ncq->nc", J, la.posterior_covariance, J)
    torch.testing.assert_close(pred.mean, f)
    torch.testing.assert_close(pred.epistemic, naive)


# ---- dtypes --------------------------------------------------------------------------------------------
def _dtype_data(likelihood, dtype):
    X = torch.randn(10, 3, dtype=dtype)
    Y = torch.randn(10, 3, dtype=dtype) if likelihood == "regression" else torch.randint(3, (10,))
    return X, DataLoader(TensorDataset(X, Y), batch_size=10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dtype(structure, dtype, curvature, likelihood):
    X, loader = _dtype_data(likelihood, dtype)
    model = nn.Linear(3, 3, dtype=dtype)
    la = _fit(model, likelihood, structure, loader, curvature=curvature)
    assert la.last_layer_name == ""
    assert la.log_marginal_likelihood().dtype == dtype
    assert la.posterior_variance.dtype == dtype
    out = la(X, pred_type="glm")
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == dtype
    out = la(X, pred_type="nn", n_samples=3)
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == dtype
    assert la.sample(2).dtype == dtype


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dtype_half(structure, dtype, likelihood):
    """Upstream test_dtype's torch.half (upstream accepts any error but a dtype mismatch). Ours
    documents (README, "Coming from laplace-torch") that a float16 / bfloat16 model's Laplace
    computes in float32 and every result is float32 (laplace-torch: the model's dtype); the values
    must agree with the same Laplace of the model cast to float32."""
    X, loader = _dtype_data(likelihood, dtype)
    model = nn.Linear(3, 3, dtype=dtype)
    la = _fit(model, likelihood, structure, loader)
    ref_model = nn.Linear(3, 3, dtype=torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref = _fit(ref_model, likelihood, structure,
               [(x.float(), y.float() if y.is_floating_point() else y) for x, y in loader])
    lml = la.log_marginal_likelihood()
    assert lml.dtype == torch.float32 and torch.isfinite(lml)
    tol = dict(rtol=2e-2, atol=2e-2)  # the forward / backward themselves run in half precision
    torch.testing.assert_close(lml, ref.log_marginal_likelihood(), **tol)
    out = la(X, pred_type="glm")
    ref_out = ref(X.float(), pred_type="glm")
    for t, r in zip(out if isinstance(out, tuple) else (out,), ref_out if isinstance(ref_out, tuple) else (ref_out,)):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, r, **tol)
    out = la(X, pred_type="nn", n_samples=3)
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == torch.float32
    assert la.posterior_variance.dtype == torch.float32
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance, **tol)
    assert la.sample(2).shape == (2, 12)
    assert la.predictive_samples(X, n_samples=4).dtype == torch.float32


# ---- enable_backprop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["glm", "glm_mc", "nn"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_backprop(structure, call, model, reg_loader):
    """Upstream test_backprop_glm / test_backprop_glm_mc / test_backprop_nn: with
    enable_backprop=True the regression predictive's mean and variance have gradients in x of x's
    shape; the GLM values equal the default path's, and the gradient of the GLM variance matches a
    finite difference."""
    X, _ = reg_loader.dataset.tensors
    X = X.clone().requires_grad_(True)
    la = _fit(model, "regression", structure, reg_loader, enable_backprop=True)
    if call == "glm":
        f_mu, f_var = la(X, pred_type="glm")
    elif call == "glm_mc":
        f_mu, f_var = la(X, pred_type="glm", link_approx="mc")
    else:
        f_mu, f_var = la(X, pred_type="nn", link_approx="mc", n_samples=10)
    g_mu = torch.autograd.grad(f_mu.sum(), X, retain_graph=True)[0]
    g_var = torch.autograd.grad(f_var.sum(), X)[0]
    assert g_mu.shape == X.shape and g_var.shape == X.shape
    if call == "nn":
        return
    plain = _fit(model, "regression", structure, reg_loader)
    mu0, var0 = plain(X.detach())
    torch.testing.assert_close(f_mu.detach(), mu0)
    torch.testing.assert_close(f_var.detach(), var0)
    # d/dx of the summed variance, central differences on one input entry
    eps = 1e-6
    Xp, Xm = X.detach().clone(), X.detach().clone()
    Xp[2, 1] += eps
    Xm[2, 1] -= eps
    fd = (plain(Xp)[1].sum() - plain(Xm)[1].sum()) / (2 * eps)
    torch.testing.assert_close(g_var[2, 1], fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_backprop_classification(structure, model, class_loader):
    """The classification counterpart (upstream tests only regression): probit probabilities
    differentiable in x, the gradient matching a finite difference."""
    X, _ = class_loader.dataset.tensors
    X = X.clone().requires_grad_(True)
    la = _fit(model, "classification", structure, class_loader, enable_backprop=True)
    p = la(X, link_approx="probit")
    g = torch.autograd.grad(p[:, 0].sum(), X)[0]
    assert g.shape == X.shape
    eps = 1e-6
    Xp, Xm = X.detach().clone(), X.detach().clone()
    Xp[4, 0] += eps
    Xm[4, 0] -= eps
    with torch.no_grad():
        fd = (la(Xp, link_approx="probit")[:, 0].sum() - la(Xm, link_approx="probit")[:, 0].sum()) / (2 * eps)
    torch.testing.assert_close(g[4, 0], fd, rtol=1e-5, atol=1e-7)
