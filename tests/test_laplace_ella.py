"""ELLA (the accelerated linearised Laplace: a Nystrom feature map of the GP kernel fitted on all the
data). References: laplace-torch's ELLA on the same model, data, subset and output draws (its
features are J(x) D with an explicit [P, K] basis; ours come from cross kernels), and dense
algebra: where the M chosen Jacobian rows span the covered parameters and K is their rank, the
feature map is exact and ELLA is the full-GGN Laplace of those parameters."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _laplace_reference as ref
from _helpers import require
from pyfastbayes.laplace import ELLA, Laplace
from test_laplace_functional import DT, _problem


@pytest.mark.parametrize("lik", ["classification", "regression"])
@pytest.mark.parametrize("balanced", [False, True])
def test_against_laplace_torch(lik, balanced):
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    if not hasattr(laplace, "ELLA"):
        pytest.skip("this laplace-torch has no ELLA")
    if balanced and lik == "regression":
        return
    C = 3 if lik == "classification" else 2
    model, loader, _ = _problem(lik, C=C, train=True, deep=True)
    theirs = laplace.ELLA(model, lik, 30, 12, prior_precision=0.5, sigma_noise=0.8 if lik == "regression" else 1.0,
                          temperature=1.5)
    theirs.fit(loader, balanced=balanced)
    ours = ELLA(model, lik, 30, 12, prior_precision=0.5, sigma_noise=0.8 if lik == "regression" else 1.0,
                temperature=1.5, batch_size=16).fit(loader, progress=False, balanced=balanced)
    assert ours.n_data == theirs.n_data == 60
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    # the features agree up to an orthogonal transform (the eigenvectors' signs): compare the kernels
    _, phi = ours._features(xt)
    their_phi, _ = theirs._features(xt)
    torch.testing.assert_close(torch.einsum("nck,mdk->ncmd", phi, phi),
                               torch.einsum("nck,mdk->ncmd", their_phi, their_phi), rtol=1e-9, atol=1e-11)
    if lik == "classification":
        torch.testing.assert_close(ours(xt), theirs(xt, pred_type="gp", link_approx="probit"), rtol=1e-9, atol=1e-12)
        return
    (m1, v1), (m2, v2) = ours(xt), theirs(xt, pred_type="gp")
    torch.testing.assert_close(m1, m2, rtol=0, atol=0)
    torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-12)
    (_, c1), (_, c2) = ours(xt, joint=True), theirs(xt, pred_type="gp", joint=True)
    torch.testing.assert_close(c1, c2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_an_exact_feature_map_is_the_full_ggn_laplace(lik):
    """Last layer (8 + 1) x C = 27 / 18 parameters, M = 60 rows: the chosen rows span them, so with K
    = their count the Nystrom map is exact: f_var equals Laplace(last_layer, 'full') (the full
    softmax Hessian), and the draws' covariance is its posterior covariance."""
    C = 3 if lik == "classification" else 2
    model, loader, X = _problem(lik, C=C, deep=True)  # (untrained: its 8 tanh features are not saturated)
    P = 9 * C
    ella = ELLA(model, lik, 60, P, subset_of_weights="last_layer", prior_precision=0.5, temperature=2.0,
                sigma_noise=0.7 if lik == "regression" else 1.0).fit(loader, progress=False)
    full = Laplace(model, lik, "last_layer", "full", prior_precision=0.5, temperature=2.0,
                   sigma_noise=0.7 if lik == "regression" else 1.0).fit(loader, progress=False)
    xt = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    f_mu, f_var = ella.functional_variance(xt)
    want_mu, want_var = full.functional_variance(xt)
    torch.testing.assert_close(f_mu, want_mu, rtol=0, atol=0)
    torch.testing.assert_close(f_var, want_var, rtol=1e-8, atol=1e-12)
    draws = ella.sample(60_000, generator=torch.Generator().manual_seed(0))
    theta = ref.flat(model)
    others = torch.ones(theta.numel(), dtype=torch.bool)
    others[ella.positions] = False
    assert torch.equal(draws[:, others], theta[others].expand(60_000, -1))
    cov = full.posterior_covariance
    emp = torch.cov(draws[:, ella.positions].T)
    assert float((draws[:, ella.positions].mean(0) - theta[ella.positions]).abs().max()
                 / cov.diagonal().sqrt().max()) < 0.05
    assert float((emp - cov).norm() / cov.norm()) < 0.04


def test_truncated_map_against_dense_nystrom():
    """K < rank, all weights: phi(x) phi(x')^T is the Nystrom kernel J(x) R^T (R R^T)_K^+ R J(x')^T
    of the chosen rows R (dense Jacobians), and f_var = phi A^-1 phi^T with A = sum phi^T H phi + delta I."""
    model, loader, X = _problem("classification", train=True)
    ella = ELLA(model, "classification", 25, 8, prior_precision=0.3, batch_size=16).fit(loader, progress=False)
    J = ref.jacobians(model, X)  # [N, C, P]
    rows = J[ella.subset, ella._fitted["choices"]]  # [M, P]
    lam, V = torch.linalg.eigh(rows @ rows.T)
    lam, V = lam.flip(0)[:8], V.flip(1)[:, :8]
    D = rows.T @ V / lam.sqrt()  # laplace-torch's dual directions [P, K]
    phi = J @ D  # [N, C, K]
    p = ref.outputs(model, X).softmax(-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    A = torch.einsum("nck,ncd,ndl->kl", phi, H, phi) + 0.3 * torch.eye(8, dtype=DT)
    xt = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    pt = ref.jacobians(model, xt) @ D
    want = pt @ torch.linalg.solve(A, pt.transpose(1, 2))
    torch.testing.assert_close(ella.functional_variance(xt)[1], want, rtol=1e-9, atol=1e-12)


def test_tuning_state_and_predictives():
    model, loader, X = _problem("regression", C=2, train=True)
    ella = ELLA(model, "regression", 40, 15, batch_size=16).fit(loader, progress=False)
    g = torch.Generator().manual_seed(3)
    Xv = torch.randn(30, 3, dtype=DT, generator=g)
    Yv = torch.sin(Xv[:, :2]) + 0.3 * torch.randn(30, 2, dtype=DT, generator=g)
    grid = [(d, s) for d in (0.1, 1.0, 10.0) for s in (0.2, 0.5)]
    nll = {}
    for d, s in grid:  # the NLL of N(f_mu, f_var + sigma^2) per output, by hand
        ella.prior_precision, ella.sigma_noise = d, s
        mu, var = ella(Xv)
        v = torch.diagonal(var, dim1=1, dim2=2) + s ** 2
        nll[(d, s)] = float((0.5 * ((Yv - mu).square() / v + v.log() + math.log(2 * math.pi))).sum(1).mean())
    best = min(nll, key=nll.get)
    ella.optimize_hyperparameters([(Xv, Yv)], grid)
    assert (float(ella.prior_precision), float(ella.sigma_noise)) == pytest.approx(best, rel=1e-12)
    ella.sigma_noise = 0.5
    ella.optimize_prior_precision("gridsearch", val_loader=[(Xv, Yv)], log_prior_prec_range=(-1, 1), grid_size=3)
    assert min(abs(float(ella.prior_precision) - d) / d for d in (0.1, 1.0, 10.0)) < 1e-12
    again = ELLA(model, "regression", 40, 15, batch_size=16)
    again.load_state_dict(ella.state_dict())
    torch.testing.assert_close(again(Xv), ella(Xv), rtol=0, atol=0)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(again.sample(3, generator=gen()), ella.sample(3, generator=gen()), rtol=0, atol=0)
    # 'nn' draws: the network at sample()'s weights; predict: their BMA
    f = ella.functional_samples(Xv[:4], "nn", n_samples=3, generator=gen())
    thetas = ella.sample(3, generator=gen())
    want = torch.stack([torch.func.functional_call(model, ella.layout.unflatten(t), (Xv[:4],)) for t in thetas])
    torch.testing.assert_close(f, want.detach(), rtol=1e-12, atol=1e-12)
    mean, var = ella.predict(Xv[:4], n_samples=5, generator=gen())
    assert mean.shape == var.shape == (4, 2)
    with pytest.raises(ValueError, match="subsample_size"):
        ELLA(model, "regression", 30, 15).load_state_dict(ella.state_dict())


def test_map_style_and_plain_loaders_draw_the_same_subset():
    """A DataLoader over a dataset reads the M rows by index; a list of batches gathers them: the same
    rows, the same posterior."""
    model, loader, X = _problem("classification", train=True)
    a = ELLA(model, "classification", 20, 10, batch_size=16).fit(loader, progress=False)
    b = ELLA(model, "classification", 20, 10, batch_size=16).fit(list(loader), progress=False)
    assert torch.equal(a.subset, b.subset)
    torch.testing.assert_close(a(X[:5]), b(X[:5]), rtol=1e-12, atol=1e-14)


def test_bad_input_and_failed_fits():
    model, loader, X = _problem("classification")
    with pytest.raises(ValueError, match="n_eigenvalues = 30 must be at most subsample_size = 20"):
        ELLA(model, "classification", 20, 30)
    with pytest.raises(ValueError, match="prior_mean=0 only"):
        ELLA(model, "classification", 20, 10, prior_mean=0.5)
    with pytest.raises(ValueError, match="larger than the 60 training rows"):
        ELLA(model, "classification", 100, 10).fit(loader, progress=False)
    with pytest.raises(RuntimeError, match="call fit"):
        ELLA(model, "classification", 20, 10)(X[:2])
    with pytest.raises(ValueError, match="classification only"):
        ELLA(model, "regression", 20, 10).fit(loader, balanced=True)
    fitted = ELLA(model, "classification", 20, 10).fit(loader, progress=False)
    with pytest.raises(NotImplementedError, match="no marginal likelihood"):
        fitted.log_marginal_likelihood()
    with pytest.raises(ValueError, match="ELLA has no marginal likelihood"):
        fitted.optimize_prior_precision("marglik")
    with pytest.raises(ValueError, match="first positional argument is pred_type"):
        fitted.optimize_prior_precision("gp", "gridsearch", val_loader=[(X, torch.zeros(60, dtype=torch.long))])
    with pytest.raises(ValueError, match="pairs are for regression"):
        fitted.optimize_hyperparameters([(X, torch.zeros(60, dtype=torch.long))], [(1.0, 0.5)])
    with pytest.raises(ValueError, match="grid is empty"):
        fitted.optimize_hyperparameters([(X, torch.zeros(60, dtype=torch.long))], [])
    # a last layer has rank (8 + 1) x 3 = 27: K = 28 directions do not exist; nothing changes
    ll = ELLA(model, "classification", 40, 28, subset_of_weights="last_layer")
    with pytest.raises(ValueError, match="above the numerical tolerance, fewer than n_eigenvalues = 28"):
        ll.fit(loader, progress=False)
    with pytest.raises(RuntimeError, match="finds its layer in fit"):
        ll.positions
    before = fitted(X[:3])
    with pytest.raises(ValueError, match="class indices"):
        fitted.fit([(X, torch.rand(60, dtype=DT))], progress=False)
    torch.testing.assert_close(fitted(X[:3]), before, rtol=0, atol=0)


def test_float32_model():
    torch.manual_seed(0)
    X, y = torch.randn(80, 4), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    loader = DataLoader(TensorDataset(X, y), batch_size=32)
    ella = ELLA(model, "classification", 50, 20).fit(loader, progress=False)
    p = ella(X[:5])
    assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    m64 = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    e64 = ELLA(m64, "classification", 50, 20).fit(DataLoader(TensorDataset(X.double(), y), batch_size=32),
                                                  progress=False)
    torch.testing.assert_close(ella.functional_variance(X[:5])[1].double(), e64.functional_variance(X[:5].double())[1],
                               rtol=1e-3, atol=1e-5)


def test_laplace_torch_call_forms_and_attributes():
    """laplace-torch's keywords (pred_type, log_prior_prec_min / _max) and its attributes
    dual_directions [P, K] and feature_gram [K, K]."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    if not hasattr(laplace, "ELLA"):
        pytest.skip("this laplace-torch has no ELLA")
    model, loader, X = _problem("classification", train=True)
    ours = ELLA(model, "classification", 30, 12, batch_size=16).fit(loader, progress=False)
    theirs = laplace.ELLA(model, "classification", 30, 12)
    theirs.fit(loader)
    # the bases agree up to the eigenvectors' signs: D D^T and G in D's coordinates
    D, Dt = ours.dual_directions, theirs.dual_directions
    assert D.shape == Dt.shape
    torch.testing.assert_close(D @ D.T, Dt @ Dt.T, rtol=1e-9, atol=1e-12)
    signs = torch.sign((D * Dt).sum(0))
    torch.testing.assert_close(ours.feature_gram * signs[:, None] * signs, theirs.feature_gram, rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(5)
    Xv, yv = torch.randn(30, 3, dtype=DT, generator=g), torch.randint(0, 3, (30,), generator=g)
    ours.optimize_prior_precision(pred_type="gp", method="gridsearch", val_loader=[(Xv, yv)], log_prior_prec_min=-2,
                                  log_prior_prec_max=2, grid_size=9)
    theirs.optimize_prior_precision(pred_type="gp", method="gridsearch", val_loader=DataLoader(TensorDataset(Xv, yv),
                                                                                            batch_size=30),
                                    log_prior_prec_min=-2, log_prior_prec_max=2, grid_size=9)
    assert float(ours.prior_precision) == pytest.approx(float(theirs.prior_precision), rel=1e-6)  # (its grid: float32)


def test_the_subset_is_drawn_from_the_rows_the_loader_serves():
    """A loader restricted by its sampler (a train / validation split of one dataset, drop_last)
    draws the basis from its own rows, as laplace-torch's training_indices does; an
    IterableDataset and a loader without automatic batching are gathered."""
    from torch.utils.data import IterableDataset, SubsetRandomSampler

    torch.manual_seed(0)
    X, y = torch.randn(80, 3, dtype=DT), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ds = TensorDataset(X, y)
    train = DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(list(range(40))))
    ella = ELLA(model, "classification", 20, 8).fit(train, progress=False)
    assert bool((ella.subset < 40).all()) and ella.n_data == 40
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    if hasattr(laplace, "ELLA"):
        theirs = laplace.ELLA(model, "classification", 20, 8)
        theirs.fit(train)
        torch.testing.assert_close(ella(X[40:45]), theirs(X[40:45], pred_type="gp", link_approx="probit"),
                                   rtol=1e-9, atol=1e-12)
    dropped = ELLA(model, "classification", 30, 8).fit(DataLoader(ds, batch_size=16, drop_last=True), progress=False)
    assert bool((dropped.subset < 80).all()) and dropped.n_data == 80  # (16 x 5: nothing dropped at 80 rows)
    dropped = ELLA(model, "classification", 30, 8).fit(DataLoader(TensorDataset(X[:75], y[:75]), batch_size=16,
                                                                  drop_last=True), progress=False)
    assert bool((dropped.subset < 64).all()) and dropped.n_data == 64
    # validation loaders are scored on their own rows
    val = DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(list(range(40, 80))))
    a = ELLA(model, "classification", 20, 8).fit(train, progress=False)
    b = ELLA(model, "classification", 20, 8).fit(train, progress=False)
    a.optimize_hyperparameters(val, [0.01, 1.0, 100.0])
    b.optimize_hyperparameters([(X[40:], y[40:])], [0.01, 1.0, 100.0])
    assert float(a.prior_precision) == float(b.prior_precision)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(X, y))

        def __len__(self):
            return 80

    streamed = ELLA(model, "classification", 20, 8).fit(DataLoader(Stream(), batch_size=16), progress=False)
    listed = ELLA(model, "classification", 20, 8).fit(list(DataLoader(ds, batch_size=16)), progress=False)
    torch.testing.assert_close(streamed(X[:4]), listed(X[:4]), rtol=1e-12, atol=1e-14)
    batches = [(X[i:i + 20], y[i:i + 20]) for i in range(0, 80, 20)]
    unbatched = ELLA(model, "classification", 20, 8).fit(DataLoader(batches, batch_size=None), progress=False)
    assert unbatched.n_data == 80
    torch.testing.assert_close(unbatched(X[:4]), listed(X[:4]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_fit_history_against_laplace_torch(lik):
    """fit(val_loader=, val_steps=): the validation NLL every val_steps batches and after the last,
    the rows seen after each batch, and one tuning record per grid candidate, as laplace-torch
    ELLA's ``fit_history_``; each recorded NLL is the one of an ELLA fitted on the batches seen
    so far."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    if not hasattr(laplace, "ELLA"):
        pytest.skip("this laplace-torch has no ELLA")
    C = 3 if lik == "classification" else 2
    model, loader, _ = _problem(lik, C=C, train=True, deep=True)
    g = torch.Generator().manual_seed(7)
    Xv = torch.randn(20, 3, dtype=DT, generator=g)
    Yv = torch.randint(0, C, (20,), generator=g) if lik == "classification" else torch.randn(20, C, dtype=DT, generator=g)
    val = DataLoader(TensorDataset(Xv, Yv), batch_size=8)
    theirs = laplace.ELLA(model, lik, 30, 12, prior_precision=0.5)
    theirs.fit(loader, val_loader=val, val_steps=3)
    ours = ELLA(model, lik, 30, 12, prior_precision=0.5, batch_size=16).fit(loader, progress=False, val_loader=val,
                                                                               val_steps=3)
    h, t = ours.fit_history_, theirs.fit_history_
    assert h["processed_examples"] == t["processed_examples"] and len(h["processed_examples"]) == len(list(loader))
    nb = len(list(loader))
    assert nb % 3 and len(h["val_nll"]) == len(t["val_nll"]) == nb // 3 + 1  # after batches 3, 6, ... and the last
    assert h["val_nll"] == pytest.approx(t["val_nll"], rel=1e-8)
    # the first record: an ELLA fitted on the first three batches alone, scored by hand
    first = ELLA(model, lik, 30, 12, prior_precision=0.5, batch_size=16).fit(loader, progress=False)
    first._fitted["G"].zero_()
    for xb, _ in list(loader)[:3]:
        fb, phi = first._features(xb)
        phi = phi.double()
        if lik == "regression":
            first._fitted["G"] += torch.einsum("nck,ncl->kl", phi, phi)
        else:
            p = fb.double().softmax(-1)
            H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            first._fitted["G"] += torch.einsum("nck,ncd,ndl->kl", phi, H, phi)
    mu, var = first.functional_variance(Xv)
    if lik == "regression":
        v = torch.diagonal(var, dim1=1, dim2=2) + 1.0
        want = float((0.5 * ((Yv - mu).square() / v + v.log() + math.log(2 * math.pi))).sum(1).mean())
    else:
        want = float(torch.nn.functional.nll_loss(first(Xv).log(), Yv))
    assert h["val_nll"][0] == pytest.approx(want, rel=1e-9)
    # tuning records, then a refit starts a fresh history
    grid = [0.1, 1.0, 10.0]
    ours.optimize_hyperparameters(val, grid)
    theirs.optimize_hyperparameters(val, grid)
    assert [r["prior_precision"] for r in h["tuning"]] == pytest.approx(grid, rel=1e-12)
    assert [r["val_nll"] for r in h["tuning"]] == pytest.approx([r["val_nll"] for r in t["tuning"]], rel=1e-8)
    # the history travels with the state (laplace-torch's state_dict has it too), as a copy
    state = ours.state_dict()
    again = ELLA(model, lik, 30, 12, batch_size=16)
    again.load_state_dict(state)
    assert again.fit_history_ == h and again.fit_history_ is not h
    state["fit_history"]["val_nll"].append(1.0)
    assert again.fit_history_ == h
    del state["fit_history"]  # a state saved before the history existed: an empty one
    again.load_state_dict(state)
    assert again.fit_history_ == {"processed_examples": [], "val_nll": [], "tuning": []}
    state["fit_history"] = {"val_nll": []}
    with pytest.raises(ValueError, match="fit_history"):
        again.load_state_dict(state)
    ours.fit(loader, progress=False)
    assert ours.fit_history_["val_nll"] == [] and ours.fit_history_["tuning"] == []
    with pytest.raises(ValueError, match="val_loader"):
        ours.fit(loader, progress=False, val_steps=2)
    with pytest.raises(ValueError, match="val_steps"):
        ours.fit(loader, progress=False, val_loader=val, val_steps=0)


def test_cached_basis_columns_follow_refits_and_loads():
    """The basis D's columns per block are gathered once per fit (kept with the fit): predictions
    after a refit on other weights, or after a load, equal a fresh ELLA's, never the old basis's."""
    model, loader, X = _problem("classification", C=3, train=True, deep=True)
    ella = ELLA(model, "classification", 30, 12, batch_size=16).fit(loader, progress=False)
    assert ella._fitted["dual"] is not None  # (the explicit-basis path, the one with the cache)
    before = ella(X[:5])
    saved, weights = ella.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    ella.fit(loader, progress=False)
    fresh = ELLA(model, "classification", 30, 12, batch_size=16).fit(loader, progress=False)
    after = ella(X[:5])
    torch.testing.assert_close(after, fresh(X[:5]), rtol=0, atol=0)
    assert not torch.allclose(after, before)
    model.load_state_dict(weights)
    ella.load_state_dict(saved)
    torch.testing.assert_close(ella(X[:5]), before, rtol=0, atol=0)
