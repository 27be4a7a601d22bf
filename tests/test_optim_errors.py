"""pyfastbayes.optim: bad input names the argument and the fix (issue 8, unclear errors)."""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes import optim


def param(n=3):
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.ones(n)
    return p


# unclear errors: a tensor hyper-parameter must be 0-dim, floating, on the parameters' device
@pytest.mark.parametrize("value,match", [
    (torch.tensor([0.5]), r"lr must be a 0-dim tensor, got shape \(1,\).*torch.tensor\(0.5"),
    (torch.tensor(1), r"lr must be a float32 or float64 tensor, got torch.int64.*dtype=torch.float64"),
    (torch.tensor(True), r"lr must be a float32 or float64 tensor, got torch.bool"),
    (torch.tensor(0.5, device="meta"), r"lr is on meta but the parameters .* are on cpu.*\.to\("),
])
def test_tensor_hyperparameter_shape_dtype_device(value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        optim.SGLD([param()], lr=value, num_data=10)
    # and when set later (e.g. by a schedule), caught by step() before any write
    p = param()
    opt = optim.SGLD([p], lr=0.1, num_data=10)
    opt.param_groups[0]["lr"] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3)) and len(opt.state) == 0


def test_good_tensor_hyperparameters_work():
    p = param()
    opt = optim.SGHMC([p], lr=torch.tensor(0.1, dtype=torch.float64), num_data=torch.tensor(10.0),
                      friction=torch.tensor(1.0), temperature=0.0)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -1.0))


# unclear errors: num_data=10**400 raised OverflowError from float()
def test_huge_integer_hyperparameter():
    with pytest.raises(ValueError, match=r"num_data must be finite.*float64"):
        optim.SGLD([param()], lr=0.1, num_data=10**400)
    with pytest.raises(TypeError, match=r"lr must be a number.*bool"):
        optim.SGLD([param()], lr=True, num_data=10)
    with pytest.raises(TypeError, match=r"lr must be a number.*str"):
        optim.SGLD([param()], lr="0.1", num_data=10)


def trained(cls, **kw):
    p, q = param(3), param(2)
    opt = cls([p, q], lr=1e-3, num_data=10, **kw)
    opt.step()
    return opt


# unclear errors: loading another optimizer's state said KeyError: 'num_data' at the next step
@pytest.mark.parametrize("source", ["SGD", "SGLD", "PSGLD"])
def test_loading_another_optimizers_state_is_refused(source):
    if source == "SGD":
        p, q = param(3), param(2)
        other = torch.optim.SGD([p, q], lr=0.1, momentum=0.9)
        other.step()
    else:
        other = trained(getattr(optim, source))
    target = trained(optim.SGHMC, friction=0.3)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"not saved by SGHMC.*load a state_dict saved by SGHMC"):
        target.load_state_dict(other.state_dict())
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        for name, v in before["state"][k].items():
            assert torch.equal(after["state"][k][name], v) if torch.is_tensor(v) else after["state"][k][name] == v


def test_loading_sghmc_state_into_sgld_is_refused():
    with pytest.raises(ValueError, match=r"not saved by SGLD.*friction"):
        trained(optim.SGLD).load_state_dict(trained(optim.SGHMC).state_dict())


# unclear errors: state saved for parameters of other shapes or order failed only at step()
def test_loading_state_for_other_shapes_is_refused():
    src = trained(optim.PSGLD)  # params of shapes (3,), (2,)
    p, q = param(2), param(3)  # same count, swapped order
    dst = optim.PSGLD([p, q], lr=1e-3, num_data=10)
    with pytest.raises(ValueError, match=r"\['state'\]\[0\]\['square_avg'\] has shape \(3,\) but "
                                         r"param_groups\[0\]\['params'\]\[0\] has shape \(2,\).*order"):
        dst.load_state_dict(src.state_dict())
    assert len(dst.state) == 0
    with pytest.raises(ValueError, match=r"2 parameters in param_groups\[0\].*this PSGLD has 1"):
        optim.PSGLD([param(3)], lr=1e-3, num_data=10).load_state_dict(src.state_dict())
    bad = copy.deepcopy(src.state_dict())
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        trained(optim.PSGLD).load_state_dict(bad)


def test_loaded_buffers_are_not_shared_with_the_source():
    src = trained(optim.SGHMC)
    dst = optim.SGHMC([param(3), param(2)], lr=1e-3, num_data=10)
    dst.load_state_dict(src.state_dict())  # no deepcopy: the tensors of src.state_dict() are src's own
    before = [src.state[p]["momentum_buffer"].clone() for p in src.param_groups[0]["params"]]
    dst.step()
    for p, b in zip(src.param_groups[0]["params"], before):
        assert torch.equal(src.state[p]["momentum_buffer"], b)
