"""Ported from laplace-torch's own suite (tests/test_subnetlaplace.py at 44ea62a).

laplace-torch's subnetwork Laplace tests (``SubnetLaplace`` / ``FullSubnetLaplace`` /
``DiagSubnetLaplace`` and the masks of ``laplace.utils.subnetmask``) re-expressed against
``Laplace(model, likelihood, subset_of_weights='subnetwork', hessian_structure='full'|'diag',
subnetwork_indices=...)`` and :mod:`pyfastbayes.laplace.subnetmask`. Where upstream only checks
shapes and types, these tests also check the values against independent references: the exact
GGN of torch.func Jacobians (tests/_laplace_reference.py), whose [S, S] submatrix plus the prior
is the posterior precision, the GLM predictive J_S P^-1 J_S^T from the same Jacobians' columns,
the log marginal likelihood written out term by term, and laplace-torch 0.3 itself (its
last-layer Laplace and its SubnetLaplace on the same model, data and indices).

Conventions of ours that the ports follow (documented in pyfastbayes.laplace.subnetwork and
.subnetmask):

- ``subnetwork_indices`` may be any integer tensor (int8 / int16 / int32 / int64 / uint8) or a list
  of ints; they are sorted (``la.positions``). laplace-torch accepts only a torch.LongTensor and
  raises ValueError for the rest. A floating or boolean tensor is a TypeError here (upstream:
  ValueError); a missing ``subnetwork_indices`` is a ValueError (upstream: TypeError).
- The masks index only the TRAINABLE parameters (requires_grad); a mask's ``indices`` /
  ``n_params_subnet`` before ``select`` raise RuntimeError (upstream: AttributeError); a second
  ``select`` raises RuntimeError (upstream: ValueError); ``n_params_subnet=None`` is a TypeError
  (upstream: ValueError) and a too large one is refused when the mask is built (upstream: at
  ``select``); an unknown ``last_layer_name`` is a ValueError (upstream: KeyError).
- ``la.positions`` stands for ``lap.backend.subnetwork_indices``, ``la.n_params`` for
  ``lap.n_params_subnet``, ``la.to_dense()`` (the posterior precision [k, k]) for ``lap.H`` plus
  the prior, ``la.posterior_variance`` [k] for the shape check of ``prior_precision_diag``.
- Options after ``hessian_structure`` are keyword-only; a float16 model's Laplace computes in
  float32 and returns float32.

Added (ours only): test_masks_skip_frozen_parameters (the trainable-only convention);
test_subnet_noise_temperature_prior_mean (sigma_noise, temperature, a per-entry prior precision
and prior mean, against the formulas; laplace-torch 0.3 refuses a length-k prior precision or
prior mean for a subnetwork, so it is compared with scalar ones); test_sample's moment check.

Upstream tests left out:

- test_subnet_laplace_backend_init: laplace-torch's curvature backends (Asdl / BackPack /
  Curvlinops, GGN / EF / Hessian); ours has no backends (``curvature='ggn'|'ef'|'mc_fisher'``).
- test_subnet_laplace_large_init: needs torchvision's wide_resnet50_2 (68 M weights, not
  installed, far beyond the time budget) and checks ``la.H`` / ``_init_H`` internals; the intent (a
  few random indices of a convolutional net give a [k, k] posterior) is in
  test_subnet_laplace_conv_net_init, on a small CNN and against the exact GGN.
- The ``isinstance(lap, FullSubnetLaplace / DiagSubnetLaplace / SubnetLaplace)`` checks throughout:
  laplace-torch's class hierarchy; ours is one ``Laplace`` class (``hessian_structure`` and
  ``subset_of_weights`` are checked instead).
- test_dtype's ``backend`` parametrisation and its laplace-torch class parametrisation: no
  backends; the dtypes x structures x likelihoods are ported with ``curvature='ggn'`` and ``'ef'``.
"""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _laplace_reference as ref
from _helpers import require
from pyfastbayes.laplace import Laplace, subnetmask as sm

LIKELIHOODS = ["classification", "regression"]
STRUCTURES = ["full", "diag"]
SCORE_MASKS = ["random", "magnitude", "diag_laplace", "swag"]
LAYER_MASKS = ["param_name", "module_name", "last_layer"]
ALL_MASKS = SCORE_MASKS + LAYER_MASKS
P_MODEL = 3 * 20 + 20 + 20 * 2 + 2  # 122


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(240)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_default_dtype(old)


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2))


def _loader(kind):
    X = torch.randn(10, 3)
    y = torch.randint(2, (10,)) if kind == "classification" else torch.randn(10, 2)
    return DataLoader(TensorDataset(X, y), batch_size=3)


@pytest.fixture
def class_loader():
    return _loader("classification")


@pytest.fixture
def reg_loader():
    return _loader("regression")


def _pick(likelihood, class_loader, reg_loader):
    return class_loader if likelihood == "classification" else reg_loader


def _sub(model, likelihood, structure, indices, **kw):
    return Laplace(model, likelihood, subset_of_weights="subnetwork", hessian_structure=structure,
                   subnetwork_indices=indices, **kw)


def _fit(model, likelihood, structure, indices, loader, **kw):
    return _sub(model, likelihood, structure, indices, **kw).fit(loader, progress=False)


def _exact_precision(model, loader, likelihood, idx, structure, prior=1.0, sigma=1.0):
    """The exact GGN's [S, S] submatrix / sigma^2 (its diagonal for 'diag') plus the prior."""
    idx = torch.as_tensor(idx).sort().values
    H = ref.exact_curvature(model, loader, likelihood)[idx][:, idx] / sigma ** 2
    if structure == "diag":
        H = torch.diag(torch.diagonal(H))
    return H + prior * torch.eye(idx.numel())


def _make_mask(kind, model, likelihood, n=32):
    """The upstream mask arguments per kind (score masks: n=32; ParamName ['0.weight', '1.bias'];
    ModuleName ['0']; LastLayer found from the data)."""
    if kind == "random":
        return sm.RandomSubnetMask(model, n)
    if kind == "magnitude":
        return sm.LargestMagnitudeSubnetMask(model, n)
    if kind == "diag_laplace":
        return sm.LargestVarianceDiagLaplaceSubnetMask(model, n, Laplace(model, likelihood, "all", "diag"))
    if kind == "swag":
        return sm.LargestVarianceSWAGSubnetMask(model, n, likelihood=likelihood)
    if kind == "param_name":
        return sm.ParamNameSubnetMask(model, ["0.weight", "1.bias"])
    if kind == "module_name":
        return sm.ModuleNameSubnetMask(model, ["0"])
    return sm.LastLayerSubnetMask(model)


def _span(start, stop):
    return list(range(start, stop))


# ---- test_subnet_laplace_init ----------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_subnet_laplace_init(model, likelihood):
    mask = sm.RandomSubnetMask(model, 10)
    idx = mask.select()
    for structure in STRUCTURES:
        la = _sub(model, likelihood, structure, mask.indices)
        assert la.subset_of_weights == "subnetwork" and la.hessian_structure == structure
        assert torch.equal(la.positions.cpu(), idx) and la.n_params == 10
    # without subnetwork indices
    with pytest.raises(ValueError, match="needs subnetwork_indices"):
        Laplace(model, likelihood, subset_of_weights="subnetwork", hessian_structure="full")
    # kron and lowrank have no subnetwork counterpart
    for structure in ("kron", "lowrank"):
        with pytest.raises(ValueError, match="'full' or 'diag'"):
            _sub(model, likelihood, structure, mask.indices)


# ---- replacement for test_subnet_laplace_large_init ------------------------------------------------------
class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = nn.functional.max_pool2d(torch.tanh(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_subnet_laplace_conv_net_init(likelihood, structure):
    net = _SmallCNN()
    X = torch.randn(8, 1, 8, 8)
    y = torch.randint(3, (8,)) if likelihood == "classification" else torch.randn(8, 3)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    mask = sm.RandomSubnetMask(net, 10, generator=torch.Generator().manual_seed(5))
    idx = mask.select()
    assert mask.n_params == sum(p.numel() for p in net.parameters())
    la = _fit(net, likelihood, structure, idx, loader)
    assert la.n_params == 10 and la.to_dense().shape == (10, 10) and la.posterior_variance.shape == (10,)
    torch.testing.assert_close(la.to_dense(), _exact_precision(net, loader, likelihood, idx, structure),
                               rtol=1e-9, atol=1e-11)
    # refitting gives the same posterior (upstream: _init_H then the same H)
    before = la.to_dense().clone()
    la.fit(loader, progress=False)
    torch.testing.assert_close(la.to_dense(), before, rtol=0, atol=0)


# ---- test_custom_subnetwork_indices ----------------------------------------------------------------------
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_custom_subnetwork_indices(model, likelihood, structure, class_loader, reg_loader):
    loader = _pick(likelihood, class_loader, reg_loader)
    P = P_MODEL
    refused = [
        (None, ValueError, "needs subnetwork_indices"),
        (torch.tensor([], dtype=torch.long), ValueError, "non-empty"),
        (torch.tensor(11), ValueError, "1-D"),  # a 0-dim tensor
        (torch.tensor([[0, 5], [11, 42]]), ValueError, "1-D"),
        (torch.tensor([0.0, 5.0, 11.0, 42.0], dtype=torch.float64), TypeError, "integer tensor"),
        (torch.tensor([0.0, 5.0, 11.0, 42.0], dtype=torch.float32), TypeError, "integer tensor"),
        (torch.tensor([0.0, 5.0, 11.0, 42.0], dtype=torch.float16), TypeError, "integer tensor"),
        (torch.tensor([True, False, True, True]), TypeError, "integer tensor"),
        (torch.tensor([0, -1, -11]), ValueError, "must lie in"),
        (torch.tensor([P + 1, P + 42]), ValueError, "must lie in"),
        (torch.tensor([0, P]), ValueError, "must lie in"),
        (torch.tensor([0, 0, 5, 11, 11, 42]), ValueError, "duplicate"),
        ("0, 5, 11", TypeError, "integer tensor"),
    ]
    for bad, exc, words in refused:
        with pytest.raises(exc, match=words):
            _sub(model, likelihood, structure, bad)
    # ours (unlike laplace-torch) takes any integer dtype and a list of ints
    for ok in ([0, 5, 11, 42], torch.tensor([0, 5, 11, 42], dtype=torch.int32),
               torch.tensor([0, 5, 11, 42], dtype=torch.int16), torch.tensor([0, 5, 11, 42], dtype=torch.int8),
               torch.tensor([0, 5, 11, 42], dtype=torch.uint8)):
        la = _sub(model, likelihood, structure, ok)
        assert la.positions.dtype == torch.int64 and la.positions.tolist() == [0, 5, 11, 42]
    # a valid LongTensor, in any order: sorted positions, a [4, 4] posterior equal to the exact one
    idx = torch.tensor([42, 0, 11, 5])
    la = _fit(model, likelihood, structure, idx, loader)
    assert la.n_params == 4 and la.positions.tolist() == [0, 5, 11, 42]
    assert la.to_dense().shape == (4, 4) and la.posterior_variance.shape == (4,)
    torch.testing.assert_close(la.to_dense(), _exact_precision(model, loader, likelihood, idx, structure),
                               rtol=1e-9, atol=1e-11)
    assert la.mean.shape == (P,)
    torch.testing.assert_close(la.mean, ref.flat(model), rtol=0, atol=0)


# ---- test_score_based_subnet_masks -----------------------------------------------------------------------
_SCORE_CLASSES = {"random": sm.RandomSubnetMask, "magnitude": sm.LargestMagnitudeSubnetMask,
                  "diag_laplace": sm.LargestVarianceDiagLaplaceSubnetMask,
                  "swag": sm.LargestVarianceSWAGSubnetMask}


@pytest.mark.parametrize("kind", SCORE_MASKS)
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_score_based_subnet_masks(model, kind, likelihood, structure, class_loader, reg_loader):
    loader = _pick(likelihood, class_loader, reg_loader)
    theta0 = ref.flat(model).clone()
    cls = _SCORE_CLASSES[kind]
    if kind == "diag_laplace":
        kwargs = dict(diag_laplace_model=Laplace(model, likelihood, "all", "diag"))
    elif kind == "swag":
        kwargs = dict(likelihood=likelihood)
    else:
        kwargs = {}
    # n_params_subnet missing / None / larger than the model
    with pytest.raises(TypeError):
        cls(model, **kwargs).select(loader)
    with pytest.raises(TypeError, match="n_params_subnet"):
        cls(model, n_params_subnet=None, **kwargs).select(loader)
    with pytest.raises(ValueError, match="more than the model's"):
        cls(model, n_params_subnet=99999, **kwargs).select(loader)

    n = 32
    mask = cls(model, n_params_subnet=n, **kwargs)
    assert mask.n_params == P_MODEL
    with pytest.raises(RuntimeError, match="not selected"):
        mask.indices
    with pytest.raises(RuntimeError, match="not selected"):
        mask.n_params_subnet
    idx = mask.select(loader)
    with pytest.raises(RuntimeError, match="already"):
        mask.select(loader)
    assert torch.equal(mask.indices, idx) and idx.dtype == torch.int64 and mask.n_params_subnet == n
    assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx.min()) and int(idx.max()) < P_MODEL
    assert torch.equal(ref.flat(model), theta0)  # the model's weights are unchanged (SWAG trains a copy)

    # what each mask selects
    if kind == "magnitude":
        assert idx.tolist() == sorted(torch.topk(theta0.abs(), n).indices.tolist())
        lsm = require("laplace.utils.subnetmask", "laplace-torch's masks are the reference")
        assert idx.tolist() == lsm.LargestMagnitudeSubnetMask(model, n).select(loader).tolist()
    elif kind == "diag_laplace":
        var = 1.0 / (torch.diagonal(ref.exact_curvature(model, loader, likelihood)) + 1.0)
        torch.testing.assert_close(kwargs["diag_laplace_model"].posterior_variance, var, rtol=1e-9, atol=1e-12)
        assert idx.tolist() == sorted(torch.topk(var, n).indices.tolist())
        laplace = require("laplace", "laplace-torch's masks are the reference")
        theirs = laplace.utils.subnetmask.LargestVarianceDiagLaplaceSubnetMask(
            model, n, laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag"))
        assert idx.tolist() == theirs.select(loader).tolist()
    elif kind == "swag":
        assert idx.tolist() == sorted(torch.topk(mask.swag.variance().double(), n).indices.tolist())
    else:
        again = sm.RandomSubnetMask(model, n, generator=torch.Generator().manual_seed(7)).select()
        assert torch.equal(again, sm.RandomSubnetMask(model, n, generator=torch.Generator().manual_seed(7)).select())

    la = _fit(model, likelihood, structure, mask.indices, loader)
    assert torch.equal(la.positions.cpu(), mask.indices) and la.n_params == n
    assert la.to_dense().shape == (n, n) and la.posterior_variance.shape == (n,)
    torch.testing.assert_close(la.to_dense(), _exact_precision(model, loader, likelihood, idx, structure),
                               rtol=1e-9, atol=1e-11)
    assert torch.equal(ref.flat(model), theta0)


# ---- test_layer_subnet_masks -----------------------------------------------------------------------------
def _theirs_last_layer_precision(model, likelihood, structure, loader):
    laplace = require("laplace", "laplace-torch's last-layer Laplace is the reference of a last-layer subnetwork")
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure=structure)
    theirs.fit(loader)
    Pt = theirs.posterior_precision.detach()
    return Pt if structure == "full" else torch.diag(Pt)


@pytest.mark.parametrize("kind", LAYER_MASKS)
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_layer_subnet_masks(model, kind, likelihood, structure, class_loader, reg_loader):
    loader = _pick(likelihood, class_loader, reg_loader)
    # ours: the last-layer Laplace of the same model, and laplace-torch's
    ll = Laplace(model, likelihood, "last_layer", structure).fit(loader, progress=False)
    ll_dense = ll.to_dense()
    torch.testing.assert_close(ll_dense, _theirs_last_layer_precision(model, likelihood, structure, loader),
                               rtol=1e-8, atol=1e-10)
    last = _span(80, 122)  # 1.weight [2, 20] (80..119) then 1.bias [2]
    assert ll.positions.tolist() == last

    cls = {"param_name": sm.ParamNameSubnetMask, "module_name": sm.ModuleNameSubnetMask,
           "last_layer": sm.LastLayerSubnetMask}[kind]
    with pytest.raises(TypeError):  # layer masks take no n_params_subnet
        cls(model, n_params_subnet=32).select(loader)

    def check_last_layer(mask):
        idx = mask.select(loader)
        assert idx.tolist() == last and mask.n_params_subnet == 42
        la = _fit(model, likelihood, structure, idx, loader)
        torch.testing.assert_close(la.to_dense(), ll_dense, rtol=1e-10, atol=1e-12)

    if kind == "param_name":
        with pytest.raises(TypeError):
            cls(model).select(loader)
        with pytest.raises(ValueError, match="empty"):
            cls(model, parameter_names=[]).select(loader)
        with pytest.raises(ValueError, match="not trainable parameters"):
            cls(model, parameter_names=["123"]).select(loader)
        check_last_layer(cls(model, parameter_names=["1.weight", "1.bias"]))
        mask, expect = cls(model, parameter_names=["0.weight", "1.bias"]), _span(0, 60) + [120, 121]
    elif kind == "module_name":
        with pytest.raises(TypeError):
            cls(model).select(loader)
        with pytest.raises(ValueError, match="empty"):
            cls(model, module_names=[]).select(loader)
        with pytest.raises(ValueError, match="not a module"):
            cls(model, module_names=["123"]).select(loader)
        check_last_layer(cls(model, module_names=["1"]))
        mask, expect = cls(model, module_names=["0"]), _span(0, 80)
    else:
        with pytest.raises(ValueError, match="not a module"):
            cls(model, last_layer_name="123").select(loader)
        with pytest.raises(ValueError, match="needs train_loader"):
            cls(model).select()
        check_last_layer(cls(model))
        mask, expect = cls(model, last_layer_name="1"), last

    n = len(expect)
    # laplace-torch's mask of the same arguments selects the same entries
    lsm = require("laplace.utils.subnetmask", "laplace-torch's masks are the reference")
    theirs = {"param_name": lambda: lsm.ParamNameSubnetMask(model, mask.parameter_names),
              "module_name": lambda: lsm.ModuleNameSubnetMask(model, mask.module_names),
              "last_layer": lambda: lsm.LastLayerSubnetMask(model, last_layer_name="1")}[kind]()
    assert theirs.select(loader).tolist() == expect
    with pytest.raises(RuntimeError, match="not selected"):
        mask.n_params_subnet
    idx = mask.select(loader)
    assert idx.tolist() == expect and mask.n_params_subnet == n
    la = _fit(model, likelihood, structure, idx, loader)
    assert torch.equal(la.positions.cpu(), mask.indices) and la.n_params == n
    assert la.to_dense().shape == (n, n) and la.posterior_variance.shape == (n,)
    torch.testing.assert_close(la.to_dense(), _exact_precision(model, loader, likelihood, idx, structure),
                               rtol=1e-9, atol=1e-11)


def test_masks_skip_frozen_parameters(model, class_loader):
    """Ours only: masks index the trainable parameters (a frozen first layer is not in the flat
    vector), and the last-layer mask / the Laplace agree on that vector."""
    model[0].weight.requires_grad_(False)
    P = 20 + 40 + 2
    assert sm.RandomSubnetMask(model, 5).n_params == P
    assert sm.ParamNameSubnetMask(model, ["1.weight"]).select().tolist() == _span(20, 60)
    with pytest.raises(ValueError, match="not trainable"):
        sm.ParamNameSubnetMask(model, ["0.weight"]).select()
    assert sm.ModuleNameSubnetMask(model, ["0"]).select().tolist() == _span(0, 20)  # only 0.bias
    idx = sm.LastLayerSubnetMask(model).select(class_loader)
    assert idx.tolist() == _span(20, 62)
    la = _fit(model, "classification", "full", idx, class_loader)
    torch.testing.assert_close(la.to_dense(), _exact_precision(model, class_loader, "classification", idx, "full"),
                               rtol=1e-9, atol=1e-11)


# ---- test_full_subnet_mask -------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_full_subnet_mask(model, likelihood, structure, class_loader, reg_loader):
    loader = _pick(likelihood, class_loader, reg_loader)

    class FullSubnetMask(sm.SubnetMask):
        def get_subnet_mask(self, train_loader):
            return torch.ones(self.n_params).byte()

    mask = FullSubnetMask(model)
    idx = mask.select(loader)
    assert idx.tolist() == _span(0, P_MODEL) and mask.n_params_subnet == P_MODEL
    la = _fit(model, likelihood, structure, idx, loader)
    assert la.n_params == P_MODEL
    full = Laplace(model, likelihood, "all", structure).fit(loader, progress=False)
    torch.testing.assert_close(la.to_dense(), full.to_dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-10, atol=1e-10)

    class EmptyMask(sm.SubnetMask):
        def get_subnet_mask(self, train_loader):
            return torch.zeros(self.n_params, dtype=torch.bool)

    with pytest.raises(ValueError, match="selects no parameter"):
        EmptyMask(model).select(loader)


# ---- predictives -----------------------------------------------------------------------------------------
def _glm_reference(model, loader, likelihood, idx, structure, X, sigma=1.0):
    Pm = _exact_precision(model, loader, likelihood, idx, structure, sigma=sigma)
    J = ref.jacobians(model, X)[:, :, idx.sort().values]
    return ref.outputs(model, X), ref.logits_var(J, torch.linalg.inv(Pm))


@pytest.mark.parametrize("kind", ALL_MASKS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive(model, reg_loader, kind, structure):
    mask = _make_mask(kind, model, "regression")
    idx = mask.select(reg_loader)
    la = _fit(model, "regression", structure, idx, reg_loader)
    X, _ = reg_loader.dataset.tensors
    f = model(X).detach()
    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")
    # GLM predictive: f_mu = f(x), f_var = J_S P^-1 J_S^T
    f_mu, f_var = la(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f)
    assert f_var.shape == (len(X), 2, 2)
    _, f_var_ref = _glm_reference(model, reg_loader, "regression", idx, structure, X)
    torch.testing.assert_close(f_var, f_var_ref, rtol=1e-9, atol=1e-12)
    # NN predictive: diagonal variance only
    f_mu, f_var = la(X, pred_type="nn", link_approx="mc", n_samples=200, generator=torch.Generator().manual_seed(1))
    assert f_mu.shape == f_var.shape == (len(X), 2)
    assert bool((f_var >= 0).all()) and bool(torch.isfinite(f_mu).all())
    # the sampled networks move only the subnetwork: their mean stays near f(x) (loose: the
    # network is bilinear in the weights of its two layers)
    assert (f_mu - f).abs().max() < 6 * f_var.max().sqrt() + 1e-8


@pytest.mark.parametrize("kind", ALL_MASKS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_classification_predictive(model, class_loader, kind, structure):
    mask = _make_mask(kind, model, "classification")
    idx = mask.select(class_loader)
    la = _fit(model, "classification", structure, idx, class_loader)
    X, _ = class_loader.dataset.tensors
    f = torch.softmax(model(X), dim=-1).detach()
    with pytest.raises(ValueError, match="pred_type"):
        la(X, pred_type="linear")
    f_mu, f_var = _glm_reference(model, class_loader, "classification", idx, structure, X)
    ones = torch.ones(len(X))

    p = la(X, pred_type="glm", link_approx="mc", n_samples=100, generator=torch.Generator().manual_seed(0))
    assert p.shape == f.shape
    torch.testing.assert_close(p.sum(-1), ones)
    p = la(X, pred_type="glm", link_approx="probit")
    assert p.shape == f.shape
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    torch.testing.assert_close(p, torch.softmax(kappa * f_mu, -1), rtol=1e-9, atol=1e-12)
    p = la(X, pred_type="glm", link_approx="bridge")
    torch.testing.assert_close(p.sum(-1), ones)
    torch.testing.assert_close(p, ref.bridge(f_mu, f_var), rtol=1e-8, atol=1e-10)
    p = la(X, pred_type="glm", link_approx="bridge_norm")
    torch.testing.assert_close(p.sum(-1), ones)
    torch.testing.assert_close(p, ref.bridge(f_mu, f_var, normalise=True), rtol=1e-8, atol=1e-10)
    p = la(X, pred_type="nn", link_approx="mc", n_samples=100, generator=torch.Generator().manual_seed(0))
    assert p.shape == f.shape
    torch.testing.assert_close(p.sum(-1), ones)


# ---- test_subnet_marginal_likelihood ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_MASKS)
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_subnet_marginal_likelihood(model, kind, likelihood, structure, class_loader, reg_loader):
    laplace = require("laplace", "laplace-torch's SubnetLaplace is the reference of the marginal likelihood")
    loader = _pick(likelihood, class_loader, reg_loader)
    mask = _make_mask(kind, model, likelihood)
    idx = mask.select(loader)
    la = _fit(model, likelihood, structure, idx, loader, prior_precision=0.7)
    lml = la.log_marginal_likelihood()
    # written out: log p(D | theta_MAP) - 1/2 delta |theta_S|^2 - 1/2 (log det P - k log delta)
    X, y = loader.dataset.tensors
    f = model(X).detach()
    if likelihood == "classification":
        ll = -nn.functional.cross_entropy(f, y, reduction="sum")
    else:
        ll = -0.5 * (f - y).square().sum() - 0.5 * f.numel() * math.log(2 * math.pi)
    k = idx.numel()
    Pm = _exact_precision(model, loader, likelihood, idx, structure, prior=0.7)
    expect = ll - 0.5 * 0.7 * ref.flat(model)[idx].square().sum() - 0.5 * (torch.logdet(Pm) - k * math.log(0.7))
    torch.testing.assert_close(lml, expect, rtol=1e-9, atol=1e-9)
    # laplace-torch on the same indices
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="subnetwork", hessian_structure=structure,
                             subnetwork_indices=idx, prior_precision=0.7)
    theirs.fit(loader)
    torch.testing.assert_close(lml, theirs.log_marginal_likelihood().detach(), rtol=1e-8, atol=1e-8)


# ---- test_sample -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood,structure", [(lik, s) for lik in LIKELIHOODS for s in STRUCTURES])
def test_sample(model, likelihood, structure, class_loader, reg_loader):
    loader = _pick(likelihood, class_loader, reg_loader)
    mask = sm.RandomSubnetMask(model, 10)
    idx = mask.select()
    la = _fit(model, likelihood, structure, idx, loader)
    n = 20
    gen = torch.Generator().manual_seed(123)
    state = gen.get_state()
    # successive draws differ, with or without a generator
    for g in (gen, None):
        s1 = la.sample(n, generator=g)
        s2 = la.sample(n, generator=g)
        assert not bool((s1 == s2).all())
    assert s1.shape == (n, P_MODEL)
    # the generator is used
    gen.set_state(state)
    s1 = la.sample(n, generator=gen)
    gen.set_state(state)
    s2 = la.sample(n, generator=gen)
    assert torch.equal(s1, s2)
    # only the subnetwork moves
    theta = ref.flat(model)
    fixed = torch.ones(P_MODEL, dtype=torch.bool)
    fixed[idx] = False
    assert int(fixed.sum()) == P_MODEL - la.n_params
    assert torch.equal(s1[:, fixed], theta[fixed].expand(n, -1))
    assert not bool((s1[:, ~fixed] == theta[~fixed].expand(n, -1)).any())
    assert torch.equal(s1[:, ~fixed], s1[:, la.positions])
    # and with the posterior's covariance (added: a moment check)
    m = 4000
    draws = la.sample(m, generator=torch.Generator().manual_seed(9))[:, la.positions]
    Sigma = torch.linalg.inv(_exact_precision(model, loader, likelihood, idx, structure))
    torch.testing.assert_close(la.posterior_covariance, Sigma, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.posterior_variance, torch.diagonal(Sigma), rtol=1e-9, atol=1e-12)
    sd = torch.diagonal(Sigma).sqrt()
    assert ((draws.mean(0) - theta[idx]).abs() < ref.statistical_bound(sd, m)).all()
    cov = torch.cov(draws.T)
    assert ((cov - Sigma).abs() < ref.statistical_bound(torch.outer(sd, sd) * math.sqrt(2), m)).all()


# ---- test_dtype ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("dtype", [torch.half, torch.float, torch.double])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_dtype(structure, curvature, dtype, likelihood):
    X = torch.randn(10, 3, dtype=dtype)
    Y = torch.randint(3, (10,)) if likelihood == "classification" else torch.randn(10, 3, dtype=dtype)
    loader = DataLoader(TensorDataset(X, Y), batch_size=10)
    net = nn.Linear(3, 3, dtype=dtype)
    idx = sm.RandomSubnetMask(net, 10).select()
    la = _fit(net, likelihood, structure, idx, loader, curvature=curvature)
    out = torch.float32 if dtype == torch.half else dtype
    assert la.to_dense().dtype == out
    assert la.log_marginal_likelihood().dtype == out
    if likelihood == "regression":
        y_pred, y_var = la(X, pred_type="glm")
        assert y_pred.dtype == out and y_var.dtype == out
        y_pred, y_var = la(X, pred_type="nn", n_samples=3)
        assert y_pred.dtype == out and y_var.dtype == out
    else:
        assert la(X, pred_type="glm").dtype == out
        assert la(X, pred_type="nn", n_samples=3).dtype == out
    # value: the float64 curvature of the same weights and data
    net64 = nn.Linear(3, 3, dtype=torch.float64)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    X64 = X.double()
    Y64 = Y if likelihood == "classification" else Y.double()
    loader64 = DataLoader(TensorDataset(X64, Y64), batch_size=10)
    H = ref.exact_curvature(net64, loader64, likelihood, curvature)[idx][:, idx]
    if structure == "diag":
        H = torch.diag(torch.diagonal(H))
    tol = {torch.double: dict(rtol=1e-9, atol=1e-10), torch.float: dict(rtol=1e-5, atol=1e-5),
           torch.half: dict(rtol=2e-2, atol=2e-2)}[dtype]
    torch.testing.assert_close(la.to_dense().double(), H + torch.eye(10), **tol)


# ---- added: the noise, temperature and prior options on a subnetwork ---------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_subnet_noise_temperature_prior_mean(model, reg_loader, structure):
    """Not upstream: P = H_SS / (sigma^2 T) + diag(delta), and the evidence with a per-entry prior
    precision and prior mean, written out; laplace-torch (which takes only a scalar prior precision and
    prior mean for a subnetwork) on the same indices with scalar ones; then prior tuning."""
    laplace = require("laplace", "laplace-torch's SubnetLaplace is the reference")
    idx = torch.tensor([3, 70, 90, 121, 5, 60])
    s = idx.sort().values
    delta, pm = torch.linspace(0.5, 1.5, 6), torch.linspace(-0.2, 0.3, 6)
    la = _fit(model, "regression", structure, idx, reg_loader, sigma_noise=0.6, temperature=2.0,
              prior_precision=delta, prior_mean=pm)
    H = ref.exact_curvature(model, reg_loader, "regression")[s][:, s]
    if structure == "diag":
        H = torch.diag(torch.diagonal(H))
    Pm = H / (0.36 * 2.0) + torch.diag(delta)
    torch.testing.assert_close(la.to_dense(), Pm, rtol=1e-10, atol=1e-12)
    X, Y = reg_loader.dataset.tensors
    f = ref.outputs(model, X)
    ll = -0.5 * (f - Y).square().sum() / (0.36 * 2.0) - f.numel() * (math.log(0.6) + 0.5 * math.log(2 * math.pi))
    theta = ref.flat(model)[s]
    lml = ll - 0.5 * (delta * (theta - pm).square()).sum() - 0.5 * (torch.logdet(Pm) - delta.log().sum())
    torch.testing.assert_close(la.log_marginal_likelihood(), lml, rtol=1e-10, atol=1e-10)
    # GLM predictive: J_S P^-1 J_S^T (the noise is not part of f_var)
    J = ref.jacobians(model, X)[:, :, s]
    torch.testing.assert_close(la(X, pred_type="glm")[1], ref.logits_var(J, torch.linalg.inv(Pm)),
                               rtol=1e-9, atol=1e-12)
    # laplace-torch with scalar prior precision and mean
    kw = dict(sigma_noise=0.6, temperature=2.0, prior_precision=0.8, prior_mean=0.1)
    ours = _fit(model, "regression", structure, idx, reg_loader, **kw)
    theirs = laplace.Laplace(model, "regression", subset_of_weights="subnetwork", hessian_structure=structure,
                             subnetwork_indices=s, **kw)
    theirs.fit(reg_loader)
    torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().detach(),
                               rtol=1e-9, atol=1e-9)
    # prior tuning by the evidence raises it
    before = ours.log_marginal_likelihood().item()
    ours.optimize_prior_precision(method="marglik", n_steps=100)
    assert ours.log_marginal_likelihood().item() > before
