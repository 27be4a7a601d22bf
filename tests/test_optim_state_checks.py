"""Review findings on the samplers, the cyclical schedule and the diagnostics (twelfth session),
each a test that failed before its fix: a hyper-parameter switched from a 0-dim tensor to the
number 0.0 kept the tensor's value; a state buffer that no longer fits its parameter, a float8
parameter or a meta one let a step fail after earlier groups were written; the NaN error named a
tensor by its index among those with gradients; the schedule flattened the groups' step sizes and
took explore_fraction=1 (never samples); the 'mean' ESS called tiny random walks constant; the
summary's worst R-hat was NaN for one constant element; big-endian numpy draws were refused."""
import numpy as np
import pytest
import torch
from torch import nn

from pyfastbayes import diagnostics, optim


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("key, first", [("temperature", 1.0), ("prior_precision", 100.0)])
def test_a_tensor_hyper_parameter_set_back_to_the_number_zero_takes_effect(fused, key, first):
    def run(as_tensor):
        p = nn.Parameter(torch.ones(1000, dtype=torch.float64))
        kw = {"temperature": 1.0, "prior_precision": 1.0}
        kw[key] = torch.tensor(first, dtype=torch.float64) if as_tensor else first
        opt = optim.SGLD([p], lr=1e-2, num_data=1, fused=fused, generator=torch.Generator().manual_seed(0), **kw)
        p.grad = torch.zeros_like(p)
        opt.step()
        opt.param_groups[0][key] = 0.0
        opt.step()
        return p.detach()
    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("cls, kw", [(optim.SGHMC, {"friction": 0.1}), (optim.PSGLD, {})])
@pytest.mark.parametrize("fused", [None, False])
def test_a_state_buffer_that_no_longer_fits_is_refused_before_any_write(cls, kw, fused):
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, num_data=1, fused=fused, **kw)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()
    b.data = torch.zeros(6)  # e.g. a resized embedding
    a.grad, b.grad = torch.ones(3), torch.ones(6)
    a0, rng0 = a.detach().clone(), opt.state[a]["rng"].clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(6,\)\) is torch.float32 "
                                         r"\(4,\).*no parameter was changed"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(opt.state[a]["rng"], rng0)


def test_a_model_converted_after_the_first_step_is_named():
    model = nn.Linear(3, 2)
    opt = optim.SGHMC(model.parameters(), lr=0.1, num_data=1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    w = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'momentum_buffer' of param_groups\[0\]\['params'\]\[0\].*torch.float64"):
        opt.step()
    assert torch.equal(model.weight.detach(), w)


def test_a_float8_parameter_is_refused_when_the_sampler_is_built():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(3).to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*float8_e4m3fn"):
        optim.SGLD([{"params": [a]}, {"params": [b]}], lr=0.1, num_data=1)


def test_the_nonfinite_error_names_the_parameter_by_its_place_in_the_group():
    frozen, p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 4))
    opt = optim.SGLD([frozen, p1, p2], lr=0.1, num_data=1)
    p1.grad, p2.grad = torch.zeros(3), torch.full((2, 4), float("nan"))
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] \(param_groups\[0\]\['params'\]\[2\] \(shape \(2, 4\)\)\)"):
        opt.step()


def test_the_schedule_keeps_the_groups_step_size_ratios():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = optim.SGLD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}], lr=1e-3, num_data=1)
    sched = optim.CyclicalSchedule(total_steps=10, n_cycles=2, lr_max=0.1)
    for step in (0, 3):
        sched.apply(opt, step)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == pytest.approx(sched.lr(step)) and lrs[1] == pytest.approx(sched.lr(step) / 100)
    sd = opt.state_dict()
    again = optim.SGLD([{"params": [a]}, {"params": [b]}], lr=1.0, num_data=1)
    again.load_state_dict(sd)  # the scales travel with the groups
    sched.apply(again, 4)
    assert again.param_groups[1]["lr"] == pytest.approx(sched.lr(4) / 100)


@pytest.mark.parametrize("scale", [1.0, 1e-17, 1e-80])
def test_mean_ess_is_scale_free(scale):
    g = torch.Generator().manual_seed(0)
    walk = torch.randn(4, 200, generator=g, dtype=torch.float64).cumsum(1)
    ref = diagnostics.ess(walk, method="mean")
    torch.testing.assert_close(diagnostics.ess(walk * scale, method="mean"), ref)
    assert float(ref) < 50  # a random walk: far from the 800 draws
    assert float(diagnostics.ess(torch.full((4, 200), 3.0 * scale, dtype=torch.float64), method="mean")) == 800


def test_summary_table_skips_constant_elements():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    w[1, :, 0] += 3.0  # a chain apart: R-hat far above 1.01
    w[:, :, 2] = 1.0
    row = [line for line in str(diagnostics.summary({"w": w})).splitlines() if line.startswith("w")][0]
    assert "nan" not in row and "(1 constant)" in row and "check" in row


def test_big_endian_numpy_draws_are_taken():
    x = np.random.default_rng(0).normal(size=(2, 50))
    torch.testing.assert_close(diagnostics.rhat(x.astype(">f8")), diagnostics.rhat(x))


def test_a_group_added_later_is_scaled_against_the_first_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = optim.SGLD([{"params": [a], "lr": 1e-3}], lr=1e-3, num_data=1)
    sched = optim.CyclicalSchedule(total_steps=10, n_cycles=2, lr_max=0.1)
    sched.apply(opt, 0)
    opt.add_param_group({"params": [b], "lr": 1e-6})
    sched.apply(opt, 1)
    assert opt.param_groups[1]["lr"] == pytest.approx(sched.lr(1) * 1e-3)  # it was the full lr (scale 1)
