"""pyfastbayes.laplace.Laplace refuses bad input with errors naming the argument, and a call that
fails changes nothing (validate everything, then assign): load_state_dict, log_marginal_likelihood,
the gridsearch (validation targets, the grid's range), the constructor's sigma_noise / prior_mean /
eigh_method / last-layer prior, data of another dtype than the model's; the GLM predictive of no
rows is empty like the 'nn' one. fp64, small models."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace

DT = torch.float64
STRUCTURES = ["kron", "diag", "full"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(out=3, dtype=DT):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(dtype)


def data(likelihood="classification", C=3, n=30, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=dtype)
    if likelihood == "classification":
        y = torch.randint(0, C, (n,), generator=g)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (n,), generator=g).to(dtype)
    else:
        y = torch.randn(n, C, generator=g, dtype=dtype)
    return X, y


def fitted(structure="kron", likelihood="classification", out=3, **kw):
    model = mlp(out)
    X, y = data(likelihood, out)
    la = Laplace(model, likelihood, hessian_structure=structure, **kw).fit([(X[:15], y[:15]), (X[15:], y[15:])],
                                                                            progress=False)
    return la, model, X, y


def snapshot(la):
    """Everything a failed call must leave as it was."""
    return dict(lml=float(la.log_marginal_likelihood()), dense=la.to_dense().clone(), prior=la.prior_precision.clone(),
                prior_mean=la.prior_mean.clone(), sigma=la.sigma_noise.clone(), n=la.n_data, mean=la.mean.clone())


def assert_unchanged(la, before):
    after = snapshot(la)
    assert after["lml"] == before["lml"] and after["n"] == before["n"]
    for k in ("dense", "prior", "prior_mean", "sigma", "mean"):
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k


# ---- load_state_dict: every entry checked before anything is assigned --------------------------------------
def _corrupt(key, value):
    def f(st):
        st = dict(st)
        st["prior_precision"] = torch.tensor(5.0, dtype=DT)  # a good entry that must not be loaded alone
        if value is _DROP:
            del st[key]
        else:
            st[key] = value(st[key]) if callable(value) else value
        return st
    return f


_DROP = object()


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("corrupt, exc, text", [
    (_corrupt("sigma_noise", None), TypeError, r"state_dict\['sigma_noise'\] must be a float"),
    (_corrupt("sigma_noise", torch.tensor(-1.0)), ValueError, r"state_dict\['sigma_noise'\] must be a finite number"),
    (_corrupt("sigma_noise", torch.tensor(2.0)), ValueError, "regression noise"),
    (_corrupt("curvature_tensors", lambda ts: [t.clone().fill_(math.nan) for t in ts]), ValueError,
     "curvature tensors hold NaN"),
    (_corrupt("curvature_tensors", lambda ts: ts[:-1]), ValueError, "do not fit this model's blocks"),
    (_corrupt("prior_mean", torch.full((7,), math.nan)), ValueError, r"state_dict\['prior_mean'\] must be a float or"),
    (_corrupt("prior_mean", torch.tensor(math.nan)), ValueError, r"state_dict\['prior_mean'\] must be finite"),
    (_corrupt("n_data", -5), ValueError, r"state_dict\['n_data'\] must be an int >= 1"),
    (_corrupt("n_data", 2.5), ValueError, r"state_dict\['n_data'\] must be an int >= 1"),
    (_corrupt("n_outputs", 0), ValueError, r"state_dict\['n_outputs'\] must be an int >= 1"),
    (_corrupt("loss", torch.tensor(math.inf)), ValueError, r"state_dict\['loss'\] holds NaN or inf"),
    (_corrupt("counts", "abc"), ValueError, r"state_dict\['counts'\] must be"),
    (_corrupt("counts", lambda c: [-1] * len(c) if c else "x"), ValueError, r"state_dict\['counts'\] must be"),
    (_corrupt("sigma_noise", _DROP), ValueError, "state_dict has no 'sigma_noise'"),
    (lambda st: {**st, "prior_precision": torch.tensor(-1.0)}, ValueError,
     r"state_dict\['prior_precision'\] must be finite and > 0"),
])
def test_a_bad_state_dict_changes_nothing(structure, corrupt, exc, text):
    la, *_ = fitted(structure)
    state = corrupt(la.state_dict())
    la.prior_precision = 1.0
    before = snapshot(la)
    with pytest.raises(exc, match=text):
        la.load_state_dict(state)
    assert_unchanged(la, before)
    assert float(la.prior_precision) == 1.0


def test_a_failing_eigendecomposition_in_load_changes_nothing(monkeypatch):
    """The eigendecomposition of the loaded factors is the last step that may fail: it runs
    before anything is assigned."""
    import pyfastbayes.laplace.precision as precision
    la, *_ = fitted("kron", prior_precision=1.0)
    state = la.state_dict()
    state["prior_precision"] = torch.tensor(5.0, dtype=DT)
    state["prior_mean"] = torch.tensor(0.5, dtype=DT)
    before = snapshot(la)

    def fail(*args, **kwargs):
        raise RuntimeError("eigh failed")
    monkeypatch.setattr(precision, "eigh_many", fail)
    with pytest.raises(RuntimeError, match="eigh failed"):
        la.load_state_dict(state)
    monkeypatch.undo()
    assert_unchanged(la, before)
    la.load_state_dict(state)  # the good state loads, all of it
    assert float(la.prior_precision) == 5.0 and float(la.prior_mean) == 0.5


def test_last_layer_load_with_an_unknown_layer_name_is_refused_and_finds_nothing():
    la, model, X, y = fitted("kron", subset_of_weights="last_layer")
    state = la.state_dict()
    for name, exc, text in [("nonexistent", ValueError, "'nonexistent' is not a module of this model"),
                            ("1", ValueError, r"'1' is not an nn.Linear"), (3, ValueError, "must be a module name")]:
        fresh = Laplace(model, subset_of_weights="last_layer")
        with pytest.raises(exc, match=text):
            fresh.load_state_dict({**state, "last_layer": name})
        with pytest.raises(RuntimeError, match="finds its layer in fit"):
            fresh.block_names  # still unset
        bad = {**state, "prior_precision": torch.ones(7, dtype=DT)}  # its length is checked against the layer
        with pytest.raises(ValueError, match=r"state_dict\['prior_precision'\] must have shape"):
            fresh.load_state_dict(bad)
        with pytest.raises(RuntimeError, match="finds its layer in fit"):
            fresh.block_names
        fresh.load_state_dict(state)
        assert float(fresh.log_marginal_likelihood()) == float(la.log_marginal_likelihood())


# ---- log_marginal_likelihood: both arguments checked before either is stored -------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_marginal_likelihood_bad_arguments_change_nothing(structure):
    la, *_ = fitted(structure, "regression", out=2)
    before = snapshot(la)
    for kw, exc, text in [(dict(prior_precision=3.0, sigma_noise=-1.0), ValueError, "sigma_noise must be a finite"),
                          (dict(prior_precision=3.0, sigma_noise=math.nan), ValueError, "sigma_noise must be a finite"),
                          (dict(prior_precision=3.0, sigma_noise="a"), TypeError, "sigma_noise must be a float"),
                          (dict(prior_precision=-3.0, sigma_noise=0.5), ValueError, "prior_precision must be finite"),
                          (dict(sigma_noise=torch.ones(2)), ValueError, r"sigma_noise must be a scalar.*\(2,\)")]:
        with pytest.raises(exc, match=text):
            la.log_marginal_likelihood(**kw)
        assert_unchanged(la, before)
    la_c, *_ = fitted(structure)
    before = snapshot(la_c)
    with pytest.raises(ValueError, match="regression noise"):
        la_c.log_marginal_likelihood(prior_precision=5.0, sigma_noise=2.0)
    assert_unchanged(la_c, before)
    # a one-value tensor sigma keeps its graph (differentiable evidence)
    s = torch.tensor([0.7], dtype=DT, requires_grad=True)
    la.log_marginal_likelihood(sigma_noise=s).backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


# ---- gridsearch: validation targets and the grid's range ---------------------------------------------------
@pytest.mark.parametrize("likelihood, out, bad, text", [
    ("classification", 3, lambda X, y: [(X, y[:3])], r"val_loader batch 0: \(3,\) targets for inputs \(30, 4\)"),
    ("classification", 3, lambda X, y: [(X[:10], y[:10]), (X[10:], y[10:12])], "val_loader batch 1"),
    ("classification", 3, lambda X, y: [(X, y.to(DT))], r"val_loader: .*class indices \[N\] \(an integer tensor\)"),
    ("classification", 3, lambda X, y: [(X, y + 5)], r"val_loader: targets must be class indices in \[0, 3\)"),
    ("classification", 3, lambda X, y: [(X, y - 5)], r"val_loader: targets must be class indices in \[0, 3\)"),
    ("binary", 1, lambda X, y: [(X, y[:4])], "val_loader batch 0"),
    ("binary", 1, lambda X, y: [(X, y * 0.5)], "val_loader: likelihood='binary' needs targets 0 or 1"),
    ("regression", 2, lambda X, y: [(X, y[:, :1])], "val_loader: likelihood='regression' needs targets of the"),
    ("regression", 2, lambda X, y: [(X, y * math.nan)], "val_loader: regression targets contain NaN"),
])
def test_gridsearch_refuses_bad_validation_targets(likelihood, out, bad, text):
    la, model, X, y = fitted("kron", likelihood, out)
    Xv, yv = data(likelihood, out, seed=1)
    before = snapshot(la)
    for pred_type in ("glm", "nn"):
        with pytest.raises(ValueError, match=text):
            la.optimize_prior_precision("gridsearch", val_loader=bad(Xv, yv), pred_type=pred_type, n_samples=2)
        assert_unchanged(la, before)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("rng, exc, text", [
    ((-400, 400), ValueError, r"leaves the usable span \[-307.65, 308.25\] of the model's torch.float64"),
    ((-4, 309), ValueError, "leaves the usable span"),
    ((math.nan, 1), ValueError, "two finite numbers low < high"),
    ((-math.inf, 1), ValueError, "two finite numbers low < high"),
    ((4, -4), ValueError, "two finite numbers low < high"),
    ((2, 2), ValueError, "two finite numbers low < high"),
    (3, TypeError, r"log_prior_prec_range must be two numbers \(low, high\)"),
    ((1, 2, 3), TypeError, "log_prior_prec_range must be two numbers"),
    (("a", 1), TypeError, "log_prior_prec_range must be two numbers"),
])
def test_gridsearch_refuses_a_bad_range(structure, rng, exc, text):
    la, model, X, y = fitted(structure)
    before = snapshot(la)
    with pytest.raises(exc, match=text):
        la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], log_prior_prec_range=rng)
    assert_unchanged(la, before)


def test_gridsearch_range_follows_the_model_dtype_and_stores_a_finite_prior():
    model = mlp(dtype=torch.float32)
    X, y = data(dtype=torch.float32)
    la = Laplace(model).fit([(X, y)], progress=False)
    with pytest.raises(ValueError, match=r"usable span \[-37.93, 38.53\] of the model's torch.float32"):
        la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], log_prior_prec_range=(0, 40))
    assert float(la.prior_precision) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lowest NLL may lie at an end of this grid
        got = la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], log_prior_prec_range=(-37.9, 38.5),
                                          grid_size=5)
    assert math.isfinite(float(got)) and float(got) > 0
    assert bool(torch.isfinite(la.log_marginal_likelihood()))


def test_gridsearch_with_no_finite_nll_changes_nothing():
    la, model, X, y = fitted("kron")
    before = snapshot(la)
    with pytest.raises(RuntimeError, match="NaN or infinite at every grid point"):
        la.optimize_prior_precision("gridsearch", val_loader=[(X * math.nan, y)])
    assert_unchanged(la, before)


# ---- the constructor -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, text", [
    (dict(sigma_noise=torch.tensor(-1.0)), ValueError, "sigma_noise must be a finite number > 0, got -1.0"),
    (dict(sigma_noise=torch.tensor(math.nan)), ValueError, "sigma_noise must be a finite number > 0, got nan"),
    (dict(sigma_noise=torch.tensor(math.inf)), ValueError, "sigma_noise must be a finite number > 0"),
    (dict(sigma_noise=torch.tensor([1.0, 2.0])), ValueError, r"sigma_noise must be a scalar.*\(2,\)"),
    (dict(sigma_noise="a"), TypeError, "sigma_noise must be a float > 0 or a one-value tensor, got str"),
    (dict(sigma_noise=True), TypeError, "sigma_noise must be a float"),
    (dict(prior_mean=math.nan), ValueError, "prior_mean must be finite"),
    (dict(prior_mean=torch.tensor([0.0, math.inf])), ValueError, "prior_mean must be"),
    (dict(prior_mean="x"), TypeError, "prior_mean must be a float or a tensor"),
    (dict(eigh_method="nope"), ValueError, r"eigh_method must be one of \('auto'"),
])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_constructor_checks_tensor_and_float_arguments_alike(kw, exc, text, subset):
    with pytest.raises(exc, match=text):
        Laplace(mlp(), "regression", subset_of_weights=subset, **kw)


def test_a_tensor_sigma_noise_equals_the_float():
    X, y = data("regression")
    a = Laplace(mlp(), "regression", sigma_noise=torch.tensor(0.5)).fit([(X, y)], progress=False)
    b = Laplace(mlp(), "regression", sigma_noise=0.5).fit([(X, y)], progress=False)
    assert float(a.log_marginal_likelihood()) == float(b.log_marginal_likelihood())
    with pytest.raises(ValueError, match="regression noise"):
        Laplace(mlp(), sigma_noise=torch.tensor(2.0))


@pytest.mark.parametrize("value, exc, text", [(0.0, ValueError, "finite and > 0"), (-1.0, ValueError, "finite and > 0"),
                                              (math.nan, ValueError, "finite and > 0"),
                                              (torch.ones(2, 2), ValueError, "must have shape"),
                                              ("1", TypeError, "positive float or a tensor")])
def test_last_layer_prior_is_checked_at_once(value, exc, text):
    with pytest.raises(exc, match=f"prior_precision.*{text}"):
        Laplace(mlp(), subset_of_weights="last_layer", prior_precision=value)
    la = Laplace(mlp(), subset_of_weights="last_layer", prior_precision=0.5)
    with pytest.raises(exc, match=text):
        la.prior_precision = value
    assert float(la.prior_precision) == 0.5


def test_last_layer_fit_that_fails_forgets_the_layer():
    """A last-layer prior of the wrong length is found at fit (the layer is known only then): the
    failed fit leaves the Laplace unfitted with no layer, and a good prior then fits."""
    X, y = data()
    la = Laplace(mlp(), subset_of_weights="last_layer", prior_precision=torch.ones(7, dtype=DT))
    with pytest.raises(ValueError, match=r"prior_precision must have shape .*\[P\] = \[18\]"):
        la.fit([(X, y)], progress=False)
    assert la.layers is None and not hasattr(la, "last_layer_name")
    with pytest.raises(RuntimeError, match="finds its layer in fit"):
        la.block_names
    la.prior_precision = torch.ones(1, dtype=DT)
    with pytest.raises(ValueError, match="class indices"):
        la.fit([(X, y + 5)], progress=False)  # bad targets: the same
    assert la.layers is None
    assert la.fit([(X, y)], progress=False).n_data == 30 and la.block_names == ["2.weight+bias"]


# ---- fit and predict misuse -----------------------------------------------------------------------------------
def test_fit_of_a_bare_pair_says_how_to_pass_batches():
    X, y = data()
    with pytest.raises(TypeError, match=r"was \(X, Y\) passed itself\? .*e\.g\. \[\(X, Y\)\] or a DataLoader"):
        Laplace(mlp()).fit((X, y), progress=False)


@pytest.mark.parametrize("model_dtype, data_dtype, cast", [(torch.float32, DT, r"(x|inputs)\.to\(torch\.float32\)"),
                                                            (DT, torch.float32, r"(x|inputs)\.to\(torch\.float64\)")])
def test_data_of_another_dtype_is_named(model_dtype, data_dtype, cast):
    X, y = data()
    la = Laplace(mlp(dtype=model_dtype)).fit([(X.to(model_dtype), y)], progress=False)
    before = snapshot(la)
    # one message (nn.inputs.dtype_mismatch) whichever layer sees the mismatch first
    text = f"inputs are {data_dtype} but the model's parameters are {model_dtype}: cast the data \\({cast}\\)"
    with pytest.raises(TypeError, match=text):
        la.fit([(X.to(data_dtype), y)], progress=False)
    assert_unchanged(la, before)
    for pred_type in ("glm", "nn"):
        with pytest.raises(TypeError, match=text):
            la.predict(X.to(data_dtype), pred_type=pred_type, n_samples=2)
    for pred_type in ("glm", "nn"):
        with pytest.raises(TypeError, match=text):
            la.optimize_prior_precision("gridsearch", val_loader=[(X.to(data_dtype), y)], pred_type=pred_type,
                                        n_samples=2)
    assert_unchanged(la, before)
    with pytest.raises(TypeError, match=text):  # the last layer's probe forward said "mat1 and mat2 must have ..."
        Laplace(mlp(dtype=model_dtype), subset_of_weights="last_layer").fit([(X.to(data_dtype), y)], progress=False)


def test_batch_size_is_checked_and_used_on_both_paths():
    la, model, X, y = fitted("kron")
    for pred_type in ("glm", "nn"):
        for bad, exc in [(0, ValueError), (-1, ValueError), (2.0, TypeError)]:
            with pytest.raises(exc, match="batch_size must be an int"):
                la.predict(X, pred_type=pred_type, batch_size=bad)
            with pytest.raises(exc, match="batch_size must be an int"):
                la(X, pred_type=pred_type, batch_size=bad)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = la.predict(X, pred_type="nn", n_samples=3, generator=g(), batch_size=7)
    b = la.predict(X, pred_type="nn", n_samples=3, generator=g())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood, out", [("classification", 3), ("binary", 1), ("regression", 2)])
def test_glm_predict_of_no_rows_is_empty_like_nn(structure, likelihood, out):
    la, model, X, y = fitted(structure, likelihood, out)
    links = ["probit", "mc"] + (["bridge"] if likelihood == "classification" else [])
    for link in links:
        glm = la.predict(X[:0], link_approx=link)
        nn_ = la.predict(X[:0], pred_type="nn", n_samples=2)
        if likelihood == "regression":
            for g, n in zip(glm, nn_):
                assert g.shape == n.shape == (0, out) and g.dtype == n.dtype == DT
        else:
            assert glm.shape == nn_.shape and glm.dtype == nn_.dtype == DT
    f_mu, f_var = la.functional_variance(X[:0])
    assert f_mu.shape == (0, out) and f_var.shape == (0, out, out)
    with pytest.raises(ValueError, match="x yielded no inputs"):
        la.predict([])


# ---- prior_mean assigned after construction (ninth session: it was a plain attribute, unchecked) ----------
@pytest.mark.parametrize("bad, exc, match", [
    (torch.full((7,), 0.5), ValueError, r"prior_mean must be a float or a tensor \[P\] = \["),
    (float("nan"), ValueError, "prior_mean must be finite"),
    ("0.5", TypeError, "prior_mean must be a float or a tensor"),
    (torch.ones(3, dtype=torch.complex64), TypeError, "prior_mean must be a real tensor")])
def test_assigned_prior_mean_is_checked_and_a_refusal_changes_nothing(bad, exc, match):
    la, model, X, y = fitted("diag")
    before = la.log_marginal_likelihood()
    with pytest.raises(exc, match=match):
        la.prior_mean = bad
    assert float(la.prior_mean) == 0.0
    torch.testing.assert_close(la.log_marginal_likelihood(), before)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_assigned_prior_mean_is_used_like_the_constructors(subset):
    la, model, X, y = fitted("diag", subset_of_weights=subset)
    twin = Laplace(model, subset_of_weights=subset, hessian_structure="diag", prior_mean=0.25).fit(
        [(X, y)], progress=False)
    la.prior_mean = 0.25
    assert la.prior_mean.dtype == DT and float(la.prior_mean) == 0.25
    torch.testing.assert_close(la.log_marginal_likelihood(), twin.log_marginal_likelihood())
    per_weight = torch.full((la.n_params,), 0.25, dtype=DT)
    la.prior_mean = per_weight
    torch.testing.assert_close(la.log_marginal_likelihood(), twin.log_marginal_likelihood())


def test_a_last_layer_prior_mean_assigned_before_fit_is_checked_at_fit():
    X, y = data()
    model = mlp()
    n_last = sum(p.numel() for p in model[-1].parameters())
    la = Laplace(model, subset_of_weights="last_layer", hessian_structure="diag")
    la.prior_mean = torch.full((5,), 0.1, dtype=DT)  # not the last layer's length
    with pytest.raises(ValueError, match=rf"prior_mean must be a float or a tensor \[P\] = \[{n_last}\]"):
        la.fit([(X, y)], progress=False)


# int32 class indices passed the target check and failed inside the loss ("expected target dtype
# to be Long or Byte, but got Int")
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_class_indices_of_any_integer_dtype(dtype):
    X, y = data()
    want = Laplace(mlp(), "classification", hessian_structure="kron").fit([(X, y)], progress=False)
    got = Laplace(mlp(), "classification", hessian_structure="kron").fit([(X, y.to(dtype))], progress=False)
    assert float(got.log_marginal_likelihood()) == float(want.log_marginal_likelihood())
    val = [(X, y.to(dtype))]
    got.optimize_prior_precision(method="gridsearch", val_loader=val, progress=False)
    want.optimize_prior_precision(method="gridsearch", val_loader=[(X, y)], progress=False)
    torch.testing.assert_close(got.prior_precision, want.prior_precision)


# la(x, pred_type='nn', link_approx='probit') silently averaged draws (laplace-torch refuses it)
def test_nn_predictive_refuses_a_glm_link():
    X, y = data()
    la = Laplace(mlp(), "classification", hessian_structure="diag").fit([(X, y)], progress=False)
    for call in (lambda **k: la(X, pred_type="nn", **k), lambda **k: la.predict(X, pred_type="nn", **k)):
        with pytest.raises(ValueError, match=r"pred_type='nn' averages sampled networks \(link_approx='mc'\); "
                                             r"link_approx='probit' applies to pred_type='glm'"):
            call(link_approx="probit", n_samples=3)
        g = torch.Generator().manual_seed(0)
        a = call(n_samples=3, generator=g)  # (no link: the draws)
        b = call(link_approx="mc", n_samples=3, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(la(X), la(X, link_approx="probit"))


# the prior given to log_marginal_likelihood was stored with the caller's graph: later draws required
# grad, and a second log_marginal_likelihood().backward() failed ("backward through the graph a second time")
def test_prior_given_to_the_marginal_likelihood_is_stored_without_its_graph():
    X, y = data()
    la = Laplace(mlp(), "classification", hessian_structure="kron").fit([(X, y)], progress=False)
    log_prior = torch.tensor(0.3, dtype=DT, requires_grad=True)
    la.log_marginal_likelihood(log_prior.exp()).backward()
    assert log_prior.grad is not None and not la.prior_precision.requires_grad
    assert float(la.prior_precision) == math.exp(0.3)
    assert not la.sample(2).requires_grad
    la.log_marginal_likelihood()  # no graph of the first call left to walk
    prior = torch.tensor(0.5, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(prior), prior)
    assert torch.isfinite(g)


# float32 'full' with a tiny prior: H's rounding-level negative eigenvalues made the Cholesky of the
# posterior precision fail, so predictions, draws and the grid search raised "not positive definite
# ... use curvature='ggn'" (it was the GGN) while the marginal likelihood (clamped eigenvalues) worked
def test_full_float32_with_a_tiny_prior_still_predicts():
    """Such a posterior is ill-conditioned in float32 (cond ~1e11): its covariance comes from H's
    clamped eigendecomposition, finite and positive semi-definite; with a prior the float32
    Cholesky takes, it is the float64 one to float32 accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))
    X, Y = torch.randn(8, 3) * 3, torch.randn(8, 2)
    la32 = Laplace(model, "regression", hessian_structure="full", sigma_noise=0.05, prior_precision=1e-4).fit(
        [(X, Y)], progress=False)
    f_var = la32(X[:3])[1]
    assert torch.isfinite(f_var).all() and bool((torch.linalg.eigvalsh(f_var) > -1e-3 * f_var.abs().max()).all())
    draws = la32.sample(50, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(draws).all() and draws.shape == (50, sum(p.numel() for p in model.parameters()))
    assert torch.isfinite(la32.optimize_prior_precision(method="gridsearch", val_loader=[(X, Y)], progress=False))
    for prior in (1.0, 10.0):  # well conditioned: the usual Cholesky path, equal to float64
        kw = dict(hessian_structure="full", sigma_noise=0.05, prior_precision=prior)
        a = Laplace(model, "regression", **kw).fit([(X, Y)], progress=False)
        b = Laplace(copy.deepcopy(model).double(), "regression", **kw).fit([(X.double(), Y.double())], progress=False)
        torch.testing.assert_close(a(X[:3])[1].double(), b(X[:3].double())[1], rtol=1e-3, atol=1e-5)


def test_full_eigendecomposition_path_equals_the_cholesky_one(monkeypatch):
    """Where the Cholesky of P fails (as above), covariance, draws' covariance and the GLM variance
    come from H's eigendecomposition: in float64, where both work, they agree."""
    X, y = data()
    la = Laplace(mlp(), "classification", hessian_structure="full", prior_precision=0.3).fit([(X, y)], progress=False)
    prec, s, delta = la._need_fit()[5], la._scale(), la._delta()
    want = (prec.covariance(s, delta), la.functional_variance(X[:5])[1])
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.ones((), dtype=torch.int32)))
    got = (prec.covariance(s, delta), la.functional_variance(X[:5])[1])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    draws = prec.sample(20000, s, delta, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.T.cov(), want[0], rtol=0.1, atol=0.05 * float(want[0].diagonal().max()))


def test_gridsearch_checks_n_samples_and_binary_names_its_link():
    X, y = data()
    la = Laplace(mlp(), "classification", hessian_structure="diag").fit([(X, y)], progress=False)
    for bad, exc in ((0, ValueError), (-3, ValueError), (2.5, TypeError)):  # NaN NLLs / 'negative dimension' before
        with pytest.raises(exc, match="n_samples must be an int"):
            la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], link_approx="mc", n_samples=bad)
    Xb, yb = data("binary")
    lb = Laplace(mlp(out=1), "binary", hessian_structure="diag").fit([(Xb, yb)], progress=False)
    with pytest.raises(ValueError, match=r"link_approx='bridge_norm' needs C >= 2 classes"):
        lb(Xb, link_approx="bridge_norm")


def test_gridsearch_with_nn_refuses_a_glm_link():
    """The grid search's predictive follows la(): 'nn' with link_approx='bridge' was silently ignored."""
    X, y = data()
    la = Laplace(mlp(), "classification", hessian_structure="diag").fit([(X, y)], progress=False)
    with pytest.raises(ValueError, match=r"link_approx='bridge' applies to pred_type='glm'"):
        la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], pred_type="nn", link_approx="bridge",
                                    n_samples=2)
    la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], pred_type="nn", n_samples=2, grid_size=3)


def test_numpy_prior_precisions_are_taken_like_floats():
    """laplace-torch takes numpy values; so does the constructor, log_marginal_likelihood too."""
    import numpy as np

    m = mlp()
    X, Y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    for v, want in [(np.float32(0.5), [0.5]), (np.int64(2), [2.0]), (np.array(0.5), [0.5]),
                    (np.array([1.0, 2.0]), [1.0, 2.0])]:
        la = Laplace(m, "classification", "all", "diag", prior_precision=v)
        assert la.prior_precision.dtype == DT and la.prior_precision.reshape(-1).tolist() == want
    la.fit([(X, Y)], progress=False)
    assert la.log_marginal_likelihood(np.float32(2.0)).item() == pytest.approx(
        la.log_marginal_likelihood(2.0).item(), rel=1e-12)
    for bad in (np.array(["a"]), np.bool_(True), "1"):
        with pytest.raises(TypeError, match="prior_precision must be a positive float or a tensor"):
            Laplace(m, prior_precision=bad)


def test_refit_after_a_module_was_replaced_says_so():
    m = mlp()
    X, Y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    for subset in ("all", "last_layer"):
        la = Laplace(copy.deepcopy(m), "classification", subset, "kron")
        la.fit([(X, Y)], progress=False)
        la.model[2] = nn.Linear(5, 3).to(DT)  # same names and shapes, another module
        with pytest.raises(RuntimeError, match=r"module\(s\) \['2'\] of the model were replaced"):
            la.fit([(X, Y)], progress=False)


def test_modules_the_curvature_cannot_take_are_named_with_what_to_do():
    """A classification model with [N, T, C] outputs, and an nn.GRU (a tuple for its output)."""
    seq = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).to(DT)
    with pytest.raises(ValueError, match=r"outputs \(5, 2, 3\) \(C logits per row, one row per example"):
        Laplace(seq, "classification", "all", "diag").fit([(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))],
                                                         progress=False)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Recurrent().to(DT)
    X, Y = torch.randn(6, 5, 3, dtype=DT), torch.randint(0, 2, (6,))
    with pytest.raises(RuntimeError, match=r"layer 'rnn' \(GRU\) returns tuple.*subset_of_weights='last_layer'"):
        Laplace(model, "classification", "all", "full").fit([(X, Y)], progress=False)
    la = Laplace(model, "classification", "last_layer", "full")  # what the message suggests works
    la.fit([(X, Y)], progress=False)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_heteroscedastic_nn_gridsearch_skips_priors_whose_draws_are_not_gaussian():
    """At prior 1e-4 a sampled network's eta2 = -exp(raw) underflows to -0: that grid point is
    scored as a non-finite NLL (never chosen), not an error for the whole search."""
    from pyfastbayes.nn import NaturalHead

    torch.manual_seed(0)
    X = torch.randn(64, 3)
    y = X[:, :1] * 2 + 0.3 * torch.randn(64, 1)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2), NaturalHead())
    la = Laplace(m, "heteroscedastic_regression", "all", "kron")
    la.fit([(X, y)], progress=False)
    torch.manual_seed(0)  # the draws of the 'nn' predictive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = la.optimize_prior_precision("gridsearch", val_loader=[(X, y)], pred_type="nn", n_samples=10)
    assert torch.isfinite(best).all() and best.min().item() > 1e-4
