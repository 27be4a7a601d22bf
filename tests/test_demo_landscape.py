"""The geometry helpers of the demo's loss-landscape pictures (pyfastbayes/demo_landscape.py): the
plane through three models, projections onto it, the low-loss interval of a 1-D slice, and the MLP
with and without skip connections."""
import pytest
import torch

from pyfastbayes.demo_landscape import ResidualMLP, low_loss_interval, plane_through
from pyfastbayes.landscape import project_trajectory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plane_through_reproduces_the_three_points(dtype):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 500, generator=g, dtype=dtype) * torch.tensor([1.0, 3.0, 0.5], dtype=dtype)[:, None]
    origin, dirs, coords = plane_through(pts)
    assert origin.dtype == dirs.dtype == dtype and coords.dtype == torch.float64
    assert dirs.shape == (2, 500) and coords.shape == (3, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    back = origin.double() + coords @ dirs.double()
    torch.testing.assert_close(back, pts.double(), atol=tol * 10, rtol=tol)
    # orthonormal directions, coordinates as Euclidean distances
    torch.testing.assert_close(dirs.double() @ dirs.double().T, torch.eye(2, dtype=torch.float64), atol=tol, rtol=0)
    assert coords[0].tolist() == [0.0, 0.0] and coords[1, 1] == 0 and coords[2, 1] > 0
    assert coords[1, 0] == pytest.approx(float((pts[1] - pts[0]).double().norm()), rel=tol)
    assert float(coords[2].norm()) == pytest.approx(float((pts[2] - pts[0]).double().norm()), rel=tol)


def test_plane_through_refuses_degenerate_points():
    a = torch.randn(50, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="collinear"):
        plane_through(torch.stack([a, b, a + 2.5 * (b - a)]))
    with pytest.raises(ValueError, match="coincide"):
        plane_through(torch.stack([a, a, b]))
    with pytest.raises(ValueError, match=r"\[3, P\]"):
        plane_through(torch.stack([a, b]))


def test_project_trajectory_on_the_demo_plane_drops_the_component_off_it():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(3, 40, generator=g, dtype=torch.float64)
    origin, dirs, coords = plane_through(pts)
    torch.testing.assert_close(project_trajectory(pts, origin, dirs), coords, atol=1e-12, rtol=0)
    # a point of the plane plus a normal vector projects to the point's coordinates
    normal = torch.randn(40, generator=g, dtype=torch.float64)
    normal -= dirs.T @ (dirs @ normal)
    xy = torch.tensor([0.7, -1.3], dtype=torch.float64)
    p = origin + xy @ dirs + 5 * normal
    torch.testing.assert_close(project_trajectory(p[None], origin, dirs)[0], xy, atol=1e-12, rtol=0)


def test_low_loss_interval_on_piecewise_linear_slices():
    a = torch.linspace(-2, 2, 41, dtype=torch.float64)  # step 0.1
    v = torch.where(a < 0, -a, 2 * a)  # |x| on the left, 2x on the right: linear interpolation is exact
    left, right, censored = low_loss_interval(a, v, 0.0, 0.3)
    assert (left, right, censored) == (pytest.approx(-0.3), pytest.approx(0.15), False)
    # off the grid: the loss at `at` is interpolated (0.05 * 2 = 0.1), the level 0.4
    left, right, censored = low_loss_interval(a, v, 0.05, 0.3)
    assert (left, right, censored) == (pytest.approx(-0.4), pytest.approx(0.2), False)
    # never reached on one side: that side is the slice's end, flagged
    flat_right = torch.where(a < 0, -a, torch.zeros_like(a))
    left, right, censored = low_loss_interval(a, flat_right, 0.0, 0.3)
    assert (left, right, censored) == (pytest.approx(-0.3), 2.0, True)
    with pytest.raises(ValueError, match="outside"):
        low_loss_interval(a, v, 2.5, 0.3)
    with pytest.raises(ValueError, match="rise"):
        low_loss_interval(a, v, 0.0, 0.0)
    # a shared level instead of a rise: the same region seen from two points (1.0 and -0.5 inside it)
    for at in (1.0 / 2 - 0.2, -0.5):
        assert low_loss_interval(a, v, at, level=1.0) == (pytest.approx(-1.0), pytest.approx(0.5), False)
    with pytest.raises(ValueError, match="above the loss"):
        low_loss_interval(a, v, -1.5, level=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        low_loss_interval(a, v, 0.0, 0.3, level=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        low_loss_interval(a, v, 0.0)


def test_residual_mlp_differs_only_in_the_skip_connections():
    torch.manual_seed(0)
    res = ResidualMLP(6, 5, 3, 4, residual=True).eval()
    plain = ResidualMLP(6, 5, 3, 4, residual=False).eval()
    plain.load_state_dict(res.state_dict())  # the same parameters and buffers
    x = torch.randn(7, 6)
    with torch.no_grad():
        h = torch.relu(res.inp(x))
        h_res, h_plain = h, h
        for block in res.blocks:
            h_res = h_res + torch.relu(block(h_res))
            h_plain = torch.relu(block(h_plain))
        torch.testing.assert_close(res(x), res.out(h_res))
        torch.testing.assert_close(plain(x), res.out(h_plain))
        assert not torch.allclose(res(x), plain(x))
