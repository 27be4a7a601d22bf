"""Laplace.load_state_dict checks the model's frozen part (fingerprints recorded at fit): a state
fitted with other frozen weights is refused; legitimate loads (sparse, NaN / infinite, counter and
non-persistent buffers) are not; the loaded Laplace owns its tensors."""
import copy
import io

import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace
from pyfastbayes.laplace.laplace import _fingerprints

DT = torch.float64


def _through_file(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class _Buffers(nn.Module):
    """An MLP whose forward reads a sparse frozen projection, keeps a call counter and a lazily
    filled non-persistent cache, and clamps with an infinite bound."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        self.register_buffer("proj", (torch.eye(4, dtype=DT) * 2).to_sparse())
        self.register_buffer("bounds", torch.tensor([-float("inf"), float("inf")], dtype=DT))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("nan_marker", torch.tensor([float("nan")], dtype=DT))
        self.register_buffer("cache", torch.empty(0, dtype=DT), persistent=False)

    def forward(self, x):
        self.calls += 1
        if self.cache.numel() == 0:
            self.cache = torch.ones(4, dtype=DT)
        x = torch.sparse.mm(self.proj, x.t()).t() * self.cache
        return self.body(x).clamp(float(self.bounds[0]), float(self.bounds[1]))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 4, generator=g, dtype=DT), torch.randint(3, (20,), generator=g)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_unusual_buffers_fit_and_load(structure):
    model = _Buffers()
    X, y = _data()
    la = Laplace(model, hessian_structure=structure).fit([(X, y)], progress=False)
    la.la(X)  # the counter moves on
    twin = _Buffers()  # a fresh model: the counter at 0, the cache not yet filled
    twin.load_state_dict(model.state_dict())
    la2 = Laplace(twin, hessian_structure=structure)
    la2.load_state_dict(_through_file(la.state_dict()))
    torch.testing.assert_close(la2.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0)
    torch.testing.assert_close(la2.la(X), la.la(X), rtol=1e-12, atol=0)


def test_only_frozen_floating_persistent_tensors_are_fingerprinted():
    model = _Buffers()
    model.body[0].weight.requires_grad_(False)
    la = Laplace(model)
    names = set(_fingerprints(model, la.layout.names))
    assert names == {"body.0.weight", "proj", "bounds", "nan_marker"}


@pytest.mark.parametrize("where", ["frozen weight", "sparse buffer", "dense buffer"])
def test_other_frozen_part_is_refused(where):
    model = _Buffers()
    model.body[0].weight.requires_grad_(False)
    X, y = _data()
    state = Laplace(model, hessian_structure="full").fit([(X, y)], progress=False).state_dict()
    other = copy.deepcopy(model)
    with torch.no_grad():
        if where == "frozen weight":
            other.body[0].weight[0, 0] += 1e-3
        elif where == "sparse buffer":
            other.proj = (torch.eye(4, dtype=DT) * 2.001).to_sparse()
        else:
            other.bounds = torch.tensor([-1e9, float("inf")], dtype=DT)
    target = Laplace(other, hessian_structure="full")
    with pytest.raises(ValueError, match="other frozen parameters or buffers"):
        target.load_state_dict(_through_file(state))
    with pytest.raises(RuntimeError, match="not fitted"):
        target.mean  # the failed load left it unfitted


def test_loaded_state_is_owned_and_graphs_are_kept():
    model = _Buffers()
    X, y = _data()
    la = Laplace(model).fit([(X, y)], progress=False)
    state = la.state_dict()
    assert all(state["frozen"][k] is not la._frozen[k] for k in state["frozen"])
    la2 = Laplace(model)
    la2.load_state_dict(state)
    before = la2.log_marginal_likelihood()
    state["prior_precision"].mul_(100)
    state["prior_mean"].add_(1)
    state["loss"].add_(5)
    torch.testing.assert_close(la2.log_marginal_likelihood(), before, rtol=0, atol=0)
    # a prior mean is stored detached, as the prior precision and the noise: its tuning and
    # state_dict work whatever graph the caller's tensor had
    w = torch.ones((), dtype=DT, requires_grad=True)
    la.prior_mean = w * torch.full((la.n_params,), 0.1, dtype=DT)
    assert not la.prior_mean.requires_grad
    la.optimize_prior_precision(n_steps=3)
    copy.deepcopy(la.state_dict())


def test_fit_options_are_keyword_only():
    """laplace-torch's fit(train_loader, override, progress_bar): a positional False would have
    meant progress=False here, silently; now it is a TypeError."""
    model = _Buffers()
    X, y = _data()
    with pytest.raises(TypeError):
        Laplace(model).fit([(X, y)], False)


def test_a_changed_buffer_holding_nan_is_refused_and_older_formats_are_not_compared():
    model = _Buffers()
    X, y = _data()
    la = Laplace(model).fit([(X, y)], progress=False)
    state = la.state_dict()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.nan_marker = torch.tensor([7.0], dtype=DT)  # NaN -> a number: the counts differ
    with pytest.raises(ValueError, match="nan_marker"):
        Laplace(other).load_state_dict(state)
    both = _Buffers()
    both.register_buffer("nan_marker", torch.tensor([float("nan"), 1.0], dtype=DT))
    la = Laplace(both).fit([(X, y)], progress=False)
    state = la.state_dict()
    with torch.no_grad():
        both.nan_marker[1] = 7.0  # the NaN stays, a finite entry changes
    with pytest.raises(ValueError, match="nan_marker"):
        Laplace(both).load_state_dict(state)
    with torch.no_grad():
        both.nan_marker[1] = 1.0
    old = dict(state, frozen={k: v[:4] for k, v in state["frozen"].items()})  # an older [4] format
    old["frozen"]["calls"] = torch.zeros(4, dtype=DT)  # (and a key the current scheme leaves out)
    Laplace(both).load_state_dict(old)
