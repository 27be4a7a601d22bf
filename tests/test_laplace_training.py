"""marglik_training against laplace-torch's marglik_training on the same model, data and schedule
(full batch, fp64, same Adam settings, KFAC by curvlinops there): the learnt layerwise prior
precisions, the trained weights and the marginal likelihoods agree; and the evidence rises."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import require
from pyfastbayes.laplace import marglik_training

laplace = require("laplace", "laplace-torch is the reference Laplace library")


def _setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, dtype=torch.float64, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, DataLoader(TensorDataset(X, y), batch_size=60)


def test_matches_laplace_torch_marglik_training():
    from laplace.curvature import CurvlinopsGGN
    from laplace.marglik_training import marglik_training as theirs

    model, loader = _setup()
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    la1, _, margliks1, _ = theirs(m1, loader, "classification", hessian_structure="kron", backend=CurvlinopsGGN,
                                  optimizer_kwargs={"lr": 1e-2}, n_epochs=8, n_hypersteps=10, lr_hyp=0.1,
                                  prior_structure="layerwise")
    la2, margliks2 = marglik_training(m2, loader, "classification", hessian_structure="kron", n_epochs=8, lr=1e-2,
                                      n_hypersteps=10, lr_hyp=0.1, prior_structure="layerwise",
                                      bias_block="separate", progress=False)
    # the weights of every epoch depend on the prior of the update before: equal weights at the end
    # mean equal prior trajectories (both keep the last update here: the evidence rose throughout)
    assert margliks2 == sorted(margliks2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-7, atol=1e-9)
    # laplace-torch returns the prior from BEFORE the last hyper step (its loop variable), ours after
    # it: one Adam step of lr_hyp apart in log space at most
    step = (la2.prior_precision.log() - la1.prior_precision.to(torch.float64).log()).abs()
    assert bool((step <= 0.1 * 1.001).all()), step
    # theirs records -lml before each hyper step; ours the lml after the update's steps
    assert margliks2[-1] >= -margliks1[-1] - 1e-6


def test_evidence_rises_and_result_is_fitted():
    model, loader = _setup()
    la, margliks = marglik_training(model, loader, n_epochs=20, lr=1e-2, prior_structure="scalar", progress=False)
    assert len(margliks) == 20 and margliks[-1] > margliks[0]
    assert float(la.log_marginal_likelihood()) == pytest.approx(max(margliks), rel=1e-9)  # the best update is kept
    assert la.prior_precision.numel() == 1 and float(la.prior_precision) > 0
    with pytest.raises(ValueError, match="prior_structure"):
        marglik_training(model, loader, n_epochs=1, prior_structure="diag", progress=False)


# 'lowrank' with the default layerwise prior trained a whole epoch in place, then raised; a prior
# tensor of several values failed in math.log; a one-shot iterator trained on nothing
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(hessian_structure="lowrank"), ValueError, r"hessian_structure='lowrank' learns one scalar prior: use "
                                                    r"prior_structure='scalar'"),
    (dict(prior_precision=torch.tensor([1.0, 2.0])), ValueError, r"one number > 0, got a tensor of shape \(2,\)"),
    (dict(iterator=True), TypeError, r"train_loader is a one-shot iterator"),
])
def test_bad_settings_are_refused_before_any_training(kwargs, exc, match):
    kwargs = dict(kwargs)  # (the parametrize dict is shared by reruns)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    before = copy.deepcopy(model.state_dict())
    data = iter([(X, y)]) if kwargs.pop("iterator", False) else [(X, y)]
    with pytest.raises(exc, match=match):
        marglik_training(model, data, n_epochs=2, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if kwargs.get("hessian_structure") == "lowrank":  # with a scalar prior it runs
        la, margliks = marglik_training(model, [(X, y)], n_epochs=2, progress=False, prior_structure="scalar",
                                        **kwargs)
        assert len(margliks) >= 1


def test_the_callers_modes_are_put_back():
    """Trained in train mode, fitted in eval mode, handed back in the modes it came in (module by
    module: a frozen BatchNorm left in eval inside a model in train mode stays so)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Tanh(), nn.Linear(8, 3))
    for mode in (True, False):
        model.train(mode)
        model[1].eval()
        before = [m.training for m in model.modules()]
        marglik_training(model, DataLoader(TensorDataset(x, y), batch_size=16), n_epochs=1, progress=False)
        assert [m.training for m in model.modules()] == before
