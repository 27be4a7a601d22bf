"""sharpness(): the top Hessian eigenvalue and the Hessian trace of a small model, against the
dense Hessian; both scale with the loss."""
import math

import torch
from torch import nn

from pyfastbayes.curvature import hessian, sharpness


def _problem(scale=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64) * scale
    y = torch.randint(0, 3, (40,))
    return model, nn.CrossEntropyLoss(), (x, y)


def test_sharpness_matches_the_dense_hessian():
    model, loss_fn, data = _problem()
    H = hessian(model, loss_fn, data).to_dense()
    s = sharpness(model, loss_fn, data, n_probes=400, generator=torch.Generator().manual_seed(1))
    assert math.isclose(s.top_eigenvalue, float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-8)
    # Hutchinson: unbiased, its reported standard error is the yardstick (4 SE)
    assert abs(s.trace - float(H.trace())) <= 4 * s.trace_std_error
    assert s.trace_std_error > 0


def test_sharpness_is_reproducible_and_scales_with_the_loss():
    model, loss_fn, data = _problem()
    a = sharpness(model, loss_fn, data, n_probes=50, generator=torch.Generator().manual_seed(3))
    b = sharpness(model, loss_fn, data, n_probes=50, generator=torch.Generator().manual_seed(3))
    assert a == b
    # half the loss, half the Hessian: both numbers halve (same probes)
    half = sharpness(model, lambda out, y: 0.5 * loss_fn(out, y), data, n_probes=50,
                     generator=torch.Generator().manual_seed(3))
    assert math.isclose(half.top_eigenvalue, a.top_eigenvalue / 2, rel_tol=1e-8)
    assert math.isclose(half.trace, a.trace / 2, rel_tol=1e-8)
