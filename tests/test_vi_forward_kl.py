"""A Bayesian layer's KL carried by its forward (``BayesianLayer.forward_kl``, made by
ops.vi_weight_kl in the pass that draws the weights; its gradient added by ops.vi_weight_kl_backward_
in the pass that forms d/d rho), which kl_divergence uses instead of its own reduction.

Against an independent reference: the closed form of KL(N(mu, softplus(rho)^2) || N(0, s^2)) in
float64 with plain autograd, and the layers' plain-autograd forward of tests/test_vi_layers.py (same
eps): the value and every gradient (fp64 rel <= 1e-10), for each estimator, Linear and Conv2d, with
and without a bias; either output backpropagated alone, in any order, twice; parameters that do not
need a gradient (the unfused path); a parameter changed in place (stale: the fused reduction, or an
error from a backward that would use old values); no KL without grad mode; scale-mixture priors;
deepcopy and pickle of a model that carries one."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastbayes.vi import BayesianConv2d, BayesianLinear, ScaleMixturePrior, kl_divergence
from test_vi_layers import _reference_forward

ESTIMATORS = ["reparam", "local", "flipout"]
PRIOR_STD = 0.8


def _make(kind, estimator, bias=True, dtype=torch.float64):
    torch.manual_seed(3)
    if kind == "linear":
        layer = BayesianLinear(5, 4, bias=bias, prior_std=PRIOR_STD, estimator=estimator, init_std=0.3)
        x = torch.randn(6, 5)
    else:
        layer = BayesianConv2d(2, 3, 3, padding=1, stride=2, bias=bias, prior_std=PRIOR_STD, estimator=estimator,
                               init_std=0.3)
        x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():  # sigma spread over orders of magnitude, one weight past the softplus threshold
        layer.weight_rho.add_(torch.randn_like(layer.weight_rho))
        layer.weight_rho.view(-1)[0] = 21.0
    return layer.to(dtype), x.to(dtype).requires_grad_(True)


def _kl_reference(layer) -> torch.Tensor:
    """The closed form, float64, plain autograd."""
    total = 0.0
    for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
        if mu is None:
            continue
        sigma = F.softplus(rho)
        total = total + (math.log(PRIOR_STD) - torch.log(sigma) + (sigma ** 2 + mu ** 2) / (2 * PRIOR_STD ** 2) - 0.5).sum()
    return total


def _params(layer, x):
    return [x] + [p for p in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho) if p is not None]


def _reference_grads(layer, x, step, G, c):
    """(output, KL, grads of <out, G>, grads of c KL) from the plain-autograd reference."""
    bias = layer.bias_mu is not None
    if not bias:  # the reference forward reads a bias: a zero one with sigma 0 adds nothing
        layer.bias_mu = nn.Parameter(torch.zeros(layer.weight_mu.shape[0], dtype=x.dtype), requires_grad=False)
        layer.bias_rho = nn.Parameter(torch.full_like(layer.bias_mu, -1e4), requires_grad=False)
    try:
        y = _reference_forward(layer, x, step)
    finally:
        if not bias:
            del layer.bias_mu, layer.bias_rho
            layer.register_parameter("bias_mu", None)
            layer.register_parameter("bias_rho", None)
    kl = _kl_reference(layer)
    ps = _params(layer, x)
    data = torch.autograd.grad((y * G).sum(), ps, allow_unused=True)
    klg = torch.autograd.grad(c * kl, ps, allow_unused=True)
    return y, kl, data, klg


def _close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, (what, i)
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}, input {i}: {m}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_carried_kl_and_gradients_equal_the_reference(kind, estimator, bias):
    layer, x = _make(kind, estimator, bias)
    step = int(layer.rng[1])
    y = layer(x)
    kl = kl_divergence(layer)
    assert "_KL" not in type(kl.grad_fn).__name__  # the layer's own node, not the reduction's
    G, c = torch.randn_like(y), 0.37
    y_ref, kl_ref, data_ref, kl_grads_ref = _reference_grads(layer, x, step, G, c)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-10, atol=0)
    got = torch.autograd.grad((y * G).sum() + c * kl, _params(layer, x))
    want = [a + b if b is not None else a for a, b in zip(data_ref, kl_grads_ref)]
    _close(got, want, f"{kind} {estimator} bias={bias}")


@pytest.mark.parametrize("order", ["together", "output-first", "kl-first", "kl-twice-then-output-twice"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_either_output_backpropagates_alone_in_any_order(estimator, order):
    """The node's two outputs (the layer's output and its KL) backpropagated together, or one at a
    time in either order (the saved input kept for the output's later backward, the parameters
    for the KL's), or the KL twice and then the output twice (after a backward of the KL alone the
    output's graph stays usable, as with retain_graph): each backward gives its own gradients."""
    layer, x = _make("linear", estimator)
    step = int(layer.rng[1])
    y = layer(x)
    kl = kl_divergence(layer)
    G, c = torch.randn_like(y), 1.7
    _, _, data_ref, kl_ref = _reference_grads(layer, x, step, G, c)
    ps = _params(layer, x)
    data = lambda: torch.autograd.grad((y * G).sum(), ps)  # noqa: E731
    klg = lambda: torch.autograd.grad(c * kl, ps, allow_unused=True)  # noqa: E731
    if order == "together":
        _close(torch.autograd.grad((y * G).sum() + c * kl, ps), [a + b if b is not None else a
                                                                  for a, b in zip(data_ref, kl_ref)], order)
    elif order == "output-first":
        _close(data(), data_ref, order)
        _close(klg(), kl_ref, order)
    elif order == "kl-first":
        _close(klg(), kl_ref, order)
        _close(data(), data_ref, order)
    else:
        _close(klg(), kl_ref, order)
        _close(klg(), kl_ref, order)
        _close(data(), data_ref, order)
        if estimator != "local":  # (local: LocalNoise, a node of its own, frees its saved variance)
            _close(data(), data_ref, order)


@pytest.mark.parametrize("frozen", ["weight_rho", "weight_mu", "bias_mu", "bias_rho", "x"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_parameters_without_a_gradient_take_the_unfused_path(estimator, frozen):
    layer, x = _make("linear", estimator)
    if frozen == "x":
        x.requires_grad_(False)
    else:
        getattr(layer, frozen).requires_grad_(False)
    step = int(layer.rng[1])
    y = layer(x)
    G, c = torch.randn_like(y), 0.9
    ps = [p for p in _params(layer, x) if p.requires_grad]
    got = torch.autograd.grad((y * G).sum() + c * kl_divergence(layer), ps)
    y_ref = _reference_forward(layer, x, step)
    want = torch.autograd.grad((y_ref * G).sum() + c * _kl_reference(layer), ps)
    _close(got, want, f"{estimator} frozen {frozen}")


def test_a_parameter_changed_in_place_makes_the_carried_kl_stale():
    """After an optimizer-like in-place update the carried KL no longer describes the parameters:
    kl_divergence computes the fused reduction of the new values; a backward through a carried KL
    taken before the update refuses, as autograd refuses a modified saved tensor."""
    layer, x = _make("linear", "flipout")
    y = layer(x)
    with torch.no_grad():
        layer.weight_mu.add_(0.25)
    new = kl_divergence(layer)
    assert "_KL" in type(new.grad_fn).__name__
    torch.testing.assert_close(new, _kl_reference(layer), rtol=1e-10, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    layer(x)
    old = kl_divergence(layer)
    assert "_KL" not in type(old.grad_fn).__name__
    with torch.no_grad():
        layer.weight_rho.mul_(1.01)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        old.backward()


@pytest.mark.parametrize("change", ["prior", "tensor", "storage", "requires_grad", "data"])
def test_other_parameters_prior_or_storage_make_it_stale(change):
    """Any change the versions do not show: another prior std, another tensor, new storage
    (``model.double()`` or ``p.data = ...``), requires_grad switched: the reduction's KL instead."""
    layer, x = _make("linear", "reparam", dtype=torch.float32)
    layer(x.float())
    if change == "prior":
        layer.prior.std = 2.0
    elif change == "tensor":
        layer.weight_rho = nn.Parameter(layer.weight_rho.detach().clone())
    elif change == "storage":
        layer.double()
    elif change == "requires_grad":
        layer.weight_rho.requires_grad_(False)
    else:
        layer.weight_mu.data = layer.weight_mu.data + 1
    kl = kl_divergence(layer)
    assert "_KL" in type(kl.grad_fn).__name__
    assert kl.dtype == (torch.float64 if change == "storage" else torch.float32)


def test_the_carried_kl_is_taken_once_and_released_by_backward_or_the_next_forward():
    """kl_divergence takes a layer's carried KL once (a second call reduces, same value); the
    forward's backward drops an untaken one, and so does the layer's next forward (any grad mode):
    no graph is kept past its use."""
    from pyfastbayes.vi.layers import _FORWARD_KL

    layer, x = _make("linear", "flipout")
    y = layer(x)
    first, second = kl_divergence(layer), kl_divergence(layer)
    assert "_KL" not in type(first.grad_fn).__name__ and "_KL" in type(second.grad_fn).__name__
    torch.testing.assert_close(first, second, rtol=1e-12, atol=0)
    y = layer(x)
    assert layer in _FORWARD_KL
    y.sum().backward()
    assert layer not in _FORWARD_KL
    layer(x)
    assert layer in _FORWARD_KL
    with torch.no_grad():
        layer(x)
    assert layer not in _FORWARD_KL
    layer(x)
    layer.sample_weights = False
    layer(x)
    assert layer not in _FORWARD_KL


def test_repeated_output_backward_after_the_kl_alone():
    """The KL backpropagated first, then rows of the output one at a time with retain_graph."""
    layer, x = _make("linear", "reparam")
    y = layer(x)
    kl_divergence(layer).backward()
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(3)]
    y_ref = _reference_forward(layer, x, int(layer.rng[1]) - 1)
    for i, got in enumerate(rows):
        torch.testing.assert_close(got, torch.autograd.grad(y_ref[:, i].sum(), x, retain_graph=True)[0],
                                   rtol=1e-10, atol=1e-12)


def test_no_kl_is_carried_without_grad_mode_or_a_closed_form():
    from pyfastbayes.vi.layers import _FORWARD_KL

    layer, x = _make("linear", "reparam")
    with torch.no_grad():
        layer(x)
    assert layer not in _FORWARD_KL
    layer(x)
    with torch.no_grad():
        assert not kl_divergence(layer).requires_grad
    mixture = BayesianLinear(5, 4, prior=ScaleMixturePrior()).double()
    mixture(x)
    assert mixture not in _FORWARD_KL


def test_a_model_carrying_kls_deep_copies_and_pickles():
    """The carried KL lives outside the module (a tensor with a graph in a module attribute would
    break copy.deepcopy and pickling); a copy carries none until its own forward."""
    model = nn.Sequential(BayesianLinear(5, 8, estimator="flipout"), nn.ReLU(), BayesianLinear(8, 2)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    model(x)
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    assert all(m.take_forward_kl() is None for m in clone if isinstance(m, BayesianLinear))
    torch.testing.assert_close(kl_divergence(clone), kl_divergence(model), rtol=1e-12, atol=0)


def test_a_model_sums_carried_and_reduced_kls():
    """One layer carries its KL (it ran with grad mode), the other's comes from the reduction (its
    forward ran under no_grad): the sum and its gradients equal the reference's."""
    from pyfastbayes.vi.layers import _FORWARD_KL

    torch.manual_seed(5)
    a, b = BayesianLinear(4, 6, prior_std=PRIOR_STD).double(), BayesianLinear(6, 2, prior_std=PRIOR_STD).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    h = a(x)
    with torch.no_grad():
        b(h)
    model = nn.Sequential(a, b)
    assert a in _FORWARD_KL and b not in _FORWARD_KL
    ps = list(model.parameters())
    got = torch.autograd.grad(kl_divergence(model), ps)
    want = torch.autograd.grad(_kl_reference(a) + _kl_reference(b), ps)
    _close(got, want, "mixed")
