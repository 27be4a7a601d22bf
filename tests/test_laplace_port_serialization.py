"""Ported from laplace-torch's own suite (tests/test_serialization.py, test_laplace.py, test_subset_params.py at 44ea62a).

The same checks re-expressed against ``pyfastbayes.laplace.Laplace``: its four structures stand for
laplace-torch's Full/Kron/Diag/LowRank classes, ``subset_of_weights='last_layer'`` for the LL
classes, and a parameter subset is chosen the way ours does it (``requires_grad=False`` parameters
are left out) and, as laplace-torch's SubnetLaplace, by indices (``subset_of_weights='subnetwork'``). Where upstream compares numbers, the
port compares the same numbers exactly (state_dict round trips) or against laplace-torch 0.3.

Left out (upstream tests with no meaning for our public API):
- test_serialize_functional, test_serialize_no_pickle_functional: FunctionalLaplace (GP
  formulation, ``n_subset``) has no counterpart in ours.
- test_map_location, its whole-object part across devices: ours has no ``Laplace.to(device)``;
  a Laplace is bound to its model's device, so only the CPU pickle round trip and (on CUDA)
  the state_dict route between devices are ported.
- test_compatible_backend, test_incompatible_backend: ours has no backend classes (BackPACK,
  ASDL, curvlinops); the compatible curvatures ('ggn', 'ef', 'mc_fisher') are built on the
  subset model instead, and the Hessian backends have no counterpart.
- test_all_init's ``isinstance`` checks: ours is one class; the structure it chose is checked
  through its attributes, the form of ``posterior_precision`` and laplace-torch's numbers.
"""
import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import require
from pyfastbayes.laplace import Laplace

DT = torch.float64
STRUCTURES = ["full", "kron", "diag", "lowrank"]
ONLINE = ["full", "kron", "diag"]          # the structures fit(override=False) adds to
SUBSETS = ["all", "last_layer"]
KEYS = [(w, s) for w in SUBSETS for s in ("full", "kron", "diag")]   # laplace-torch's six flavours


# ---- fixtures -------------------------------------------------------------------------------------------------
def _mlp(hidden: int = 20, names=("0", "1"), seed: int = 240) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([(names[0], nn.Linear(3, hidden)), (names[1], nn.Linear(hidden, 2))])).to(DT)


def _subset_mlp() -> nn.Module:
    """test_subset_params' model: only the first layer's weight (60 numbers) is trainable."""
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].weight.requires_grad_(True)
    return model


def _loader(likelihood: str, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randint(2, (10,), generator=g) if likelihood == "classification" else \
        torch.randn(10, 2, generator=g, dtype=DT)
    return DataLoader(TensorDataset(X, y), batch_size=3)


def _inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(7), dtype=DT)


def _fitted(model, likelihood="regression", subset="all", structure="kron", **kw) -> Laplace:
    """As upstream: fit, tune the prior by marglik, then set sigma_noise by hand (regression)."""
    la = Laplace(model, likelihood, subset, structure, **kw).fit(_loader(likelihood), progress=False)
    la.optimize_prior_precision("marglik", n_steps=30)
    if likelihood == "regression":
        la.sigma_noise = 1231.0
    return la


def _through_file(obj, weights_only: bool = True):
    """torch.save then torch.load, as upstream's state_dict.bin (in memory)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def _copy_of(model: nn.Module) -> nn.Module:
    """A new instance holding the model's saved weights (how a state is loaded in practice)."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())
    return twin


def _gen():
    return torch.Generator().manual_seed(3)


@pytest.fixture
def double_default():
    """laplace-torch builds some of its tensors in the default dtype (its suite sets float64
    globally): the comparisons with it run under float64 too, restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(before)


def _assert_same_posterior(la: Laplace, la2: Laplace, likelihood: str) -> None:
    """Everything upstream compares, and more, equal bit for bit."""
    assert torch.equal(la.sigma_noise, la2.sigma_noise)
    assert torch.equal(la.prior_precision, la2.prior_precision)
    assert torch.equal(la.prior_mean, la2.prior_mean)
    assert la.n_data == la2.n_data and la.n_params == la2.n_params
    assert float(la.log_marginal_likelihood()) == float(la2.log_marginal_likelihood())
    X = _inputs()
    if likelihood == "regression":
        f_mean, f_var = la(X)
        f_mean2, f_var2 = la2(X)
        assert torch.equal(f_mean, f_mean2) and torch.equal(f_var, f_var2)
    else:
        assert torch.equal(la(X, link_approx="probit"), la2(X, link_approx="probit"))
    assert torch.equal(la.to_dense(), la2.to_dense())
    assert torch.equal(la.posterior_variance, la2.posterior_variance)
    assert torch.equal(la.sample(4, generator=_gen()), la2.sample(4, generator=_gen()))
    assert torch.equal(la.predictive_samples(X, n_samples=3, generator=_gen()),
                       la2.predictive_samples(X, n_samples=3, generator=_gen()))


def _assert_unfitted(la: Laplace) -> None:
    """A failed load leaves the target as it was (here: never fitted)."""
    with pytest.raises(RuntimeError, match="not fitted"):
        la.log_marginal_likelihood()


# ---- test_serialization.py ------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize(structure, subset, likelihood):
    """test_serialize: a state_dict saved to a file and loaded into a fresh Laplace (here on a new
    instance of the model holding the same weights, built with another prior) gives the same
    sigma, predictive, and (beyond upstream) evidence, posterior and draws."""
    model = _mlp()
    la = _fitted(model, likelihood, subset, structure)
    la2 = Laplace(_copy_of(model), likelihood, subset, structure, prior_precision=5.0)
    la2.load_state_dict(_through_file(la.state_dict()))
    _assert_same_posterior(la, la2, likelihood)
    # a loaded Laplace goes on as the original would
    la.optimize_prior_precision("marglik", n_steps=10)
    la2.optimize_prior_precision("marglik", n_steps=10)
    assert torch.equal(la.prior_precision, la2.prior_precision)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_loaded_laplace_owns_its_tensors(structure):
    """(upstream loads from a file, so its dict is never seen again) a loaded Laplace must not
    depend on the dict it was loaded from: state_dict() clones its tensors, and loading copies
    them back, as nn.Module.load_state_dict does."""
    model = _mlp()
    la = _fitted(model, "regression", "all", structure)
    state = la.state_dict()
    la2 = Laplace(model, "regression", "all", structure)
    la2.load_state_dict(state)
    for key in ("prior_precision", "prior_mean", "loss"):
        state[key].add_(1.0)            # the dict reused or edited after the load
    _assert_same_posterior(la, la2, "regression")


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", ONLINE)
def test_serialize_override(structure, subset):
    """test_serialize_override: continual learning from a loaded state, fit(override=False) on the
    same data again gives twice the curvature (and twice the rows)."""
    model = _mlp()
    la = _fitted(model, "regression", subset, structure)
    la2 = Laplace(model, "regression", subset, structure)
    la2.load_state_dict(_through_file(la.state_dict()))
    la2.fit(_loader("regression"), progress=False, override=False)
    assert la2.n_data == 2 * la.n_data
    assert torch.equal(la2.sigma_noise, la.sigma_noise)
    # the likelihood part of P at sigma = 1 (at sigma = 1231 it drowns in the prior)
    la.sigma_noise = la2.sigma_noise = 1.0
    prior = torch.diag(la.prior_precision.expand(la.n_params))
    torch.testing.assert_close(la2.to_dense() - prior, 2 * (la.to_dense() - prior), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("subset", SUBSETS)
def test_serialize_override_lowrank_is_refused(subset):
    """(upstream's LowRankLaplace is xfail there) ours refuses to add low-rank eigenpairs, clearly
    (fit docstring: not for 'lowrank'), and the loaded state stays as it was."""
    model = _mlp()
    la = _fitted(model, "regression", subset, "lowrank")
    la2 = Laplace(model, "regression", subset, "lowrank")
    la2.load_state_dict(_through_file(la.state_dict()))
    with pytest.raises(ValueError, match="lowrank"):
        la2.fit(_loader("regression"), progress=False, override=False)
    _assert_same_posterior(la, la2, "regression")


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (int, float, str, bool, torch.Tensor))


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_no_pickle(structure, subset):
    """test_serialize_no_pickle: the state holds only plain values and tensors (at any depth:
    ours nests a config dict and lists), so torch.load(weights_only=True) reads it."""
    la = _fitted(_mlp(), "regression", subset, structure)
    state = _through_file(la.state_dict(), weights_only=True)
    assert _plain(state)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_subset(structure):
    """test_serialize_subnetlaplace, with ours' subsets: a Laplace over the trainable parameters
    only (first weight and last bias), round-tripped into a fresh one."""
    model = _subset_mlp()
    model[1].bias.requires_grad_(True)
    la = _fitted(model, "regression", "all", structure)
    assert la.n_params == 60 + 2
    la2 = Laplace(_copy_of(model), "regression", "all", structure)
    la2.load_state_dict(_through_file(la.state_dict()))
    _assert_same_posterior(la, la2, "regression")


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_serialize_subnetlaplace(structure):
    """Upstream's indices [1, 10, 104, 44] (unsorted: ours sorts them), the round trip exact; a
    Laplace over other indices refuses the state."""
    idx = torch.tensor([1, 10, 104, 44])
    model = _mlp()
    la = _fitted(model, "regression", "subnetwork", structure, subnetwork_indices=idx)
    la2 = Laplace(_copy_of(model), "regression", "subnetwork", structure, subnetwork_indices=idx)
    la2.load_state_dict(_through_file(la.state_dict()))
    _assert_same_posterior(la, la2, "regression")
    assert la2.positions.tolist() == [1, 10, 44, 104]
    la3 = Laplace(_copy_of(model), "regression", "subnetwork", structure, subnetwork_indices=torch.tensor([1, 10, 44]))
    with pytest.raises(ValueError, match="other subnetwork_indices"):
        la3.load_state_dict(_through_file(la.state_dict()))
    _assert_unfitted(la3)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_fail_different_subsets(structure):
    """(the subnetwork analogue of test_serialize_fail_different_models) the same architecture and
    weights but another requires_grad subset: refused."""
    model = _subset_mlp()
    la = _fitted(model, "regression", "all", structure)
    other = _copy_of(model)
    other[1].bias.requires_grad_(True)
    la2 = Laplace(other, "regression", "all", structure)
    with pytest.raises(ValueError, match="other trainable parameters"):
        la2.load_state_dict(_through_file(la.state_dict()))
    _assert_unfitted(la2)


@pytest.mark.parametrize("structure", ONLINE)
def test_serialize_fail_different_frozen_weights(structure):
    """A subset Laplace's curvature and Jacobians depend on the frozen parameters too: a state
    fitted while they held other values must be refused, as one fitted at other trainable weights
    is ('saved at other weights')."""
    model = _subset_mlp()
    la = _fitted(model, "classification", "all", structure)
    other = _copy_of(model)
    with torch.no_grad():
        other[1].weight.add_(1.0)            # frozen; the covered weight is the same
    la2 = Laplace(other, "classification", "all", structure)
    with pytest.raises(ValueError):
        la2.load_state_dict(_through_file(la.state_dict()))


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_fail_different_models(structure, subset):
    """test_serialize_fail_different_models (upstream all-weights only; here last-layer too)."""
    la = _fitted(_mlp(), "regression", subset, structure)
    la2 = Laplace(_mlp(hidden=25), "regression", subset, structure)
    with pytest.raises(ValueError, match="other trainable parameters"):
        la2.load_state_dict(_through_file(la.state_dict()))
    _assert_unfitted(la2)


def test_serialize_fail_different_model_weights():
    """(the model must hold the MAP the state was fitted at) same architecture, other weights."""
    la = _fitted(_mlp(), "regression", "all", "kron")
    la2 = Laplace(_mlp(seed=241), "regression", "all", "kron")
    with pytest.raises(ValueError, match="saved at other weights"):
        la2.load_state_dict(_through_file(la.state_dict()))
    _assert_unfitted(la2)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("saved, target", [("kron", "diag"), ("diag", "full"), ("full", "kron"), ("kron", "lowrank"),
                                           ("lowrank", "full")])
def test_serialize_fail_different_hess_structures(saved, target, subset):
    """test_serialize_fail_different_hess_structures (upstream kron -> diag; here a cycle through
    all four structures)."""
    model = _mlp()
    state = _through_file(_fitted(model, "regression", subset, saved).state_dict())
    la2 = Laplace(model, "regression", subset, target)
    with pytest.raises(ValueError, match="state_dict was saved by a Laplace with"):
        la2.load_state_dict(state)
    _assert_unfitted(la2)


def test_serialize_fail_different_kron_blocks():
    """The same (ours-only) check for KFAC's block layout: 'joint' saved, 'separate' loading."""
    model = _mlp()
    state = _through_file(_fitted(model, "regression", "all", "kron").state_dict())
    la2 = Laplace(model, "regression", "all", "kron", bias_block="separate")
    with pytest.raises(ValueError, match="state_dict was saved by a Laplace with"):
        la2.load_state_dict(state)
    _assert_unfitted(la2)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("saved, target", [("last_layer", "all"), ("all", "last_layer")])
def test_serialize_fail_different_subset_of_weights(saved, target, structure):
    """test_serialize_fail_different_subset_of_weights (upstream last_layer -> all, diag)."""
    model = _mlp()
    state = _through_file(_fitted(model, "regression", saved, structure).state_dict())
    la2 = Laplace(model, "regression", target, structure)
    with pytest.raises(ValueError, match="state_dict was saved by a Laplace with"):
        la2.load_state_dict(state)
    _assert_unfitted(la2)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_fail_different_liks(structure, subset):
    """test_serialize_fail_different_liks: a regression state into a classification Laplace."""
    model = _mlp()
    state = _through_file(_fitted(model, "regression", subset, structure).state_dict())
    la2 = Laplace(model, "classification", subset, structure)
    with pytest.raises(ValueError, match="state_dict was saved by a Laplace with"):
        la2.load_state_dict(state)
    _assert_unfitted(la2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_serialize_fail_llla_different_last_layer_name(structure):
    """test_serialize_fail_llla_different_last_layer_name: last layer '1' saved, a model whose
    layers are named 'fc1' / 'clf' (same weights; upstream also changes the likelihood, here it is
    kept so that only the names differ)."""
    model = _mlp()
    la = _fitted(model, "regression", "last_layer", structure)
    assert la.last_layer_name == "1"
    renamed = _mlp(names=("fc1", "clf"))
    renamed.load_state_dict({{"0": "fc1", "1": "clf"}[k[0]] + k[1:]: v for k, v in model.state_dict().items()})
    la2 = Laplace(renamed, "regression", "last_layer", structure)
    with pytest.raises(ValueError, match="other trainable parameters"):
        la2.load_state_dict(_through_file(la.state_dict()))
    _assert_unfitted(la2)
    with pytest.raises(RuntimeError, match="call fit"):  # nor was its last layer chosen
        la2.block_names


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_map_location(structure, subset):
    """test_map_location on the CPU: the whole Laplace pickled with torch.save and loaded with
    map_location='cpu' keeps its device and predicts the same."""
    la = _fitted(_mlp(), "regression", subset, structure)
    buf = io.BytesIO()
    torch.save(la, buf)
    buf.seek(0)
    la2 = torch.load(buf, map_location="cpu", weights_only=False)
    for name in ("prior_mean", "prior_precision", "sigma_noise", "mean"):
        assert getattr(la2, name).device.type == "cpu", name
    _assert_same_posterior(la, la2, "regression")


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("saved_on, loaded_on", [("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", ONLINE)
def test_map_location_state_dict(structure, subset, saved_on, loaded_on):
    """test_map_location between devices, through ours' serialization route: a state saved on one
    device, torch.load(map_location=the other), loaded into a Laplace of the model moved there."""
    model = _mlp().to(saved_on)
    la = _fitted(model, "regression", subset, structure)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, map_location=loaded_on, weights_only=True)
    la2 = Laplace(_copy_of(model).to(loaded_on), "regression", subset, structure)
    la2.load_state_dict(state)
    for name in ("prior_mean", "prior_precision", "sigma_noise", "mean"):
        assert getattr(la2, name).device.type == loaded_on, name
    assert torch.equal(la.sigma_noise.cpu(), la2.sigma_noise.cpu())
    X = _inputs()
    f_mean, f_var = la(X.to(saved_on))
    f_mean2, f_var2 = la2(X.to(loaded_on))
    torch.testing.assert_close(f_mean.cpu(), f_mean2.cpu(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_var.cpu(), f_var2.cpu(), rtol=1e-10, atol=1e-12)


# ---- test_laplace.py (the Laplace() front end) ------------------------------------------------------------------
def test_default_init():
    """test_default_init: laplace-torch's default is last-layer KFAC; ours (README "Coming from
    laplace-torch") is subset_of_weights='all', 'kron', bias_block='joint'."""
    model = _mlp()
    la = Laplace(model, "classification")
    assert (la.subset_of_weights, la.hessian_structure, la.bias_block) == ("all", "kron", "joint")
    la.fit(_loader("classification"), progress=False)
    assert la.n_params == sum(p.numel() for p in model.parameters())
    assert [b[0] for b in la.posterior_precision] == ["0.weight+bias", "1.weight+bias"]   # one block per layer


@pytest.mark.parametrize("subset, structure", KEYS)
def test_all_init(subset, structure, double_default):
    """test_all_init: the front end builds the structure asked for; beyond upstream's isinstance,
    the form of the posterior precision and laplace-torch's own numbers for that flavour (with its
    block convention, bias_block='separate')."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    model = _mlp()
    loader = _loader("classification")
    la = Laplace(model, "classification", subset, structure, bias_block="separate")
    assert (la.subset_of_weights, la.hessian_structure) == (subset, structure)
    la.fit(loader, progress=False)
    P = {"all": 122, "last_layer": 42}[subset]
    assert la.n_params == P
    pp = la.posterior_precision
    if structure == "full":
        assert pp.shape == (P, P)
    elif structure == "diag":
        assert pp.shape == (P,)
    else:
        assert [b[0] for b in pp] == (["0.weight", "0.bias"] if subset == "all" else []) + ["1.weight", "1.bias"]
    theirs = laplace.Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    theirs.fit(loader)
    a, b = float(theirs.log_marginal_likelihood()), float(la.log_marginal_likelihood())
    assert abs(a - b) <= 1e-10 * abs(a)
    X = _inputs()
    torch.testing.assert_close(la(X, link_approx="probit"), theirs(X, link_approx="probit"), rtol=0, atol=1e-10)


@pytest.mark.parametrize("subset, structure", KEYS)
def test_opt_keywords(subset, structure):
    """test_opt_keywords: prior_precision, prior_mean and temperature are passed on (and kept by
    fit). Ours' prior_mean is over the covered parameters: [42] for the last layer."""
    model = _mlp()
    P = {"all": 122, "last_layer": 42}[subset]
    prior_mean = torch.zeros(P, dtype=DT)
    la = Laplace(model, "classification", subset, structure, prior_precision=0.01, prior_mean=prior_mean,
                 temperature=10.0)
    for stage in ("built", "fitted"):
        assert torch.allclose(la.prior_mean, prior_mean), stage
        assert la.prior_precision == 0.01, stage
        assert la.temperature == 10.0, stage
        la.fit(_loader("classification"), progress=False)


@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_opt_keywords_last_layer_refuses_a_full_size_prior_mean(structure):
    """Upstream passes a prior_mean over ALL parameters to the LL flavours without fitting; at fit
    both libraries refuse it (laplace-torch: 'Invalid length of prior mean'), ours naming the size."""
    model = _mlp()
    la = Laplace(model, "classification", "last_layer", structure, prior_mean=torch.zeros(122, dtype=DT))
    with pytest.raises(ValueError, match=r"prior_mean must be .*\[42\]"):
        la.fit(_loader("classification"), progress=False)


# ---- test_subset_params.py --------------------------------------------------------------------------------------
SUBSET_STRUCTURES = ["kron", "diag", "full", "lowrank"]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("curvature", ["ggn", "ef", "mc_fisher"])
@pytest.mark.parametrize("structure", SUBSET_STRUCTURES)
def test_mean(structure, curvature, likelihood):
    """test_mean_clf / test_mean_reg (and test_compatible_backend: every curvature builds and fits
    on the subset model): the mean covers the 60 trainable weights, the frozen ones are left out."""
    model = _subset_mlp()
    la = Laplace(model, likelihood, "all", structure, curvature=curvature).fit(_loader(likelihood), progress=False)
    assert la.mean.shape == (60,)
    assert la.n_params == 60
    assert torch.equal(la.mean, model[0].weight.detach().reshape(-1))
    assert la.sample(2, generator=_gen()).shape == (2, 60)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_post_precision_diag(curvature):
    """test_post_precision_diag."""
    la = Laplace(_subset_mlp(), "classification", "all", "diag", curvature=curvature)
    la.fit(_loader("classification"), progress=False)
    assert la.posterior_precision.shape == (60,)


@pytest.mark.parametrize("bias_block", ["joint", "separate"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_post_precision_kron(curvature, bias_block):
    """test_post_precision_kron (to_matrix() is ours' to_dense()): one Kronecker block, the weight."""
    la = Laplace(_subset_mlp(), "classification", "all", "kron", curvature=curvature, bias_block=bias_block)
    la.fit(_loader("classification"), progress=False)
    assert la.to_dense().shape == (60, 60)
    (block,) = la.posterior_precision
    assert block[1].shape + block[2].shape == (20, 20, 3, 3)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("structure", SUBSET_STRUCTURES)
def test_predictive(structure, curvature):
    """test_predictive: the sampled ('nn', 'mc') predictive on the subset model."""
    la = Laplace(_subset_mlp(), "classification", "all", structure, curvature=curvature)
    la.fit(_loader("classification"), progress=False)
    p = la(_inputs(), pred_type="nn", link_approx="mc", n_samples=20, generator=_gen())
    assert p.shape == (5, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(5, dtype=DT))


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("structure", SUBSET_STRUCTURES)
def test_marglik_glm(structure, curvature):
    """test_marglik_glm: evidence-tuned prior on the subset model."""
    la = Laplace(_subset_mlp(), "classification", "all", structure, curvature=curvature)
    la.fit(_loader("classification"), progress=False)
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert torch.isfinite(la.prior_precision).all() and (la.prior_precision > 0).all()
    assert float(la.log_marginal_likelihood()) >= before


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("structure", SUBSET_STRUCTURES)
def test_marglik_nn(structure, curvature):
    """test_marglik_nn: the validation grid search with the sampled predictive."""
    la = Laplace(_subset_mlp(), "classification", "all", structure, curvature=curvature)
    loader = _loader("classification")
    la.fit(loader, progress=False)
    la.optimize_prior_precision(method="gridsearch", val_loader=loader, pred_type="nn", link_approx="mc",
                                n_samples=10, grid_size=5)
    grid = torch.logspace(-4, 4, 5, dtype=DT)
    assert torch.isclose(grid, la.prior_precision.to(DT)).any()


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_subset_matches_laplace_torch(structure, curvature, likelihood, double_default):
    """(beyond upstream's shapes) the subset Laplace's numbers against laplace-torch's on the same
    subset (curvlinops backend): evidence and GLM predictive. The regression empirical Fisher
    differs by the documented factor (README: laplace-torch's CurvlinopsEF is 2 sigma^2 ours)."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    model = _subset_mlp()
    loader = _loader(likelihood)
    ours = Laplace(model, likelihood, "all", structure, curvature=curvature, bias_block="separate",
                   prior_precision=0.5).fit(loader, progress=False)
    flavour = {"full": laplace.FullLaplace, "kron": laplace.KronLaplace, "diag": laplace.DiagLaplace}[structure]
    theirs = flavour(model, likelihood, prior_precision=0.5,
                     backend=CurvlinopsGGN if curvature == "ggn" else CurvlinopsEF)
    theirs.fit(loader)
    if curvature == "ef" and likelihood == "regression":
        # documented convention: their EF curvature = 2 sigma^2 x ours (sigma = 1 here)
        if structure == "full":
            prior = 0.5 * torch.eye(60, dtype=DT)
            torch.testing.assert_close(theirs.posterior_precision - prior, 2 * (ours.to_dense() - prior),
                                       rtol=1e-10, atol=1e-12)
        elif structure == "diag":
            torch.testing.assert_close(theirs.posterior_precision - 0.5, 2 * (ours.posterior_precision - 0.5),
                                       rtol=1e-10, atol=1e-12)
        return
    a, b = float(theirs.log_marginal_likelihood()), float(ours.log_marginal_likelihood())
    assert abs(a - b) <= 1e-10 * abs(a)
    X = _inputs()
    if likelihood == "classification":
        torch.testing.assert_close(ours(X, link_approx="probit"), theirs(X, link_approx="probit"), rtol=0, atol=1e-10)
    else:
        for mine, their in zip(ours(X), theirs(X)):
            torch.testing.assert_close(mine, their, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subset_is_the_sub_block_of_the_whole(structure):
    """(consistency of the subset rule) freezing parameters gives exactly the corresponding rows and
    columns of the all-parameter posterior precision (the GGN restricted to the covered ones)."""
    whole = Laplace(_mlp(), "classification", "all", structure, prior_precision=0.5)
    whole.fit(_loader("classification"), progress=False)
    part = Laplace(_subset_mlp(), "classification", "all", structure, prior_precision=0.5)
    part.fit(_loader("classification"), progress=False)
    idx = torch.arange(60)                       # '0.weight' is first in the flat layout
    torch.testing.assert_close(part.to_dense(), whole.to_dense()[idx][:, idx], rtol=1e-12, atol=1e-14)
