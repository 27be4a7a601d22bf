"""pSGLD against oracles that do not come from pyfastbayes' own reference (issue 8, item 18).

The preconditioner is G = 1 / (eps + sqrt(V)). Every check uses V far from 1 (where sqrt(V) = V)
so a rule written as 1 / (eps + V) fails; each runs on the reference and on the native kernel.
The Bayesian-linear-regression check (stationary distribution) is in tests/test_blr.py.
"""
import math

import pytest
import torch

from pyfastbayes import optim

from _helpers import NATIVE

BACKENDS = [False] + ([True] if NATIVE else [])


# item 18: two T = 0 steps from V = 0 against the closed form written out here
@pytest.mark.parametrize("fused", BACKENDS)
def test_psgld_deterministic_steps_closed_form(fused):
    lr, num_data, prior, alpha, eps = 0.1, 4.0, 0.5, 0.5, 1e-3
    theta0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    g1 = torch.tensor([0.1, 1.0, 3.0, -6.0], dtype=torch.float64)
    g2 = torch.tensor([0.2, -2.0, 1.0, 4.0], dtype=torch.float64)
    p = theta0.clone()
    opt = optim.PSGLD([p], lr=lr, num_data=num_data, alpha=alpha, eps=eps, temperature=0.0,
                      prior_precision=prior, fused=fused)
    theta, v = theta0.clone(), torch.zeros(4, dtype=torch.float64)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        v = alpha * v + (1 - alpha) * g * g
        precond = 1.0 / (eps + v.sqrt())
        theta = theta - lr / 2 * precond * (num_data * g + prior * theta)
    assert not torch.allclose(v.sqrt(), v, rtol=0.1)  # the check is blind where V = 1
    torch.testing.assert_close(opt.state[p]["square_avg"], v, rtol=1e-12, atol=0)
    torch.testing.assert_close(p, theta, rtol=1e-12, atol=1e-15)


# item 18: with V > 0 the injected noise has variance lr * T * G, G = 1 / (eps + sqrt(V))
@pytest.mark.slow
@pytest.mark.parametrize("fused", BACKENDS)
def test_psgld_noise_variance_with_preconditioner(fused):
    n, lr, temp, alpha, eps = 100_000, 1e-2, 0.8, 0.9, 1e-4
    p = torch.zeros(2 * n, dtype=torch.float64)
    g_first = torch.cat([torch.full((n,), 2.0), torch.full((n,), 0.3)]).double()
    opt = optim.PSGLD([p], lr=lr, num_data=10, alpha=alpha, eps=eps, temperature=0.0, fused=fused)
    torch.manual_seed(5)
    p.grad = g_first
    opt.step()  # T = 0: sets V = (1 - alpha) g^2, moves theta deterministically
    v = alpha * (1 - alpha) * g_first**2  # V after the second step, whose gradient is 0
    before = p.clone()
    opt.param_groups[0]["temperature"] = temp
    p.grad = torch.zeros(2 * n, dtype=torch.float64)
    opt.step()  # zero gradient, zero prior: the update is pure noise
    noise = p - before
    for half in (slice(0, n), slice(n, 2 * n)):
        expected = lr * temp / (eps + v[half].sqrt()[0].item())
        measured = noise[half].var().item()
        # the variance of a sample variance of n normals is 2 sigma^4 / (n - 1): 5 standard errors
        assert abs(measured / expected - 1) < 5 * math.sqrt(2 / (n - 1)), (measured, expected)
        assert abs(noise[half].mean().item()) < 5 * math.sqrt(expected / n)


def test_float16_parameters_are_refused_with_the_reason():
    """In float16, V's (1 - alpha) g^2 underflows to 0 for |g| < 2.4e-3 (alpha 0.99): G = 1 / eps, steps
    3.5x too large, silently; refused at construction and when a group is added, nothing added."""
    PSGLD = optim.PSGLD
    p16 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"float16.*underflows.*bfloat16"):
        PSGLD([p16], lr=1e-6, num_data=1000)
    opt = PSGLD([torch.nn.Parameter(torch.zeros(3))], lr=1e-6, num_data=1000)
    with pytest.raises(TypeError, match="param_groups\\[1\\]\\['params'\\]\\[0\\] is float16"):
        opt.add_param_group({"params": [p16]})
    assert len(opt.param_groups) == 1
    pb = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = PSGLD([pb], lr=1e-6, num_data=1000, temperature=0.0)
    for _ in range(50):
        pb.grad = torch.full_like(pb, 1e-3)
        opt.step()
    v = opt.state[pb]["square_avg"].float()
    torch.testing.assert_close(v, torch.full_like(v, 1e-6 * (1 - 0.99 ** 50)), rtol=0.02, atol=0)
