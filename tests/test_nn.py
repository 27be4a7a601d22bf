"""pyfastbayes.nn: ParamLayout (flat vector <-> named parameters), update_bn, ModeGuard, input/output adapters."""
import copy
import pickle

import pytest
import torch
from torch import nn

from pyfastbayes.nn import ModeGuard, ParamLayout, iterate_inputs, update_bn


class _Mixed(nn.Module):
    """float32 layer with a frozen bias, then a float64 layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2).double()
        self.a.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).double())


def _mixed():
    return _Mixed()


# ---------------------------------------------------------------------------------------------
# ParamLayout
# ---------------------------------------------------------------------------------------------
def test_layout_round_trip_against_manual_flattening():
    torch.manual_seed(0)
    m = _mixed()
    lay = ParamLayout(m)
    assert lay.names == ("a.weight", "b.weight", "b.bias")
    assert lay.shapes == ((4, 3), (2, 4), (2,)) and lay.numel == 12 + 8 + 2
    assert lay.dtypes == (torch.float32, torch.float64, torch.float64) and lay.dtype == torch.float64
    assert lay.offsets == (0, 12, 20) and lay.device == torch.device("cpu")
    manual = torch.cat([m.a.weight.detach().double().reshape(-1), m.b.weight.detach().reshape(-1),
                        m.b.bias.detach()])
    flat = lay.flatten()
    assert flat.dtype == torch.float64 and torch.equal(flat, manual)
    assert lay.flatten(dtype=torch.float32).dtype == torch.float32
    # unflatten: views where the dtype agrees, casts otherwise; functional_call runs the model at 2 flat
    d = lay.unflatten(2 * flat)
    assert d["b.weight"].dtype == torch.float64 and d["a.weight"].dtype == torch.float32
    twice = 2 * flat
    assert lay.unflatten(twice)["b.weight"].data_ptr() == twice[12:].data_ptr()  # a view
    x = torch.randn(5, 3)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for p in (ref.a.weight, ref.b.weight, ref.b.bias):
            p.mul_(2)
    torch.testing.assert_close(torch.func.functional_call(m, d, (x,)), ref(x).detach())
    # write_ into another model with the same layout, then flatten again
    other = _mixed()
    assert lay.write_(flat, other) is other
    assert torch.equal(lay.flatten(other), flat)
    assert not torch.equal(other.a.bias, m.a.bias)  # frozen parameters are not written


def test_layout_equality_description_and_pickle():
    a, b = ParamLayout(_mixed()), ParamLayout(_mixed())
    assert a == b and hash(a) == hash(b)
    assert ParamLayout(nn.Linear(4, 3)) != ParamLayout(nn.Linear(2, 5))  # same P = 15, other shapes
    assert ParamLayout(nn.Linear(4, 3)) != ParamLayout(nn.Linear(4, 3).double())  # other dtype
    assert "tensor 0" in ParamLayout(nn.Linear(4, 3)).difference(ParamLayout(nn.Linear(2, 5)))
    desc = pickle.loads(pickle.dumps(a.describe()))
    a.check_description(desc)
    with pytest.raises(ValueError, match="other trainable parameters"):
        ParamLayout(nn.Linear(4, 3)).check_description(desc)


def test_layout_refuses_changed_models_and_bad_vectors():
    m = nn.Linear(3, 2)
    lay = ParamLayout(m, owner="SWAG")
    with pytest.raises(ValueError, match=r"\[P\] with P = 8"):
        lay.unflatten(torch.zeros(7))
    with pytest.raises(TypeError, match="floating-point"):
        lay.write_(torch.zeros(8, dtype=torch.long))
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="P = 8"):
        lay.write_(torch.zeros(9))
    assert torch.equal(m.weight, before)  # nothing written
    m2 = nn.Linear(3, 2).double()
    with pytest.raises(RuntimeError, match="changed since the SWAG was built.*float64"):
        lay.params(m2)
    m3 = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="changed since the SWAG was built"):
        lay.flatten(m3)  # other names
    with pytest.raises(RuntimeError, match="3 trainable tensors now, 2 at construction"):
        lay.params(_three())
    with pytest.raises(ValueError, match="no trainable parameters"):
        ParamLayout(nn.ReLU())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ParamLayout(torch.zeros(3))


def _three():
    m = nn.Linear(3, 2)
    m.extra = nn.Parameter(torch.zeros(1))
    return m


# ---------------------------------------------------------------------------------------------
# update_bn (issue 8 item 15) and ModeGuard
# ---------------------------------------------------------------------------------------------
def _bn_net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _loader():
    torch.manual_seed(1)
    x = torch.randn(48, 4) * 2 + 1
    return [(x[i:i + 16], torch.zeros(16)) for i in range(0, 48, 16)]


@pytest.mark.parametrize("bad", ["empty", "refused batch", "late failure", "batch_size"])
def test_update_bn_that_fails_puts_the_statistics_back(bad):
    """A pass that fails (no batches, a batch the model refuses, a failure mid-loader) leaves the
    BatchNorm statistics as they were (before: reset to 0 / 1, or half-averaged); a bad batch_size is
    refused before anything changes."""
    model = _bn_net()
    update_bn(_loader(), model)
    before = {k: v.clone() for k, v in model.named_buffers()}

    def late():
        yield from _loader()[:2]
        raise RuntimeError("the loader broke")

    loader, kw, exc = {"empty": ([], {}, ValueError), "refused batch": ([(torch.randn(16, 5), None)], {}, RuntimeError),
                       "late failure": (late(), {}, RuntimeError),
                       "batch_size": (torch.randn(8, 4), {"batch_size": 0}, ValueError)}[bad]
    with pytest.raises(exc):
        update_bn(loader, model, **kw)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("make", [_bn_net, lambda: nn.Sequential(nn.BatchNorm1d(4, affine=False))],
                         ids=["with_params", "without_params"])
def test_update_bn_torch_call_form_matches_torch(make):
    """Item 15: torch's call form update_bn(loader, model, device=None), also for a model without
    parameters (a bare StopIteration before), gives torch's statistics."""
    torch.manual_seed(0)
    model = make()
    loader = _loader()
    for call in (lambda m: update_bn(loader, m), lambda m: update_bn(loader, m, None),
                 lambda m: update_bn(loader, m, torch.device("cpu")), lambda m: update_bn(loader, m, device="cpu")):
        ours, ref = copy.deepcopy(model), copy.deepcopy(model)
        call(ours)
        torch.optim.swa_utils.update_bn(loader, ref)
        bn_o = [m for m in ours.modules() if isinstance(m, nn.BatchNorm1d)][0]
        bn_r = [m for m in ref.modules() if isinstance(m, nn.BatchNorm1d)][0]
        torch.testing.assert_close(bn_o.running_mean, bn_r.running_mean)
        torch.testing.assert_close(bn_o.running_var, bn_r.running_var)
        assert int(bn_o.num_batches_tracked) == int(bn_r.num_batches_tracked) == 3
        assert bn_o.momentum == 0.1 and ours.training
    update_bn(loader, nn.ReLU())  # neither parameters nor buffers: a no-op, no StopIteration


def test_update_bn_restores_submodule_modes_and_accepts_input_fn():
    model = _bn_net()
    model.eval()
    model[3].train()  # a submodule in another mode than the root survives
    loader = _loader()
    dict_loader = [{"x": x, "y": y} for x, y in loader]
    with pytest.raises(TypeError, match="input_fn"):
        update_bn(dict_loader, model)
    update_bn(dict_loader, model, input_fn=lambda b: b["x"])
    assert not model.training and not model[1].training and model[3].training
    ref = _bn_net()
    ref.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    with pytest.raises(ValueError, match="no batches"):
        update_bn([], model)
    with pytest.raises(TypeError, match="update_bn\\(loader, model"):
        update_bn(model, loader)  # arguments swapped


def test_mode_guard_restores_flags_on_error():
    model = _bn_net()
    model[1].eval()
    with pytest.raises(KeyError):
        with ModeGuard(model, False):
            assert not any(m.training for m in model.modules())
            raise KeyError("boom")
    assert model.training and not model[1].training and model[0].training


def test_iterate_inputs_forms_and_errors():
    x = torch.arange(10.0).view(5, 2)
    assert [b.shape[0] for b in iterate_inputs(x, 2)] == [2, 2, 1]
    assert torch.equal(next(iter(iterate_inputs([(x, None)], 2))), x)
    assert next(iter(iterate_inputs([[x, x]], 2))) is x
    with pytest.raises(TypeError, match="dicts.*input_fn"):
        list(iterate_inputs([{"a": x}], 2))
    with pytest.raises(TypeError, match="input_fn"):
        list(iterate_inputs([3.0], 2))
    with pytest.raises(TypeError, match="iterable"):
        list(iterate_inputs(3.0, 2))
    with pytest.raises(ValueError, match="batch dimension"):
        list(iterate_inputs(torch.tensor(1.0), 2))
    assert next(iter(iterate_inputs([{"a": x}], 2, input_fn=lambda b: (b["a"], b["a"]))))[1] is x
