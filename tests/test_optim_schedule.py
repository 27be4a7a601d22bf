"""CyclicalSchedule: uneven splits, state, sampling temperatures, a cSGLD run (issue 8, items 7, 19)."""
import copy
import math

import pytest
import torch
from torch import nn

from pyfastbayes import optim


def expected_lr(t, total, cycles, lr_max):
    """cSG-MCMC's schedule written out: L = ceil(T / M), r = (t mod L) / L, lr = lr_max/2 (cos(pi r) + 1)."""
    length = -(-total // cycles)
    r = (t % length) / length
    return 0.5 * lr_max * (math.cos(math.pi * r) + 1), r


# item 19: 10 steps in 3 cycles -> L = ceil(10/3) = 4 (floor would give 3); the run's last step ends a cycle
def test_uneven_split_uses_ceil_and_last_step_ends_a_cycle():
    s = optim.CyclicalSchedule(total_steps=10, n_cycles=3, lr_max=0.4, explore_fraction=0.5)
    assert s.cycle_length == 4
    assert [t for t in range(10) if s.is_cycle_end(t)] == [3, 7, 9]
    assert [t for t in range(10) if s.is_sampling(t)] == [2, 3, 6, 7]
    for t in range(10):
        lr, r = expected_lr(t, 10, 3, 0.4)
        assert math.isclose(s.lr(t), lr) and math.isclose(s.phase(t), r)
    # one step per cycle and a single cycle are the edge cases of the same rule
    one = optim.CyclicalSchedule(total_steps=5, n_cycles=5, lr_max=1.0, explore_fraction=0.0)
    assert one.cycle_length == 1 and all(one.is_cycle_end(t) and one.lr(t) == 1.0 for t in range(5))
    single = optim.CyclicalSchedule(total_steps=7, n_cycles=1, lr_max=1.0)
    assert [t for t in range(7) if single.is_cycle_end(t)] == [6]


# item 19: a state_dict round trip restores the schedule
def test_state_dict_round_trip():
    s = optim.CyclicalSchedule(total_steps=10, n_cycles=3, lr_max=0.4, explore_fraction=0.5)
    state = copy.deepcopy(s.state_dict())
    other = optim.CyclicalSchedule(total_steps=100, n_cycles=4, lr_max=0.1)
    other.load_state_dict(state)
    assert other.cycle_length == 4
    for t in range(12):
        assert other.lr(t) == s.lr(t) and other.is_sampling(t) == s.is_sampling(t)
        assert other.is_cycle_end(t) == s.is_cycle_end(t)
    with pytest.raises(ValueError, match="n_cycles"):
        other.load_state_dict(dict(state, n_cycles=11))
    with pytest.raises(ValueError, match="state_dict.*missing.*lr_max"):
        other.load_state_dict({k: v for k, v in state.items() if k != "lr_max"})
    assert other.cycle_length == 4


# item 19: a short cSGLD run through the schedule equals the run with lr and T set by hand
def test_short_csgld_run_through_the_schedule():
    total, cycles, lr_max, beta, temp = 10, 3, 0.2, 0.5, 0.7

    def run(by_hand):
        torch.manual_seed(11)
        w = nn.Parameter(torch.ones(200))
        opt = optim.SGLD([w], lr=lr_max, num_data=1, temperature=temp, prior_precision=1.0)
        s = optim.CyclicalSchedule(total, cycles, lr_max, beta)
        kept, trace = [], []
        for t in range(total):
            if by_hand:
                lr, r = expected_lr(t, total, cycles, lr_max)
                opt.param_groups[0].update(lr=lr, temperature=temp if r >= beta else 0.0)
                keep = r >= beta
            else:
                keep = s.apply(opt, t)
            before = w.detach().clone()
            w.grad = torch.zeros(200)  # potential = prior only: U = |w|^2 / 2
            opt.step()
            trace.append((w.detach() - before * (1 - opt.param_groups[0]["lr"] / 2)).std().item())
            if keep:
                kept.append(t)
        return w.detach(), kept, trace

    w_s, kept_s, trace_s = run(False)
    w_h, kept_h, trace_h = run(True)
    assert kept_s == kept_h == [2, 3, 6, 7]
    assert torch.equal(w_s, w_h)
    # exploring steps are noise-free gradient descent; sampling steps add noise of std sqrt(lr T)
    for t, sd in enumerate(trace_s):
        lr, r = expected_lr(t, total, cycles, lr_max)
        if r < beta:
            assert sd < 1e-6
        else:
            assert abs(sd / math.sqrt(lr * temp) - 1) < 5 / math.sqrt(2 * 200)


# item 7: a group added after the first apply() samples at its own temperature
def test_group_added_later_keeps_its_temperature():
    s = optim.CyclicalSchedule(total_steps=10, n_cycles=1, lr_max=0.1, explore_fraction=0.5)
    opt = optim.SGLD([nn.Parameter(torch.zeros(2))], lr=0.1, num_data=1, temperature=0.3)
    assert s.apply(opt, 0) is False
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "temperature": 0.05})
    assert s.apply(opt, 1) is False
    assert [g["temperature"] for g in opt.param_groups] == [0.0, 0.0]
    assert s.apply(opt, 7) is True
    assert [g["temperature"] for g in opt.param_groups] == [0.3, 0.05]


# item 7: resuming with a fresh schedule from optimizer state saved while exploring keeps the temperature
def test_resume_from_state_saved_while_exploring():
    s = optim.CyclicalSchedule(total_steps=10, n_cycles=1, lr_max=0.1, explore_fraction=0.5)
    p = nn.Parameter(torch.zeros(2))
    opt = optim.SGLD([p], lr=0.1, num_data=1, temperature=0.3)
    for t in range(3):
        s.apply(opt, t)
        p.grad = torch.ones(2)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["temperature"] == 0.0  # saved during exploration
    p2 = nn.Parameter(p.detach().clone())
    opt2 = optim.SGLD([p2], lr=0.1, num_data=1, temperature=1.0)
    opt2.load_state_dict(saved)
    s2 = optim.CyclicalSchedule(total_steps=10, n_cycles=1, lr_max=0.1, explore_fraction=0.5)
    assert s2.apply(opt2, 3) is False and opt2.param_groups[0]["temperature"] == 0.0
    assert s2.apply(opt2, 8) is True and opt2.param_groups[0]["temperature"] == 0.3


# unclear errors: CyclicalSchedule(10, 2, '0.1') raised a TypeError that did not name lr_max
@pytest.mark.parametrize("args,err,match", [
    ((10, 2, "0.1"), TypeError, r"lr_max must be a number, got str"),
    (("10", 2, 0.1), TypeError, r"total_steps must be an integer, got str"),
    ((10, 2.5, 0.1), TypeError, r"n_cycles must be an integer, got float 2.5"),
    ((10, 2, 0.1, None), TypeError, r"explore_fraction must be a number, got NoneType"),
    ((10, 2, float("inf")), ValueError, r"lr_max must be finite and > 0"),
    ((10, 2, 0.1, float("nan")), ValueError, r"explore_fraction must be finite and in \[0, 1\)"),
    ((10, 2, 0.1, 1.0), ValueError, r"explore_fraction must be finite and in \[0, 1\), got 1.0"),  # never samples
])
def test_bad_arguments_name_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        optim.CyclicalSchedule(*args)


def test_bad_step_names_the_argument():
    s = optim.CyclicalSchedule(10, 2, 0.1)
    opt = optim.SGLD([nn.Parameter(torch.zeros(2))], lr=0.1, num_data=1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        s.apply(opt, -1)
    with pytest.raises(TypeError, match="step must be an integer"):
        s.apply(opt, 1.5)


def test_a_schedule_that_never_samples_is_refused():
    """r(t) takes the values k / L only: with L < 1 / (1 - beta) no step of a cycle reaches beta."""
    for total, cycles in ((10, 3), (7, 7), (40, 10), (1, 1)):
        with pytest.raises(ValueError, match="never samples with cycles of L"):
            optim.CyclicalSchedule(total, cycles, 0.1)
    s = optim.CyclicalSchedule(10, 2, 0.1)  # L = 5: the last step of a cycle, r = 0.8, samples
    assert [s.is_sampling(t) for t in range(5)] == [False, False, False, False, True]
