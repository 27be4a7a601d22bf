"""feature_reduction (laplace-torch's last-layer option): a last layer over features [N, T, D] whose
model reduces its outputs over the T positions. References: laplace-torch 0.3's last-layer Laplace
with the same option on the same model and data (log marginal likelihood, probit predictive, the
Kronecker factors' effect), and the Kronecker factors written out from the picked / averaged
features (A) and the output gradients (G) of the reduced model."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import require
from pyfastbayes.laplace import Laplace

DT = torch.float64


class Tokens(nn.Module):
    """x [N, T, 3] -> features [N, T, 6] -> head [N, T, 4] -> reduced to [N, 4]."""

    def __init__(self, reduction):
        super().__init__()
        self.body = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)
        self.reduction = reduction

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x)))
        if self.reduction == "pick_first":
            return out[:, 0]
        if self.reduction == "pick_last":
            return out[:, -1]
        return out.mean(1)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 5, 3, generator=g, dtype=DT)
    return X, torch.randint(0, 4, (30,), generator=g)


def _model(reduction):
    torch.manual_seed(0)
    return Tokens(reduction).to(DT)


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
def test_kron_factors_are_those_of_the_reduced_features(reduction):
    """A = mean of [phi, 1][phi, 1]^T over the examples, phi the picked (or averaged) feature;
    G = sum_n J_n^T H_n J_n of the head's reduced output (the model's output itself)."""
    model = _model(reduction)
    X, y = _data()
    la = Laplace(model, "classification", "last_layer", "kron", feature_reduction=reduction).fit([(X, y)],
                                                                                               progress=False)
    with torch.no_grad():
        h = torch.tanh(model.body(X))
        phi = h[:, 0] if reduction == "pick_first" else h[:, -1] if reduction == "pick_last" else h.mean(1)
        p = model(X).softmax(-1)
    a = torch.cat([phi, torch.ones(30, 1, dtype=DT)], 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # d logits / d head output = I (reduced)
    (_, G, A, _, _), = la.posterior_precision
    torch.testing.assert_close(A, a.T @ a / 30, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(G, H.sum(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
def test_against_laplace_torch(reduction, structure):
    """'diag' / 'full' and the probit predictive: laplace-torch's numbers with the same option (both
    exact for the reduced model). 'kron': laplace-torch's KFAC runs curvlinops on the whole model,
    whose hooks see the head's inputs at all T positions, so its factors ignore the option (its
    evidence is ours WITHOUT the option, 'expand'); ours with the option is the KFAC of the reduced
    features, nearer to the exact last-layer GGN (Frobenius distance) than laplace-torch's."""
    laplace = require("laplace", "laplace-torch is the reference Laplace library")
    model = _model(reduction)
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=15)  # (laplace-torch reads loader.dataset)
    theirs = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure,
                             prior_precision=0.7, feature_reduction=reduction)
    theirs.fit(loader)
    kw = dict(prior_precision=0.7, bias_block="separate")
    ours = Laplace(model, "classification", "last_layer", structure, feature_reduction=reduction, **kw).fit(
        loader, progress=False)
    Xt = _data(1)[0][:6]
    if structure != "kron":
        torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().to(DT),
                                   rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ours(Xt), theirs(Xt, link_approx="probit").to(DT), rtol=1e-7, atol=1e-9)
        return
    plain = Laplace(model, "classification", "last_layer", "kron", **kw).fit(loader, progress=False)
    torch.testing.assert_close(plain.log_marginal_likelihood(), theirs.log_marginal_likelihood().to(DT),
                               rtol=1e-8, atol=1e-8)
    exact = Laplace(model, "classification", "last_layer", "full", **kw).fit(loader, progress=False).to_dense()
    assert float((ours.to_dense() - exact).norm()) < float((plain.to_dense() - exact).norm())


def test_the_plain_kron_differs_and_a_wrong_reduction_is_refused():
    """Without the option the head's KFAC averages A over all T positions (Eschenhagen et al.'s
    'expand') though the model reads one: another, worse-matched evidence. A pick that the model
    does not do is refused at fit; the option needs subset_of_weights='last_layer'."""
    model = _model("pick_last")
    X, y = _data()
    plain = Laplace(model, "classification", "last_layer", "kron").fit([(X, y)], progress=False)
    picked = Laplace(model, "classification", "last_layer", "kron", feature_reduction="pick_last").fit(
        [(X, y)], progress=False)
    assert abs(float(plain.log_marginal_likelihood() - picked.log_marginal_likelihood())) > 1e-3
    with pytest.raises(ValueError, match=r"feature_reduction='pick_first' says the model reads only the first of the "
                                         r"5 positions of layer 'head'"):
        Laplace(model, "classification", "last_layer", "kron", feature_reduction="pick_first").fit([(X, y)],
                                                                                                 progress=False)
    with pytest.raises(ValueError, match="feature_reduction is for subset_of_weights='last_layer'"):
        Laplace(model, "classification", "all", "kron", feature_reduction="pick_last")
    with pytest.raises(ValueError, match="feature_reduction must be one of"):
        Laplace(model, "classification", "last_layer", "kron", feature_reduction="max")
    # named at construction, saved and loaded with the option (and refused without it)
    named = Laplace(model, "classification", "last_layer", "kron", last_layer_name="head",
                    feature_reduction="pick_last").fit([(X, y)], progress=False)
    torch.testing.assert_close(named.log_marginal_likelihood(), picked.log_marginal_likelihood(), rtol=1e-12, atol=0)
    again = Laplace(model, "classification", "last_layer", "kron", feature_reduction="pick_last")
    again.load_state_dict(picked.state_dict())
    torch.testing.assert_close(again.log_marginal_likelihood(), picked.log_marginal_likelihood(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        Laplace(model, "classification", "last_layer", "kron").load_state_dict(picked.state_dict())


@pytest.mark.parametrize("reduction", ["pick_last", "average"])
def test_a_loaded_laplace_fitted_again_keeps_the_reduction(reduction):
    """load_state_dict sets the last layer up with the option too: a fit after the load (override or
    not) gives the option's factors, not plain 'expand'."""
    model = _model(reduction)
    X, y = _data()
    fresh = Laplace(model, "classification", "last_layer", "kron", feature_reduction=reduction).fit([(X, y)],
                                                                                                   progress=False)
    loaded = Laplace(model, "classification", "last_layer", "kron", feature_reduction=reduction)
    loaded.load_state_dict(fresh.state_dict())
    loaded.fit([(X, y)], progress=False)
    torch.testing.assert_close(loaded.log_marginal_likelihood(), fresh.log_marginal_likelihood(), rtol=1e-12, atol=0)
    again = Laplace(model, "classification", "last_layer", "kron", feature_reduction=reduction)
    again.load_state_dict(fresh.state_dict())
    again.fit([(X[:15], y[:15])], override=False, progress=False)
    both = Laplace(model, "classification", "last_layer", "kron", feature_reduction=reduction).fit(
        [(X, y), (X[:15], y[:15])], progress=False)
    torch.testing.assert_close(again.log_marginal_likelihood(), both.log_marginal_likelihood(), rtol=1e-10, atol=0)
