"""pyfastbayes.vi on bad input and changed state: every public function refuses with a clear error
naming the argument, and a call that fails leaves the model, its parameters, buffers (the RNG
positions included) and the posterior's state as they were.

Each test reproduces an audit finding: to_bayesian converting part of a model before it fails,
splitting shared layers, VariationalPosterior.load_state_dict loading half a bad state, the ELBO
scrambling regression targets or counting failed calls, a posterior predicting from stale or NaN
weights, and the layers' obscure errors."""
import copy

import pytest
import torch
from torch import nn

from pyfastbayes.vi import (ELBO, BayesianConv2d, BayesianLinear, VariationalPosterior, kl_divergence,
                            to_bayesian)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


def _kinds(model):
    return [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]


def _bayes(estimator="reparam"):
    torch.manual_seed(0)
    return to_bayesian(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), init_std=0.2, estimator=estimator)


# ---- to_bayesian ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "layer '1': only zero padding"),
    (nn.Conv2d(1, 1, 2, padding="same"), "layer '1': only zero padding.*'same' with an even total"),
    (nn.Linear(0, 3), "layer '1'.*in_features"),
])
def test_to_bayesian_checks_every_layer_before_converting_any(bad, match):
    """A layer that cannot be converted after one that can: the error names it and the model is
    untouched (no half-converted model), torch's generator as it was."""
    model = nn.Sequential(nn.Linear(4, 4), bad)
    kinds, state, generator = _kinds(model), _state(model), torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        to_bayesian(model)
    assert _kinds(model) == kinds and _same_state(model, state)
    assert torch.equal(torch.get_rng_state(), generator)


def test_to_bayesian_keeps_shared_layers_shared():
    """One nn.Linear used twice becomes one BayesianLinear used twice: the weights stay tied, the KL
    counts them once, and the posterior sees one layer."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 4)
    want = model(x)
    to_bayesian(model, init_std=1e-30)
    assert isinstance(model[0], BayesianLinear) and model[0] is model[2]
    torch.testing.assert_close(model(x), want)
    single = to_bayesian(nn.Sequential(copy.deepcopy(lin)), init_std=1e-30)
    torch.testing.assert_close(kl_divergence(model), kl_divergence(single))
    post = VariationalPosterior(model)
    assert post.numel == 4 * 4 + 4 and post.model[0] is post.model[2]
    assert not any(isinstance(m, BayesianLinear) for m in post.model.modules())
    torch.testing.assert_close(post.predict(x, 2, likelihood="regression")[0], want)
    # excluded under either of its names: excluded at both places
    lin2 = nn.Linear(4, 4)
    model2 = nn.Sequential(lin2, nn.ReLU(), lin2, nn.Linear(4, 2))
    to_bayesian(model2, exclude=["2"])
    assert model2[0] is lin2 and model2[2] is lin2 and isinstance(model2[3], BayesianLinear)


def test_to_bayesian_bad_exclude_and_a_bare_layer():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="exclude must be a submodule name"):
        to_bayesian(model, exclude=0)
    with pytest.raises(TypeError, match="exclude must hold submodule names"):
        to_bayesian(model, exclude=[0])
    assert type(model[0]) is nn.Linear
    lin = nn.Linear(3, 2)  # in place cannot turn the object itself into another class
    with pytest.raises(ValueError, match="model is itself an Linear.*nn.Sequential"):
        to_bayesian(lin)
    assert not lin._modules


# ---- layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, match", [
    (lambda: BayesianLinear(0, 3), ValueError, "in_features"),
    (lambda: BayesianLinear(-1, 3), ValueError, "in_features"),
    (lambda: BayesianLinear(2.5, 3), TypeError, "in_features"),
    (lambda: BayesianLinear(3, 0), ValueError, "out_features"),
    (lambda: BayesianLinear(3, 2, init_std=True), TypeError, "init_std"),
    (lambda: BayesianConv2d(2, 2, 0), ValueError, "kernel_size"),
    (lambda: BayesianConv2d(2, 2, (3, 3, 3)), ValueError, "kernel_size"),
    (lambda: BayesianConv2d(0, 2, 3), ValueError, "in_channels"),
    (lambda: BayesianConv2d(2, 2, 3, groups=0), ValueError, "groups"),
    (lambda: BayesianConv2d(2, 2, 3, groups=1.0), TypeError, "groups"),
    (lambda: BayesianConv2d(2, 2, 3, stride=0), ValueError, "stride"),
    (lambda: BayesianConv2d(2, 2, 3, padding=-1), ValueError, "padding"),
    (lambda: BayesianConv2d(2, 2, 3, dilation=0), ValueError, "dilation"),
])
def test_layer_sizes_are_checked_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_a_failed_forward_draws_nothing(estimator):
    """A float64 input to a float32 layer: a TypeError naming x and the cast; a wrong shape: the op's
    error. Either way the RNG position is not advanced, so the next forward draws what it would have."""
    layer = BayesianLinear(4, 3, estimator=estimator)
    twin = copy.deepcopy(layer)
    x = torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"x: the inputs are torch.float64 but the Bayesian layer's parameters are torch.float32: "
                                        r"cast the data \(x.to\(torch.float32\)\) or the model"):
        layer(x.double())
    with pytest.raises(TypeError, match=r"x: the inputs are torch.int64 .*x.to\(torch.float32\)\) so"):
        layer(torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(RuntimeError):
        layer(torch.randn(5, 6))
    assert _same_state(layer, _state(twin))
    torch.testing.assert_close(layer(x), twin(x))
    assert int(layer.rng[1]) == 1
    conv = BayesianConv2d(2, 3, 3, estimator=estimator)
    with pytest.raises(TypeError, match="x: the inputs are torch.float64"):
        conv(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert int(conv.rng[1]) == 0


def test_autocast_still_mixes_dtypes():
    """Under autocast the input's dtype differs from the weights' by design: no dtype error."""
    layer = BayesianLinear(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(5, 4)).dtype == torch.bfloat16


def test_kl_names_layers_of_different_dtypes():
    model = to_bayesian(nn.Sequential(nn.Linear(4, 4).double(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"layer '0' weight_mu is torch.float64.*layer '1' weight_mu is "
                                         r"torch.float32.*model.to\(dtype\)"):
        kl_divergence(model)
    kl_divergence(model.double())


# ---- ELBO -----------------------------------------------------------------------------------------
def test_elbo_regression_targets_must_match_the_outputs():
    model = _bayes()
    model[0].sample_weights = model[2].sample_weights = False
    elbo = ELBO(model, 10, likelihood="regression")
    out = model(torch.randn(8, 4))
    for bad in (torch.randn(3, 8), torch.randn(24), torch.randn(8, 2)):  # same numel or not: refused
        with pytest.raises(ValueError, match="targets must have the outputs' shape"):
            elbo(out, bad)
    assert elbo.step == 0 and elbo.last is None
    y = torch.randn(8, 3)
    elbo(out, y)
    assert elbo.step == 1
    # the documented [N] vs [N, 1] case, both ways, pairs each target with its row
    one = out[:, :1]
    y1 = torch.randn(8)
    torch.testing.assert_close(elbo(one, y1), elbo(one, y1[:, None]))
    torch.testing.assert_close(elbo(one[:, 0], y1[:, None]), elbo(one[:, 0], y1))


def test_elbo_step_advances_only_on_success():
    model = _bayes()
    seen = []
    elbo = ELBO(model, 10, kl_weight=lambda step: seen.append(step) or 0.5)
    out, y = model(torch.randn(8, 4)), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError):
        elbo(out, y[:3])
    with torch.no_grad():
        model[0].weight_rho[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="weight_rho holds NaN"):
        elbo(out, y)
    assert elbo.step == 0
    with torch.no_grad():
        model[0].weight_rho[0, 0] = 0.0
    elbo(out, y)
    elbo(out, y)
    assert elbo.step == 2 and seen == [0, 0, 0, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_weight=float("inf")), "kl_weight"),
    (dict(kl_weight=True), "kl_weight"),
    (dict(likelihood="regression", sigma=float("inf")), "sigma"),
])
def test_elbo_refuses_non_finite_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ELBO(_bayes(), 10, **kwargs)


def test_elbo_refuses_a_non_finite_annealed_weight():
    model = _bayes()
    elbo = ELBO(model, 10, kl_weight=lambda step: float("nan"))
    with pytest.raises(ValueError, match=r"kl_weight\(0\) must return a finite float"):
        elbo(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
    assert elbo.step == 0
    with pytest.raises(TypeError, match="outputs must be a tensor"):
        ELBO(model, 10)((torch.zeros(2, 3),), torch.zeros(2, dtype=torch.long))


# ---- VariationalPosterior -------------------------------------------------------------------------
def test_posterior_refuses_a_model_changed_since_construction():
    model = _bayes()
    post = VariationalPosterior(model)
    x = torch.randn(6, 4)
    model[2] = BayesianLinear(5, 7)  # another output size: the twin would still predict 3 outputs
    for call in (lambda: post.predict(x, 2), lambda: post.sample(1), post.mean):
        with pytest.raises(RuntimeError, match="model changed since the VariationalPosterior was built.*build a new"):
            call()
    model[2] = nn.Linear(5, 3)  # no longer Bayesian
    with pytest.raises(RuntimeError, match="model changed"):
        post.mean()
    # a replacement of the same shape is read where it is now (the twin follows the model)
    model[2] = BayesianLinear(5, 3, init_std=1e-30)
    with torch.no_grad():
        model[2].weight_mu.fill_(0.25)
    assert torch.equal(post.sample(1)[0, -18:-3], torch.full((15,), 0.25))


def test_posterior_refuses_nan_rho_and_a_bad_generator():
    model = _bayes()
    post = VariationalPosterior(model)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        post.sample(2, generator=5)
    with torch.no_grad():
        model[2].bias_rho[1] = float("nan")
    state = _state(model)
    with pytest.raises(RuntimeError, match="layer '2': bias_rho holds NaN"):
        post.sample(2)
    with pytest.raises(RuntimeError, match="layer '2': bias_rho holds NaN"):
        post.predict(torch.randn(3, 4), 2)
    assert all(torch.equal(v, state[k]) or v.isnan().any() for k, v in model.state_dict().items())


def test_posterior_of_a_bare_bayesian_layer():
    """A model that is itself a Bayesian layer: its twin is the plain layer (not a Bayesian layer
    with a plain child named '')."""
    layer = BayesianLinear(3, 2, init_std=1e-30)
    post = VariationalPosterior(layer)
    assert type(post.model) is nn.Linear and post.numel == 8
    x = torch.randn(4, 3)
    layer.sample_weights = False
    torch.testing.assert_close(post.predict(x, 2, likelihood="regression")[0], layer(x))


@pytest.mark.parametrize("corrupt", ["shape", "extra", "missing", "nan_rho", "rng_dtype", "not_dict"])
def test_posterior_load_state_dict_checks_everything_first(corrupt):
    post = VariationalPosterior(_bayes())
    state = copy.deepcopy(post.state_dict())
    target = _bayes()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    other = VariationalPosterior(target)
    before = _state(target)
    m = state["model"]
    if corrupt == "shape":
        m["2.weight_mu"] = torch.zeros(6, 5)
    elif corrupt == "extra":
        m["extra"] = torch.zeros(1)
    elif corrupt == "missing":
        del m["2.bias_rho"]
    elif corrupt == "nan_rho":
        m["0.weight_rho"][0, 0] = float("nan")
    elif corrupt == "rng_dtype":
        m["2.rng"] = m["2.rng"].double()
    else:
        state["model"] = list(m.items())
    with pytest.raises((ValueError, TypeError)) as info:
        other.load_state_dict(state)
    assert {"shape": "2.weight_mu", "extra": "extra", "missing": "2.bias_rho", "nan_rho": "0.weight_rho",
            "rng_dtype": "2.rng", "not_dict": "state_dict\\['model'\\]"}[corrupt].replace("\\", "") in str(info.value)
    assert _same_state(target, before)


def test_elbo_num_data_is_the_one_count_check():
    """num_data: numpy integers are taken (np.int64 was refused), a float or bool is a TypeError, 0 a ValueError."""
    import numpy as np

    assert ELBO(_bayes(), np.int64(100)).num_data == 100 and type(ELBO(_bayes(), np.int64(100)).num_data) is int
    for bad, exc in ((100.0, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(exc, match=r"num_data \(the training set size\) must be an int"):
            ELBO(_bayes(), bad)


# under autocast the forward worked and the backward failed ("expected m1 and m2 to have the same
# dtype"; for conv, oneDNN's "could not create a primitive descriptor")
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_backward_gives_the_fp32_gradients(kind, estimator):
    torch.manual_seed(0)
    layer = (BayesianLinear(8, 4, estimator=estimator, init_std=0.3) if kind == "linear" else
             BayesianConv2d(2, 3, 3, estimator=estimator, init_std=0.3))
    x = torch.randn(5, 8) if kind == "linear" else torch.randn(2, 2, 6, 6)
    x.requires_grad_(True)
    start = layer.rng.clone()
    grads = []
    for autocast in (False, True):
        layer.zero_grad()
        x.grad = None
        layer.rng.copy_(start)  # the same noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().square().sum().backward()
        grads.append([x.grad, layer.weight_mu.grad, layer.weight_rho.grad, layer.bias_mu.grad])
    for want, got in zip(*grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


# exclude=['backbone'] (a container) excluded nothing: backbone.0 was converted; padding='valid' /
# an even 'same' were refused as non-numeric
def test_to_bayesian_exclude_covers_a_subtree_and_string_paddings_convert():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("backbone", nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU()))
    m.add_module("head", nn.Sequential(nn.Conv2d(2, 2, 3, padding="valid", dilation=2), nn.Flatten(),
                                        nn.LazyLinear(3)))
    x = torch.randn(2, 1, 8, 8)
    want = m(x)
    to_bayesian(m, exclude=["backbone"])
    assert type(m.backbone[0]) is nn.Conv2d and type(m.head[0]).__name__ == "BayesianConv2d"
    with torch.no_grad():
        bayes = copy.deepcopy(m)
        for layer in bayes.modules():
            if hasattr(layer, "sample_weights"):
                layer.sample_weights = False
        torch.testing.assert_close(bayes(x), want)  # the same padding: the means give the same outputs
    m2 = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten())
    want = m2(x)
    to_bayesian(m2)[0].sample_weights = False
    torch.testing.assert_close(m2(x), want)


def test_elbo_state_keeps_the_annealing_step_and_layers_name_a_non_tensor_input():
    model = _bayes()
    elbo = ELBO(model, 10, kl_weight=lambda step: min(1.0, step / 4))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for _ in range(3):
        elbo(model(x), y)
    resumed = ELBO(model, 10, kl_weight=lambda step: min(1.0, step / 4))
    resumed.load_state_dict(elbo.state_dict())  # the step was not saved: the schedule restarted at 0
    assert resumed.step == 3
    old = {k: v for k, v in elbo.state_dict().items() if not k.endswith("_extra_state")}  # saved before the step
    resumed.load_state_dict(old)  # strict: loads, the step as it was
    assert resumed.step == 3
    with pytest.raises(TypeError, match=r"BayesianLinear: the input must be a torch.Tensor, got list"):
        model[0]([1.0, 2.0, 3.0, 4.0])


def test_reliability_diagram_of_probabilities_that_require_grad():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyfastbayes.calibration import reliability_diagram

    p = nn.Linear(3, 4)(torch.randn(300, 3)).softmax(-1)  # "Can't call numpy() on Tensor that requires grad"
    reliability_diagram(p, torch.randint(0, 4, (300,)))


# twelfth-session review: the ELBO's classification NLL averaged over the positions of [N, C, H, W]
# outputs while regression summed over each point's outputs: the KL / num_data was weighed H * W
# times too heavily; and BayesianConv2d failed in backward on an unbatched [C, H, W] input
def test_elbo_classification_sums_over_positions():
    from pyfastbayes.vi import ELBO, BayesianConv2d
    torch.manual_seed(0)
    layer = BayesianConv2d(2, 3, 1)
    elbo = ELBO(layer, num_data=100)
    x, y = torch.randn(4, 2, 5, 6), torch.randint(0, 3, (4, 5, 6))
    out = layer(x)
    loss = elbo(out, y)
    nll = torch.nn.functional.cross_entropy(out, y, reduction="sum") / 4
    torch.testing.assert_close(elbo.last[0], nll.detach())
    torch.testing.assert_close(loss.detach(), nll.detach() + elbo.last[1] / 100)


def test_bayesian_conv_takes_an_unbatched_image():
    from pyfastbayes.vi import BayesianConv2d
    torch.manual_seed(0)
    layer = BayesianConv2d(3, 4, 3)
    x = torch.randn(3, 8, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.weight_rho.grad is not None


def test_to_bayesian_refuses_tied_weights_and_hooks():
    from pyfastbayes.vi import to_bayesian
    torch.manual_seed(0)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.dec = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, i):
            return self.dec(self.emb(i))
    m = Tied()
    with pytest.raises(ValueError, match="layer 'dec'.*also held by another module"):
        to_bayesian(m)
    assert m.dec.weight is m.emb.weight  # unchanged
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    seq[0].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="layer '0' has forward hooks"):
        to_bayesian(seq)
    to_bayesian(seq, exclude=["0"])


def test_to_bayesian_names_the_subclassed_layers_it_keeps():
    # a subclass of nn.Linear was silently left deterministic next to converted layers
    import warnings
    from pyfastbayes.vi import BayesianLinear, to_bayesian

    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = torch.nn.Sequential(MyLinear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"left \['0'\] deterministic.*MyLinear"):
        to_bayesian(model)
    assert type(model[0]) is MyLinear and isinstance(model[2], BayesianLinear)
    with pytest.raises(ValueError, match=r"\['0'\] are subclasses of them"):  # nothing else to convert
        to_bayesian(torch.nn.Sequential(MyLinear(3, 2)))
    # excluded ones, and MultiheadAttention's out_proj (never called: not a layer to convert), say nothing
    model = torch.nn.Sequential(MyLinear(3, 4), torch.nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_bayesian(model, exclude=["0"])

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = torch.nn.MultiheadAttention(4, 2, batch_first=True), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_bayesian(Attn())


def test_torch_func_transforms_over_sampling_layers_are_explained():
    from pyfastbayes.vi import BayesianLinear
    torch.manual_seed(0)
    layer = BayesianLinear(3, 2)
    x = torch.randn(4, 3)
    params = dict(layer.named_parameters())
    f = lambda p: torch.func.functional_call(layer, p, (x,)).sum()
    with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported"):
        torch.func.grad(f)(params)
    assert int(layer.rng[1]) == 0  # the refused call drew nothing
    layer.sample_weights = False
    g = torch.func.grad(f)(params)  # deterministic: fine
    assert g["weight_mu"].shape == (2, 3)
    layer.sample_weights = True
    f(params).backward()  # functional_call alone (no transform) works
