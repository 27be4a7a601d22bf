"""landscape.grid against the peer loss-landscapes (pip ``loss-landscapes``): its ``random_plane``
is run with a metric that also records the parameters it was called at, the points are
reconstructed in the plane of its own two directions, and our grid evaluated at those points
gives its numbers. The reconstruction also shows where the peer is wrong: its grid is skewed
(even columns at offsets 1..steps along the second direction, odd columns at 0..steps-1), which
ours, evaluating the grid it is given, is not."""
import torch
from torch import nn

from pyfastbayes.landscape import grid
from _helpers import require


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def test_random_plane_points_are_skewed_and_our_grid_reproduces_its_values():
    ll = require("loss_landscapes")
    metrics = require("loss_landscapes.metrics")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    class Recording(metrics.Metric):
        def __init__(self):
            super().__init__()
            self.points = []

        def __call__(self, wrapper):
            self.points.append(_flat(wrapper.get_modules()[0]))
            return loss_fn(wrapper.forward(x), y).item()

    steps = 6
    rec = Recording()
    values = torch.as_tensor(ll.random_plane(model, rec, distance=1, steps=steps, normalization="filter",
                                             deepcopy_model=True))  # [steps, steps]
    assert values.shape == (steps, steps) and len(rec.points) == steps * steps
    # the points in evaluation order: column i walks up (even i: add, then evaluate) or down (odd i:
    # subtract, then evaluate; stored reversed), then one step along the first direction
    order = []
    for i in range(steps):
        order += [(i, j) for j in range(steps)] if i % 2 == 0 else [(i, j) for j in reversed(range(steps))]
    P = {ij: p for ij, p in zip(order, rec.points)}
    d2 = P[(0, 1)] - P[(0, 0)]
    d1 = (P[(2, 0)] - P[(0, 0)]) / 2
    basis = torch.stack([d1, d2], dim=1)  # [P, 2]
    origin = P[(0, 0)]
    coords = torch.empty(steps, steps, 2, dtype=torch.float64)
    for (i, j), p in P.items():
        coords[i, j] = torch.linalg.lstsq(basis, (p - origin)[:, None]).solution[:, 0]
        assert torch.allclose(origin + basis @ coords[i, j], p, atol=1e-9)  # every point lies in the plane
    a, b = coords[..., 0], coords[..., 1]
    idx = torch.arange(steps, dtype=torch.float64)
    torch.testing.assert_close(a, idx[:, None].expand(steps, steps), rtol=0, atol=1e-8)
    # the skew: at the same index j, odd columns sit one step below even ones along the second direction
    torch.testing.assert_close(b[0::2], idx.expand(steps // 2, steps), rtol=0, atol=1e-8)
    torch.testing.assert_close(b[1::2], idx.expand(steps // 2, steps) - 1, rtol=0, atol=1e-8)

    # our grid through the centre of the plane along the same directions, at the peer's actual points
    centre = _flat(model)
    off = torch.linalg.lstsq(basis, (centre - origin)[:, None]).solution[:, 0]  # centre in plane coordinates
    assert torch.allclose(origin + basis @ off, centre, atol=1e-9)
    alphas = idx - off[0]
    betas = torch.arange(-1, steps, dtype=torch.float64) - off[1]  # b in -1 .. steps - 1 covers both column kinds
    ours = grid(model, loss_fn, (x, y), basis.t().contiguous(), (alphas, betas), progress=False).loss
    want = torch.empty(steps, steps, dtype=torch.float64)
    for i in range(steps):
        for j in range(steps):
            want[i, j] = ours[i, j + 1] if i % 2 == 0 else ours[i, j]  # b = j (column j + 1) or j - 1 (column j)
    torch.testing.assert_close(values, want, rtol=1e-10, atol=1e-12)
    # the intended symmetric grid (b = j for every column) differs from the peer's on the odd columns
    assert not torch.allclose(values[1::2], ours[1::2, 1:], atol=1e-6)
