"""pyfastbayes.optim public API (audit): a refused call names the argument and the fix and leaves the
optimizer, its state and the caller's arguments as they were. (tests/test_optim_errors.py covers
tensor hyper-parameters, foreign state_dicts and shapes; these are the cases it does not.)"""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes import optim

from _helpers import needs_cuda


def param(n=3):
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.ones(n)
    return p


def trained(cls=optim.SGHMC, **kw):
    opt = cls([param(3), param(2)], lr=1e-3, num_data=10, **kw)
    opt.step()
    return opt


def assert_same_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


# generator='abc' was accepted and failed at the first step with "'str' object has no attribute 'get_state'"
@pytest.mark.parametrize("gen,err,match", [
    ("abc", TypeError, r"generator must be a torch.Generator or None, got str.*torch.Generator\(\).manual_seed"),
    (3, TypeError, r"generator must be a torch.Generator or None, got int"),
])
def test_generator_checked_at_construction(gen, err, match):
    with pytest.raises(err, match=match):
        optim.SGLD([param()], lr=0.1, num_data=1, generator=gen)


def test_cpu_generator_still_works():
    a, b = param(), param()
    optim.SGLD([a], lr=0.1, num_data=1, generator=torch.Generator().manual_seed(3)).step()
    optim.SGLD([b], lr=0.1, num_data=1, generator=torch.Generator().manual_seed(3)).step()
    assert torch.equal(a, b)


# a CUDA generator was refused with a ValueError ("pass a CPU generator"): the seed is now drawn on the
# generator's own device, as SWAG, the landscape directions and the curvature probes do
@needs_cuda
@pytest.mark.parametrize("cls", [optim.SGLD, optim.SGHMC, optim.PSGLD])
def test_cuda_generator_seeds_the_chain(cls):
    def chain(seed, cpu_seed):
        p = nn.Parameter(torch.zeros(1000, device="cuda"))
        gen = torch.Generator(device="cuda").manual_seed(seed)
        opt = cls([p], lr=1e-3, num_data=10, generator=gen)
        torch.manual_seed(cpu_seed)  # the global CPU generator plays no part
        cpu_state = torch.get_rng_state()
        before = gen.get_state()
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        assert not torch.equal(gen.get_state(), before)  # the seed came from this generator
        assert torch.equal(torch.get_rng_state(), cpu_state)
        return p.detach().clone()

    assert torch.equal(chain(4, 0), chain(4, 1))
    assert not torch.equal(chain(4, 0), chain(5, 0))


@needs_cuda
def test_refused_first_step_puts_a_cuda_generator_back():
    p = nn.Parameter(torch.zeros(5, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(2)
    opt = optim.SGLD([p], lr=1e-3, num_data=10, generator=gen)
    before = gen.get_state()
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert torch.equal(gen.get_state(), before) and not opt.state and torch.equal(p, torch.zeros_like(p))
    p.grad = torch.ones_like(p)
    opt.step()  # the same seed as an optimizer that never failed
    q = nn.Parameter(torch.zeros(5, device="cuda"))
    q.grad = torch.ones_like(q)
    optim.SGLD([q], lr=1e-3, num_data=10, generator=torch.Generator(device="cuda").manual_seed(2)).step()
    assert torch.equal(p, q)


# a state_dict without the group's RNG position but with other state loaded, kept the saved hyper
# vector (cast to float32 by torch), and every later step failed inside the op ("hyper must be a
# contiguous float64 vector"): the optimizer was broken for good
def test_state_without_rng_is_refused_and_changes_nothing():
    sd = copy.deepcopy(trained().state_dict())
    del sd["state"][0]["rng"]
    target = trained()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] has no 'rng' \(seed, step\).*not saved by SGHMC"):
        target.load_state_dict(sd)
    assert_same_state(target.state_dict(), before)
    target.step()  # still usable


@pytest.mark.parametrize("edit,err,match", [
    (lambda sd: sd.update(state=None), TypeError, r"state_dict\['state'\] must be a dict of dicts"),
    (lambda sd: sd["state"].update({0: None}), TypeError, r"state_dict\['state'\] must be a dict of dicts"),
    (lambda sd: sd.update(param_groups=None), TypeError, r"state_dict\['param_groups'\] must be a list of dicts"),
    (lambda sd: sd["param_groups"].__setitem__(0, None), TypeError, r"state_dict\['param_groups'\] must be a list"),
    (lambda sd: sd["param_groups"][0].update(params=None), TypeError, r"with a 'params' list"),
    (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3, device="meta")), ValueError,
     r"state_dict\['state'\]\[0\] holds meta tensors \['momentum_buffer'\]"),
])
def test_malformed_state_dict_is_named(edit, err, match):
    sd = copy.deepcopy(trained().state_dict())
    edit(sd)
    target = trained()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(err, match=match):
        target.load_state_dict(sd)
    assert_same_state(target.state_dict(), before)


# add_param_group({'lr': 0.1}) raised KeyError: 'params'; params=None "'NoneType' object is not iterable"
@pytest.mark.parametrize("group,err,match", [
    ({"lr": 0.1}, ValueError, r"param_group has no 'params' \(its keys: \['lr'\]\)"),
    ({"params": None}, TypeError, r"param_group\['params'\] must be a tensor or an iterable of tensors, got NoneType"),
    ([param()], TypeError, r"param_group must be a dict such as"),
])
def test_add_param_group_names_what_is_missing(group, err, match):
    opt = optim.SGLD([param()], lr=0.1, num_data=1)
    with pytest.raises(err, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1


def test_refused_param_group_is_left_as_it_came():
    """torch fills the defaults into the caller's dict: a refused group got them anyway."""
    opt = optim.SGHMC([param()], lr=0.1, num_data=1)
    q = param(2)
    params = (q,)
    group = {"params": params, "friction": 2.0}
    with pytest.raises(ValueError, match=r"friction must be finite and in \(0, 1\], got 2.0 in param_groups\[1\]"):
        opt.add_param_group(group)
    assert group == {"params": params, "friction": 2.0} and group["params"] is params
    assert len(opt.param_groups) == 1
    group["friction"] = 0.5  # fixed and added again: works
    opt.add_param_group(group)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [q]


def test_refused_group_from_a_generator_keeps_the_parameters_it_read():
    opt = optim.SGLD([param()], lr=0.1, num_data=1)
    q = param(2)
    group = {"params": (p for p in [q]), "lr": -1.0}
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        opt.add_param_group(group)
    assert group.keys() == {"params", "lr"} and group["params"] == [q]  # the generator is spent: its list


# torch's "can't optimize a non-leaf Tensor" did not say which tensor, nor the fix
def test_non_leaf_parameter_is_named():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\) is not a leaf tensor "
                                         r".*MulBackward0.*nn.Parameter\(t.detach\(\).clone\(\)\)"):
        optim.SGLD([param(), x * 2], lr=0.1, num_data=1)


# seed(5) raised IndexError: list index out of range; seed() of an empty group too; and seed()
# before the first step created an empty state entry as a side effect (self.state is a defaultdict)
def test_seed_names_the_group():
    opt = optim.SGLD([{"params": []}, {"params": [param()]}], lr=0.1, num_data=1)
    with pytest.raises(IndexError, match=r"group must be an index of param_groups \(this SGLD has 2\), got 5"):
        opt.seed(5)
    with pytest.raises(TypeError, match="group must be an int, the index of a param group, got str"):
        opt.seed("a")
    with pytest.raises(RuntimeError, match=r"the seed is drawn at the first step"):
        opt.seed(1)
    assert len(opt.state) == 0
    opt.step()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] has no parameters, so it has no seed"):
        opt.seed(0)
    assert opt.seed(1) == opt.seed(-1)


# schedule: lr(-1) and is_cycle_end(1.5) answered silently (negative phase, truncated step),
# lr('a') "invalid literal for int()", apply([]) AttributeError, legacy state {'a': 1} the same ValueError
def test_schedule_methods_check_the_step():
    s = optim.CyclicalSchedule(10, 2, 0.1)
    for method in (s.lr, s.phase, s.is_sampling, s.is_cycle_end):
        with pytest.raises(ValueError, match="step must be >= 0, got -1"):
            method(-1)
        with pytest.raises(TypeError, match="step must be an integer, got float 1.5"):
            method(1.5)
        with pytest.raises(TypeError, match="step must be an integer, got str"):
            method("a")
    assert s.is_cycle_end(4) and s.lr(0) == pytest.approx(0.1) and s.lr(1e1 - 5) == pytest.approx(0.1)


def test_schedule_apply_and_legacy_state_are_checked():
    s = optim.CyclicalSchedule(10, 2, 0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .*got list"):
        s.apply([], 0)
    with pytest.raises(ValueError, match=r"state\['temperatures'\] must map param-group indices"):
        s.load_state_dict({"temperatures": {"a": 1.0}})
    assert s._legacy == {}
    s.load_state_dict({"temperatures": {"1": 0.5}})  # the old format (string keys from JSON) still loads
    assert s._legacy == {1: 0.5}
