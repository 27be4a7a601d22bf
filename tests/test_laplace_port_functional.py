"""Ported from laplace-torch's own suite (tests/test_functional_laplace.py and
tests/test_functional_laplace_unit.py, at 44ea62a): the same checks, re-expressed against
pyfastbayes.laplace.FunctionalLaplace (laplace-torch's FunctionalLaplace and, with
subset_of_weights='last_layer', FunctionalLLLaplace) and pyfastbayes.laplace.Laplace (its
FullLaplace / FullLLLaplace). The toy data and model are upstream's tests/utils.py's.

Left out, or changed:
- The curvature backend parameter (BackPackGGN, AsdlGGN, CurvlinopsGGN): ours has one.
- test_store_K_batch_full_kernel / _block_diagonal_kernel and test_gp_kernel mock internals
  (``_init_K_MM``, ``_store_K_batch``, ``_kernel_batch``, ``_jacobians``); the layout they check
  (K_MM [M C, M C] with rows m * C + c, one M x M block per output when independent) is checked
  here on the fitted kernel against explicit Jacobians instead.
- test_gp_equivalence_*: upstream asserts f_var to 1e-2 and says "if float64 is used instead of
  float32, one can use atol=1e-10"; both run in float64 (upstream's default dtype), so 1e-9 here.
- test_functional_fit_y_shape: upstream refuses flat targets [N] for a one-output regression;
  ours takes them as [N, 1] (one target per row is unambiguous) and fits the same posterior.
- test_functional_samples with pred_type='nn': upstream draws the GP there too; ours draws the
  network at the GP's weight-space draws (``sample``), so only the shapes and the likelihood's
  independence are ported, plus a check of what 'nn' means here.
- test_dtype: float16 models are refused by ours with a TypeError (upstream swallows every error
  but a dtype mismatch).
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _laplace_reference as ref
from pyfastbayes.laplace import FunctionalLaplace, Laplace

DT = torch.float64
SIGMA = 0.1  # upstream's true_sigma_noise


# ---- upstream's tests/utils.py, in float64 -------------------------------------------------------------
def toy_regression_dataset_1d(sigma, n_train=150, n_test=500, batch_size=150):
    torch.manual_seed(711)
    X_train = (torch.rand(n_train, dtype=DT) * 8).unsqueeze(-1)
    y_train = torch.sin(X_train) + torch.randn_like(X_train) * sigma
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=batch_size)
    return X_train, y_train, loader, torch.linspace(-5, 13, n_test, dtype=DT).unsqueeze(-1)


def toy_multivariate_regression_dataset(sigma, d_input, n_train=150, n_test=500, batch_size=150):
    torch.manual_seed(711)
    X_train = torch.rand(n_train, d_input, dtype=DT) * 8
    y_train = torch.sin(X_train) + torch.randn_like(X_train) * sigma
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=batch_size)
    return X_train, y_train, loader, torch.rand(n_test, d_input, dtype=DT) * 10


def toy_classification_dataset(n_train=150, n_test=500, batch_size=150, in_dim=3, out_dim=2):
    torch.manual_seed(711)
    X_train = torch.randn(n_train, in_dim, dtype=DT)
    y_train = torch.randint(out_dim, (n_train,))
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=batch_size)
    return X_train, y_train, loader, torch.randn(n_test, in_dim, dtype=DT)


def toy_model(loader, n_epochs=500, in_dim=1, out_dim=1, regression=True):
    model = nn.Sequential(nn.Linear(in_dim, 50), nn.Tanh(), nn.Linear(50, out_dim)).to(DT)
    criterion = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), weight_decay=5e-4, lr=1e-2)
    for _ in range(n_epochs):
        for X, y in loader:
            optimizer.zero_grad()
            criterion(model(X), y).backward()
            optimizer.step()
    return model


@pytest.fixture(scope="module")
def regression_1d():
    X, y, loader, X_test = toy_regression_dataset_1d(SIGMA, batch_size=60)
    return X, loader, X_test[::10], toy_model(loader)


@pytest.fixture(scope="module")
def regression_3d():
    X, y, loader, X_test = toy_multivariate_regression_dataset(SIGMA, d_input=3, batch_size=60)
    return X, loader, X_test[::10], toy_model(loader, in_dim=3, out_dim=3)


# ---- tests/test_functional_laplace.py ------------------------------------------------------------------
@pytest.mark.parametrize("independent_outputs", [True, False])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_gp_equivalence_regression(regression_1d, subset, independent_outputs):
    X, loader, X_test, model = regression_1d
    full = Laplace(model, "regression", subset, "full", sigma_noise=SIGMA, prior_precision=2.0).fit(
        loader, progress=False)
    gp = FunctionalLaplace(model, "regression", n_subset=len(X), subset_of_weights=subset, sigma_noise=SIGMA,
                           independent_outputs=independent_outputs, prior_precision=2.0).fit(loader, progress=False)
    (m_full, v_full), (m_gp, v_gp) = full(X_test), gp(X_test)
    torch.testing.assert_close(m_full, m_gp, rtol=0, atol=0)
    torch.testing.assert_close(v_full, v_gp, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_gp_equivalence_regression_multivariate(regression_3d, subset):
    X, loader, X_test, model = regression_3d
    full = Laplace(model, "regression", subset, "full", sigma_noise=SIGMA, prior_precision=2.0).fit(
        loader, progress=False)
    gp = FunctionalLaplace(model, "regression", n_subset=len(X), subset_of_weights=subset, sigma_noise=SIGMA,
                           independent_outputs=False, prior_precision=2.0).fit(loader, progress=False)
    (m_full, v_full), (m_gp, v_gp) = full(X_test), gp(X_test)
    torch.testing.assert_close(m_full, m_gp, rtol=0, atol=0)
    torch.testing.assert_close(v_full, v_gp, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("independent_outputs", [True, False])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_gp_equivalence_classification(subset, independent_outputs, c=2):
    X, y, loader, X_test = toy_classification_dataset(batch_size=60, in_dim=4, out_dim=c)
    model = toy_model(loader, n_epochs=200, in_dim=4, out_dim=c, regression=False)
    full = Laplace(model, "classification", subset, "full", prior_precision=1.0).fit(loader, progress=False)
    gp = FunctionalLaplace(model, "classification", n_subset=len(X), subset_of_weights=subset,
                           independent_outputs=independent_outputs, prior_precision=1.0).fit(loader, progress=False)
    p_full, p_gp = full(X_test), gp(X_test)
    assert p_full.shape == p_gp.shape
    assert torch.equal(p_full.argmax(-1), p_gp.argmax(-1))


# ---- tests/test_functional_laplace_unit.py -----------------------------------------------------------
@pytest.fixture
def reg_loader():
    torch.manual_seed(240)
    return DataLoader(TensorDataset(torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)), batch_size=3)


@pytest.fixture
def model():
    torch.manual_seed(240)
    return nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).to(DT)


def test_sod_data_loader(reg_loader, model):
    """The subset of data is the same M rows at every fit (upstream: two passes over its SoD loader)."""
    M = 5
    first = FunctionalLaplace(model, "regression", M).fit(reg_loader, progress=False)
    second = FunctionalLaplace(model, "regression", M).fit(reg_loader, progress=False)
    X = reg_loader.dataset.tensors[0]
    assert len(first.subset) == M and len(set(first.subset.tolist())) == M
    torch.testing.assert_close(first._fitted["X"], X[first.subset], rtol=0, atol=0)
    torch.testing.assert_close(first._fitted["X"], second._fitted["X"], rtol=0, atol=0)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kernel_layout(reg_loader, model, subset):
    """K_MM [M C, M C]: entry (m C + c, m' C + c') = J_c(x_m) . J_c'(x_m'), explicit Jacobians of the
    covered parameters; the independent-outputs GP uses its output's M x M block."""
    gp = FunctionalLaplace(model, "regression", 6, subset_of_weights=subset).fit(reg_loader, progress=False)
    J = ref.jacobians(model, gp._fitted["X"])[:, :, gp.positions]  # [M, C, P_c]
    want = torch.einsum("mcp,ndp->mcnd", J, J).reshape(12, 12)
    torch.testing.assert_close(gp._fitted["K"], want, rtol=1e-12, atol=1e-12)
    gp.independent_outputs = True
    for c, (Kb, rows) in enumerate(gp._blocks(gp._fitted["K"])):
        torch.testing.assert_close(Kb, J[:, c] @ J[:, c].t(), rtol=1e-12, atol=1e-12)
        assert torch.equal(rows, torch.arange(6) * 2 + c)


def test_functional_samples(model, reg_loader):
    lap = FunctionalLaplace(model, "regression", n_subset=5).fit(reg_loader, progress=False)
    X, _ = reg_loader.dataset.tensors
    f = model(X)
    generator = torch.Generator()
    reg = {pt: lap.functional_samples(X, pred_type=pt, n_samples=100, generator=generator.manual_seed(123))
           for pt in ("glm", "nn")}
    for samples in reg.values():
        assert samples.shape == torch.Size([100, f.shape[0], f.shape[1]])
    # the samples should not be affected by the likelihood
    lap.likelihood = "classification"
    for pt, samples in reg.items():
        again = lap.functional_samples(X, pred_type=pt, n_samples=100, generator=generator.manual_seed(123))
        torch.testing.assert_close(again, samples, rtol=0, atol=0)
    # (ours) 'nn': the network at sample()'s draws, the same generator stream
    thetas = lap.sample(100, generator=generator.manual_seed(123))
    want = torch.stack([torch.func.functional_call(model, lap.layout.unflatten(t), (X,)) for t in thetas])
    torch.testing.assert_close(reg["nn"], want.detach(), rtol=1e-12, atol=1e-12)


def test_functional_fit_y_shape():
    torch.manual_seed(9999)
    X, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    model_1d = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 1)).to(DT)
    la = FunctionalLaplace(model_1d, "regression", 10, independent_outputs=False)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=3), progress=False)
    flat = FunctionalLaplace(model_1d, "regression", 10, independent_outputs=False)
    flat.fit(DataLoader(TensorDataset(X, y[:, 0]), batch_size=3), progress=False)  # (upstream: ValueError)
    torch.testing.assert_close(flat.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0)
    # (ours) targets that are neither [N] nor [N, C]
    with pytest.raises(ValueError):
        FunctionalLaplace(model_1d, "regression", 10).fit([(X, torch.randn(10, 2, dtype=DT))], progress=False)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("dtype", [torch.half, torch.float, torch.double])
@pytest.mark.parametrize("independent_outputs", [True, False])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_dtype(subset, dtype, independent_outputs, likelihood):
    torch.manual_seed(240)
    X = torch.randn((10, 3), dtype=dtype)
    Y = torch.randn((10, 3), dtype=dtype) if likelihood == "regression" else torch.randint(3, (10,))
    model = nn.Linear(3, 3, dtype=dtype)
    if dtype == torch.half:
        with pytest.raises(TypeError, match="float32 or float64 model"):
            FunctionalLaplace(model, likelihood, 10, subset_of_weights=subset)
        return
    la = FunctionalLaplace(model, likelihood, 10, subset_of_weights=subset,
                           independent_outputs=independent_outputs).fit(DataLoader(TensorDataset(X, Y), batch_size=10),
                                                                        progress=False)
    assert la._fitted["K"].dtype == torch.float64  # (ours: the GP algebra in float64, test_laplace_functional_last_layer)
    assert la.log_marginal_likelihood().dtype == dtype
    out = la(X)
    for t in (out if likelihood == "regression" else (out,)):
        assert t.dtype == dtype
