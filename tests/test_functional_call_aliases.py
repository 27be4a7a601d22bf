"""A module reached under two names (an alias attribute, one LayerNorm called at two places)
through every ``functional_call`` of the package: the model keeps its own Parameter objects and the
values equal a reference model that holds the given tensors. (``torch.func.functional_call``
with its default ``tie_weights=True`` swaps such a slot twice and leaves the swapped-in tensor
behind: pytorch issue #164759.)"""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes import SWAG
from pyfastbayes.landscape import BezierCurve, grid, random_directions
from pyfastbayes.nn.stateless import functional_call


class _Aliased(nn.Module):
    """A LayerNorm called twice (two names in the Sequential) and a BatchNorm reachable under a
    second attribute (``self.norm``) that the forward never calls through."""

    def __init__(self):
        super().__init__()
        ln = nn.LayerNorm(6)
        self.body = nn.Sequential(nn.Linear(5, 6), ln, nn.Tanh(), nn.Linear(6, 6), ln, nn.BatchNorm1d(6),
                                  nn.Linear(6, 3))
        self.norm = self.body[5]

    def forward(self, x):
        return self.body(x)


def _model(seed=0):
    torch.manual_seed(seed)
    m = _Aliased()
    with torch.no_grad():  # non-trivial affine parameters and statistics
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.norm.running_mean.normal_()
        m.norm.running_var.uniform_(0.5, 2)
    return m.eval()


def _identities(m):
    return [(n, id(t)) for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]]


def _at(model, values: dict):
    """A deepcopy of model holding ``values`` (the reference: no functional_call)."""
    ref = copy.deepcopy(model)
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for k, v in values.items():
            own[k].copy_(v)
    return ref


def test_functional_call_swaps_each_slot_once_also_under_vmap():
    model = _model()
    before = _identities(model)
    x = torch.randn(7, 5)
    values = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, values, (x,)), _at(model, values)(x))
    assert _identities(model) == before
    stacked = {k: torch.stack([v, 2 * v]) for k, v in values.items()}
    out = torch.vmap(lambda p: functional_call(model, p, (x,)))(stacked)
    torch.testing.assert_close(out[1], _at(model, {k: 2 * v for k, v in values.items()})(x))
    assert _identities(model) == before
    assert all(type(p) is nn.Parameter for p in model.parameters())
    # plain torch (the reason for the helper): the slot keeps a swapped-in tensor
    torch.func.functional_call(model, values, (x,))
    assert _identities(model) != before


def test_functional_call_ties_and_conflicts():
    """A value given for any name of a tied parameter reaches every module that holds it (as
    torch.func's tie_weights does); two different values for names of one tensor: ValueError."""
    emb, out = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
    out.weight = emb.weight
    model = nn.Sequential(emb, out)
    w = torch.randn(4, 3)
    idx = torch.tensor([0, 3, 1])
    for name in ("0.weight", "1.weight"):
        torch.testing.assert_close(functional_call(model, {name: w}, (idx,)), (w[idx] @ w.T))
    assert model[0].weight is model[1].weight and type(model[0].weight) is nn.Parameter
    with pytest.raises(ValueError, match="'0.weight' and '1.weight' name the same tensor"):
        functional_call(model, {"0.weight": w, "1.weight": w + 1}, (idx,))
    functional_call(model, {"0.weight": w, "1.weight": w}, (idx,))  # the same value twice: fine


def test_grid_and_curves_leave_an_aliased_model_as_it_was():
    model, other = _model(0), _model(1)
    before = _identities(model)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    loss_fn = nn.CrossEntropyLoss()
    D = random_directions(model, n=2, generator=torch.Generator().manual_seed(0))
    axes = (torch.linspace(-1, 1, 3), torch.linspace(-0.5, 0.5, 2))
    res = grid(model, loss_fn, (x, y), D, axes, progress=False, batch_points=4)
    assert _identities(model) == before
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            ref = copy.deepcopy(model)
            torch.nn.utils.vector_to_parameters(theta0 + a * D[0] + b * D[1], ref.parameters())
            with torch.no_grad():
                assert res.loss[i, j].item() == pytest.approx(loss_fn(ref(x), y).item(), rel=1e-5)
    curve = BezierCurve(model, other, 1)
    curve.fit(loss_fn, (x, y), epochs=2, lr=1e-2, progress=False)
    curve.evaluate([0.0, 0.5], loss_fn, (x, y))
    assert _identities(model) == before and all(type(p) is nn.Parameter for p in model.parameters())


def test_posterior_predictions_leave_an_aliased_model_as_it_was():
    model = _model()
    before = _identities(model)
    swag = SWAG(model, max_rank=2)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        swag.collect()
    x = torch.randn(6, 5)
    first = swag.predict(x, n_samples=3, bn_loader=False, generator=torch.Generator().manual_seed(0))
    assert _identities(model) == before
    again = swag.predict(x, n_samples=3, bn_loader=False, generator=torch.Generator().manual_seed(0))  # refused before the fix
    torch.testing.assert_close(first, again)
