"""Ported from laplace-torch's own suite (tests/test_subset_params.py and tests/test_laplace.py, at
44ea62a): a model with frozen parameters (only the first layer's weight trainable) and the
``Laplace`` factory's keywords, re-expressed against pyfastbayes.laplace.Laplace (its structures
stand for laplace-torch's KronLaplace, DiagLaplace and FullLaplace).

Left out, or changed:
- test_compatible_backend / test_incompatible_backend: laplace-torch's backends (BackPACK and
  ASDL refuse frozen parameters there); ours has one curvature engine, which covers the trainable
  parameters whatever is frozen, for every structure. Instead, the evidence is compared with
  laplace-torch's on its compatible Curvlinops backends, GGN and EF (classification; its regression
  EF differs from ours by a documented factor, README "Coming from laplace-torch").
- test_default_init / test_all_init check laplace-torch's classes; the factory here is one class
  whose default subset is 'all' (laplace-torch's: 'last_layer', README).
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import require
from pyfastbayes.laplace import FunctionalLaplace, Laplace

DT = torch.float64
STRUCTURES = ["kron", "diag", "full"]


@pytest.fixture
def model():
    torch.manual_seed(240)
    model = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).to(DT)
    for p in model.parameters():  # a subset of the parameters
        p.requires_grad = False
    model[0].weight.requires_grad = True
    return model


@pytest.fixture
def class_loader():
    torch.manual_seed(241)
    return DataLoader(TensorDataset(torch.randn(10, 3, dtype=DT), torch.randint(2, (10,))), batch_size=3)


@pytest.fixture
def reg_loader():
    torch.manual_seed(242)
    return DataLoader(TensorDataset(torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)), batch_size=3)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_mean_clf(structure, curvature, model, class_loader):
    lap = Laplace(model, "classification", "all", structure, curvature=curvature).fit(class_loader, progress=False)
    assert lap.mean.shape == (model[0].weight.numel(),)
    torch.testing.assert_close(lap.mean, model[0].weight.detach().reshape(-1), rtol=0, atol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_mean_reg(structure, curvature, model, reg_loader):
    lap = Laplace(model, "regression", "all", structure, curvature=curvature).fit(reg_loader, progress=False)
    assert lap.mean.shape == (model[0].weight.numel(),)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_post_precision_diag(model, curvature, class_loader):
    lap = Laplace(model, "classification", "all", "diag", curvature=curvature).fit(class_loader, progress=False)
    assert lap.posterior_precision.shape == (model[0].weight.numel(),)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_post_precision_kron(model, curvature, class_loader):
    lap = Laplace(model, "classification", "all", "kron", curvature=curvature).fit(class_loader, progress=False)
    n = model[0].weight.numel()
    assert lap.to_dense().shape == (n, n)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive(structure, model, class_loader):
    lap = Laplace(model, "classification", "all", structure).fit(class_loader, progress=False)
    p = lap(torch.randn(5, 3, dtype=DT), pred_type="nn", link_approx="mc")
    assert p.shape == (5, 2)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=DT))
    # (ours) the draws move the trainable weight only
    theta = lap.sample(4)
    assert theta.shape == (4, model[0].weight.numel())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_marglik_glm(structure, model, class_loader):
    lap = Laplace(model, "classification", "all", structure).fit(class_loader, progress=False)
    before = float(lap.log_marginal_likelihood())
    lap.optimize_prior_precision(method="marglik")
    assert float(lap.log_marginal_likelihood()) >= before


@pytest.mark.parametrize("structure", STRUCTURES)
def test_marglik_nn(structure, model, class_loader):
    lap = Laplace(model, "classification", "all", structure).fit(class_loader, progress=False)
    lap.optimize_prior_precision(method="gridsearch", val_loader=class_loader, pred_type="nn", link_approx="mc")
    assert float(lap.prior_precision.reshape(-1)[0]) > 0


# ---- (ours) the numbers, against laplace-torch's Curvlinops backends and the GP view ---------------------
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_evidence_equals_laplace_torch_curvlinops(structure, curvature, model, class_loader):
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    require("curvlinops", "laplace-torch's Curvlinops backend")
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    cls = {"kron": laplace.KronLaplace, "diag": laplace.DiagLaplace, "full": laplace.FullLaplace}[structure]
    theirs = cls(model, "classification", backend=CurvlinopsGGN if curvature == "ggn" else CurvlinopsEF)
    theirs.fit(class_loader)
    ours = Laplace(model, "classification", "all", structure, curvature=curvature).fit(class_loader, progress=False)
    # ('full': the two log-determinants of the 60 x 60 precision part at ~1e-10)
    torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().reshape(()),
                               rtol=1e-8, atol=1e-10)


def test_functional_laplace_covers_the_trainable_parameters(model, reg_loader):
    """The GP view with frozen parameters: K = J J^T over the trainable weight only, so with M = N
    it equals the 'full' Laplace of that weight."""
    full = Laplace(model, "regression", "all", "full", prior_precision=0.5).fit(reg_loader, progress=False)
    gp = FunctionalLaplace(model, "regression", 10, prior_precision=0.5).fit(reg_loader, progress=False)
    assert gp.positions.numel() == model[0].weight.numel() == gp.numel
    x = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(gp(x)[1], full(x)[1], rtol=1e-9, atol=1e-12)


# ---- tests/test_laplace.py -------------------------------------------------------------------------------
ALL_KEYS = [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "full"), ("last_layer", "kron"),
            ("last_layer", "diag")]


@pytest.mark.parametrize("key", ALL_KEYS + [("all", "gp"), ("last_layer", "gp")])
def test_opt_keywords(key):
    """The factory passes the optional keywords on (upstream: prior_mean, prior_precision, temperature)."""
    torch.manual_seed(240)
    model = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).to(DT)
    w, s = key
    n = 20 * 3 + 20 + 20 * 2 + 2 if w == "all" else 20 * 2 + 2
    prior_mean = torch.zeros(n, dtype=DT)
    extra = dict(n_subset=5) if s == "gp" else {}
    lap = Laplace(model, "classification", subset_of_weights=w, hessian_structure=s, prior_precision=0.01,
                  prior_mean=prior_mean, temperature=10.0, **extra)
    if w == "last_layer":  # (ours: the last layer's length is known once fit has found it)
        lap.fit([(torch.randn(6, 3, dtype=DT), torch.randint(2, (6,)))], progress=False)
    torch.testing.assert_close(lap.prior_mean.reshape(-1).expand(n), prior_mean)
    assert float(lap.prior_precision) == pytest.approx(0.01)
    assert lap.temperature == 10.0
