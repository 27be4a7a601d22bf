"""Bayes-by-Backprop layers against independent references.

The references draw the same eps from the same Philox stream (pyfastbayes._reference.random.
philox_normal with the layer's seed, stream and step) and differentiate mu + softplus(rho) eps (or
the local / flipout formulas) with plain autograd; the fused layers must give the same outputs and
gradients (fp64 rel <= 1e-10, fp32 <= 1e-4). Then gradcheck of the fused function, estimator
agreement in expectation, flipout's lower gradient variance, and the layer API."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastbayes import ops
from pyfastbayes.vi import BayesianConv2d, BayesianLinear, kl_divergence, to_bayesian
from pyfastbayes.vi._functions import Affine, Flipout, SampledAffine


def _eps(layer, stream_offset, step, shape, dtype):
    """The float32 normal stream the kernels draw from (the native philox_normal_, which shares
    csrc/common/philox.h with them; the reference stream rounds its float64 Box-Muller once and
    differs in the last float32 bits), widened to ``dtype``: the same eps as the layer's."""
    out = torch.empty(shape, dtype=torch.float32)
    ops.philox_normal_(out, int(layer.rng[0]), layer.stream + stream_offset, step)
    return out.to(dtype)


def _signs(layer, stream_offset, step, shape, dtype):
    """flipout's sign stream, from the reference of vi_rademacher_."""
    from pyfastbayes._reference.vi import vi_rademacher_
    out = torch.empty(shape, dtype=dtype)
    rng = torch.tensor([int(layer.rng[0]), step], dtype=torch.int64)
    vi_rademacher_(out, rng, layer.stream + stream_offset)
    return out


def _reference_forward(layer, x, step):
    """The layer's output at RNG step ``step`` with plain autograd (module docstring)."""
    dt = layer.weight_mu.dtype
    sw, sb = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    conv = isinstance(layer, BayesianConv2d)
    op = (lambda x, w, b: F.conv2d(x, w, b, layer.affine.stride, layer.affine.padding)) if conv else F.linear
    if layer.estimator == "reparam":
        w = layer.weight_mu + sw * _eps(layer, 0, step, layer.weight_mu.shape, dt)
        b = layer.bias_mu + sb * _eps(layer, 1, step, layer.bias_mu.shape, dt)
        return op(x, w, b)
    if layer.estimator == "local":
        mean = op(x, layer.weight_mu, layer.bias_mu)
        var = op(x.square(), sw.square(), sb.square())
        return mean + var.sqrt() * _eps(layer, 2, step, mean.shape, dt)
    # one sign per example and channel, shared by a conv's pixels (Wen et al.; TFP's Conv2DFlipout)
    per_example = (lambda shape: tuple(shape[:2]) + (1, 1)) if conv else (lambda shape: tuple(shape))
    s_in = _signs(layer, 3, step, per_example(x.shape), dt)
    dw = sw * _eps(layer, 0, step, layer.weight_mu.shape, dt)
    pert = op(x * s_in, dw, None)
    s_out = _signs(layer, 4, step, per_example(pert.shape), dt)
    b = layer.bias_mu + sb * _eps(layer, 1, step, layer.bias_mu.shape, dt)
    return op(x, layer.weight_mu, None) + pert * s_out + (b if not conv else b.view(1, -1, 1, 1))


def _make(kind, estimator, dtype):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = BayesianLinear(5, 4, estimator=estimator, init_std=0.3), torch.randn(6, 5)
    else:
        layer, x = BayesianConv2d(2, 3, 3, padding=1, stride=2, estimator=estimator, init_std=0.3), torch.randn(4, 2, 6, 6)
    return layer.to(dtype), x.to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_and_gradients_equal_the_autograd_reference(kind, estimator, dtype):
    layer, x = _make(kind, estimator, dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for step in range(2):  # each forward advances the stream by one step
        assert int(layer.rng[1]) == step
        y = layer(x)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho], g)
        y_ref = _reference_forward(layer, x, step)
        grads_ref = torch.autograd.grad(y_ref, [x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho], g)
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, **tol)


def test_gradcheck_of_the_fused_function_at_a_fixed_counter():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bmu = torch.randn(2, dtype=torch.float64, requires_grad=True)
    brho = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rng = torch.tensor([1234, 7], dtype=torch.int64)
    fn = lambda x, mu, rho, bmu, brho: SampledAffine.apply(x, mu, rho, bmu, brho, rng, 16, 17, Affine("linear"))
    assert torch.autograd.gradcheck(fn, (x, mu, rho, bmu, brho))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradcheck_of_the_fused_flipout_function(kind):
    """Flipout's one node (signs, perturbation and bias noise regenerated in the backward) against
    finite differences at a fixed counter, for the linear and the strided convolution form."""
    torch.manual_seed(0)
    if kind == "linear":
        x, w_shape, affine = torch.randn(3, 4, dtype=torch.float64), (2, 4), Affine("linear")
    else:
        x, w_shape, affine = torch.randn(2, 2, 5, 5, dtype=torch.float64), (3, 2, 3, 3), Affine("conv2d", (2, 2), (1, 1))
    x.requires_grad_(True)
    mu = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    bmu = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)
    brho = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)
    rng = torch.tensor([99, 3], dtype=torch.int64)
    fn = lambda x, mu, rho, bmu, brho: Flipout.apply(x, mu, rho, bmu, brho, rng, 8, affine)
    assert torch.autograd.gradcheck(fn, (x, mu, rho, bmu, brho))


def test_estimators_agree_in_expectation_and_flipout_has_lower_variance():
    """Mean gradient of mu and rho over many draws: the three estimators estimate the same
    expectation (within 5 standard errors); per draw, flipout's gradient over a batch of
    independent examples varies less than plain reparameterisation's."""
    torch.manual_seed(0)
    x, target = torch.randn(64, 6), torch.randn(64, 3)
    grads = {}
    for est in ("reparam", "local", "flipout"):
        torch.manual_seed(1)
        layer = BayesianLinear(6, 3, estimator=est, init_std=0.5)
        draws = []
        for _ in range(400):
            loss = (layer(x) - target).square().mean()
            draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [layer.weight_mu, layer.weight_rho])]))
        grads[est] = torch.stack(draws)
    mean, se = {}, {}
    for est, d in grads.items():
        mean[est], se[est] = d.mean(0), d.std(0) / math.sqrt(d.shape[0])
    for est in ("local", "flipout"):
        z = (mean[est] - mean["reparam"]).abs() / torch.sqrt(se[est] ** 2 + se["reparam"] ** 2)
        assert float(z.max()) < 5, (est, float(z.max()))
    assert float(grads["flipout"].var(0).sum()) < 0.8 * float(grads["reparam"].var(0).sum())


def test_sigma_to_zero_is_the_deterministic_layer_and_warm_start():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    x = torch.randn(4, 5)
    want = net(x)
    to_bayesian(net, init_std=1e-30)
    assert isinstance(net[0], BayesianLinear) and isinstance(net[2], BayesianLinear)
    torch.testing.assert_close(net(x), want)


def test_sampling_advances_and_means_mode():
    layer = BayesianLinear(3, 2, init_std=0.5)
    x = torch.randn(4, 3)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    layer.sample_weights = False
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))


def test_bayesian_torch_state_dict_names_load():
    layer = BayesianLinear(3, 2)
    state = {"mu_weight": torch.ones(2, 3), "rho_weight": torch.full((2, 3), -4.0), "mu_bias": torch.zeros(2),
             "rho_bias": torch.full((2,), -4.0), "eps_weight": torch.zeros(2, 3), "prior_weight_mu": torch.zeros(2, 3)}
    rng = layer.rng.clone()
    layer.load_state_dict(state)  # strict, without 'rng' (bayesian-torch has none): the layer keeps its own
    assert torch.equal(layer.weight_mu.detach(), torch.ones(2, 3)) and float(layer.weight_rho[0, 0]) == -4.0
    assert torch.equal(layer.rng, rng)
    with pytest.raises(RuntimeError, match="Missing key.*rng"):  # our own names without 'rng': a missing key
        layer.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "rng"})


def test_functional_call_and_compile():
    torch.manual_seed(0)
    layer = BayesianLinear(4, 3)
    x = torch.randn(5, 4)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    buffers = {"rng": layer.rng.clone()}
    y = torch.func.functional_call(layer, (params, buffers), (x,))
    y.sum().backward()
    assert params["weight_rho"].grad is not None and int(buffers["rng"][1]) == 1
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=False)
    layer2 = BayesianLinear(4, 3)
    layer2.load_state_dict(layer.state_dict())
    torch.testing.assert_close(compiled(x), layer2(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="prior_std"):
        BayesianLinear(3, 2, prior_std=0.0)
    with pytest.raises(ValueError, match="estimator"):
        BayesianLinear(3, 2, estimator="exact")
    with pytest.raises(ValueError, match="init_std"):
        BayesianLinear(3, 2, init_std=-1.0)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        to_bayesian(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no Bayesian layer"):
        kl_divergence(nn.Linear(2, 2))
    net = to_bayesian(nn.Sequential(nn.Linear(3, 2)))
    with torch.no_grad():
        net[0].weight_rho[0, 0] = float("nan")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="weight_rho holds NaN"):
        kl_divergence(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all()
    with torch.no_grad():  # every value finite, but mu^2 overflows the float32 terms: named as an overflow
        net[0].weight_rho.fill_(-3.0)
        net[0].weight_mu[0, 0] = 3e38
    with pytest.raises(RuntimeError, match="every mu and rho is finite"):
        kl_divergence(net)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_bfloat16_weights_follow_the_float32_layer(estimator):
    """bf16 parameters, fp32 math inside the kernels: the bf16 layer's output and gradients stay
    within bf16 rounding (relative 2^-8 per operand, a few operands deep) of the fp32 layer at the
    same noise."""
    torch.manual_seed(0)
    layer = BayesianLinear(16, 8, estimator=estimator, init_std=0.2)
    half = BayesianLinear(16, 8, estimator=estimator, init_std=0.2).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    ref = BayesianLinear(16, 8, estimator=estimator, init_std=0.2)  # fp32 copy of the ROUNDED bf16 parameters
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items()})
    x = torch.randn(12, 16).to(torch.bfloat16)
    a, b = half(x), ref(x.float())
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)
    ga = torch.autograd.grad(a.float().square().sum(), [half.weight_mu, half.weight_rho])
    gb = torch.autograd.grad(b.square().sum(), [ref.weight_mu, ref.weight_rho])
    for u, v in zip(ga, gb):
        assert u.dtype == torch.bfloat16
        torch.testing.assert_close(u.float(), v, rtol=5e-2, atol=5e-2 * float(v.abs().max()))


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_nothing_weight_sized_is_saved_by_any_estimator(estimator):
    layer = BayesianLinear(64, 32, estimator=estimator)
    x = torch.randn(8, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    params = {id(p) for p in layer.parameters()}
    big = [t for t in saved if t.numel() >= 32 * 64 and id(t) not in params]
    assert not big, [tuple(t.shape) for t in big]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_flipout_keeps_no_sign_or_perturbation_tensor(kind):
    """Flipout's one node saves the input, the parameters and the RNG position only: its sign vectors
    (x-shaped and output-shaped) and the perturbation are regenerated in the backward."""
    layer, x = _make(kind, "flipout", torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    allowed = {id(p) for p in layer.parameters()} | {id(x)}
    kept = [tuple(t.shape) for t in saved if id(t) not in allowed and t.dtype != torch.int64]
    assert not kept, kept


def test_kl_divergence_reads_parametrized_parameters():
    """A parametrization on weight_mu (torch.nn.utils.parametrize moves the tensor out of the
    layer's parameter dict) leaves kl_divergence working and its value unchanged."""
    from torch.nn.utils import parametrize

    class Identity(nn.Module):
        def forward(self, t):
            return t

    torch.manual_seed(0)
    layer = BayesianLinear(3, 2)
    want = kl_divergence(layer).detach()
    parametrize.register_parametrization(layer, "weight_mu", Identity())
    torch.testing.assert_close(kl_divergence(layer).detach(), want)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("loss", ["square", "linear", "with_kl"])
def test_second_order_gradients_are_refused_not_wrong(estimator, loss):
    """The noise ops have no derivative of their own, so a gradient of a gradient through a
    Bayesian layer would silently miss terms: a backward with create_graph=True through it raises
    at once. (once_differentiable alone returned constants for a loss linear in the output, and
    under torch.autograd.grad(..., allow_unused=True) gave None for every parameter.)"""
    from pyfastbayes.vi import BayesianLinear, kl_divergence

    layer = BayesianLinear(3, 2, estimator=estimator)
    x = torch.randn(4, 3, requires_grad=True)
    out = layer(x)
    f = {"square": out.square().sum(), "linear": out.sum(), "with_kl": out.square().sum() + kl_divergence(layer)}[loss]
    with pytest.raises(RuntimeError, match="no second derivative.*sample_weights = False"):
        torch.autograd.grad(f, [x, layer.weight_rho], create_graph=True)


def _closed_form_kl(layer):
    import torch.nn.functional as F

    v = layer.prior.std ** 2
    total = 0
    for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
        s = F.softplus(rho)
        total = total + (0.5 * math.log(v) - torch.log(s) + (s * s + mu * mu) / (2 * v) - 0.5).sum()
    return total


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("carried", [True, False])
def test_second_order_through_the_kl_equals_autograd_of_the_closed_form(estimator, carried):
    """A gradient penalty on the KL term (create_graph=True): the KL's second derivatives equal plain
    autograd's of the closed form, for the KL a layer carries from its forward and for the fused
    reduction (after a forward under no_grad), rho across the float32 softplus range too."""
    from pyfastbayes.vi import BayesianLinear, kl_divergence

    torch.manual_seed(0)
    layer = BayesianLinear(3, 2, prior_std=0.5, estimator=estimator).double()
    with torch.no_grad():
        layer.weight_rho.copy_(torch.tensor([[-40.0, -3.0, 0.5], [2.0, -31.0, -1.0]]))
    ps = list(layer.parameters())
    hs = []
    for kl in (lambda: _closed_form_kl(layer), lambda: kl_divergence(layer)):
        with torch.set_grad_enabled(carried):
            layer(torch.randn(4, 3, dtype=torch.float64))
        g = torch.autograd.grad(kl(), ps, create_graph=True)
        hs.append(torch.autograd.grad(sum(gi.square().sum() for gi in g), ps))
    for want, got in zip(*hs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_a_layer_whose_outputs_get_no_gradient_gives_none(estimator):
    """A function downstream that returns None for the layer's output (and no KL taken): no
    gradients, no error (the node's backward gets no gradient for either output)."""
    from pyfastbayes.vi import BayesianLinear

    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a.detach() + b

        @staticmethod
        def backward(ctx, g):
            return None, g

    layer = BayesianLinear(4, 3, estimator=estimator)
    other = torch.randn(5, 3, requires_grad=True)
    Cut.apply(layer(torch.randn(5, 4)), other).sum().backward()
    assert other.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


def _step_grads(layer, x, f):
    """Output and (mu, rho) gradients of two forward + backward steps of f (the layer or its compiled form)."""
    outs, grads = [], []
    for _ in range(2):
        layer.zero_grad()
        out = f(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads += [p.grad.clone() for p in (layer.weight_mu, layer.weight_rho, layer.bias_rho)]
    return outs, grads, layer.rng.clone()


# with inductor, torch.compile turned the layer's rng.clone() into the buffer itself: the backward
# regenerated the noise at the advanced position (wrong d/d rho, no error; aot_eager was right)
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_inductor_compiled_layer_equals_eager(estimator):
    torch.manual_seed(0)
    layer = BayesianLinear(5, 4, init_std=0.5, estimator=estimator)
    x = torch.randn(3, 5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    want = _step_grads(layer, x, layer)
    layer.load_state_dict(state)
    got = _step_grads(layer, x, torch.compile(layer, fullgraph=True))
    for a, b in zip([*got[0], *got[1], got[2]], [*want[0], *want[1], want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_whole_elbo_step_compiles_in_one_graph():
    # kl_divergence's non-finite check read the KL on the host (.item()): fullgraph=True failed with
    # "Could not guard on data-dependent expression"; now it is skipped while compiling
    from pyfastbayes.vi import ELBO
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(4, 8, estimator="flipout"), nn.ReLU(), BayesianLinear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    elbo = ELBO(model, num_data=100)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def step(x, y):
        return elbo(model(x), y)

    def run(f):
        model.load_state_dict(state)
        model.zero_grad()
        loss = f(x, y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    want = run(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (Dynamo warned about tracing through an lru_cache)
        got = run(torch.compile(step, fullgraph=True))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_elbo_step_does_not_recompile_every_step():
    """ELBO's step counter was a Python int that Dynamo guards on: every call compiled a new graph
    and fullgraph=True failed at the recompile limit (8); now a tensor advanced in place."""
    import torch._dynamo
    from pyfastbayes.vi import ELBO
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(3, 8), nn.ReLU(), BayesianLinear(8, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    elbo = ELBO(model, 100, kl_weight=0.5)
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    step = torch.compile(lambda: elbo(model(x), y), backend="eager", fullgraph=True)
    for _ in range(12):
        opt.zero_grad()
        step().backward()
        opt.step()
    assert elbo.step == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_linear_anneal_compiles_in_one_graph_and_equals_the_schedule():
    """linear_anneal is evaluated on the ELBO's step tensor: the annealed loss equals nll + beta(step)
    KL / N with beta = min(step / 5, 1) at each of 12 steps, compiled with fullgraph=True in <= 2
    graphs (a Python callable is a graph break); dtypes stay float32; bad arguments are refused."""
    import torch._dynamo
    from pyfastbayes.vi import ELBO, kl_divergence, linear_anneal
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(3, 8), nn.ReLU(), BayesianLinear(8, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    sched = linear_anneal(5, start=0.1, end=0.9)
    elbo = ELBO(model, 100, kl_weight=sched)
    step = torch.compile(lambda: elbo(model(x), y), backend="eager", fullgraph=True)
    for k in range(12):
        loss = step()
        nll, kl = elbo.last
        beta = 0.1 + 0.8 * min(k / 5, 1.0)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.detach(), nll + beta * kl / 100, rtol=1e-6, atol=1e-7)
        assert sched(k) == pytest.approx(beta)
        torch.testing.assert_close(kl, kl_divergence(model).detach())
    assert elbo.step == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    with pytest.raises(ValueError, match="steps"):
        linear_anneal(0)
    with pytest.raises(ValueError, match="end must be a finite float >= 0"):
        linear_anneal(10, end=float("nan"))


# a checkpointed region recomputes the forward in the backward, after the position advanced: the
# gradients belonged to other noise (no error); refused now, deterministic passes still work
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = BayesianLinear(5, 4)
    x = torch.randn(3, 5, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match=r"BayesianLinear: its forward is running inside a backward pass.*"
                                           r"activation checkpointing"):
        out.sum().backward()
    layer.sample_weights = False
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    torch.testing.assert_close(layer.weight_mu.grad, torch.ones(4, 3) @ x.detach())


# twelfth-session review: a conv's flipout drew a sign per pixel, so the pixels of one image saw
# different weights and the estimator followed another objective than the model's
def test_conv_flipout_shares_one_weight_draw_across_pixels():
    torch.manual_seed(0)
    layer = BayesianConv2d(1, 1, 1, estimator="flipout", init_std=0.5)
    x = torch.ones(1, 1, 1, 2)  # two equal pixels: every weight drawn from q gives them equal outputs
    for _ in range(20):
        out = layer(x)
        assert float((out[..., 0] - out[..., 1]).abs().max()) < 1e-6


def test_a_layer_builds_under_the_meta_device_and_keeps_its_seed_through_module_type():
    """Under ``with torch.device('meta')`` the layer builds as nn.Linear does (its seed is drawn on the
    CPU); ``Module.type(torch.float64)``, which casts every buffer, leaves the int64 RNG position
    exactly as it was (a float64 cannot hold a 64-bit seed) and the layer still runs."""
    from pyfastbayes.vi import BayesianConv2d, BayesianLinear

    with torch.device("meta"):
        lin, conv = BayesianLinear(4, 3), BayesianConv2d(2, 3, 3)
    assert lin.weight_mu.is_meta and lin.rng.is_meta and conv.rng.is_meta
    layer = BayesianLinear(3, 2)
    with torch.no_grad():
        layer.rng[0] = 2**62 + 1  # not a float64
    before = layer.rng.clone()
    model = nn.Sequential(layer).type(torch.float64)
    assert layer.rng.dtype == torch.int64 and torch.equal(layer.rng, before)
    assert layer.weight_mu.dtype == torch.float64
    assert model(torch.randn(5, 3, dtype=torch.float64)).shape == (5, 2)


def test_to_bayesian_keeps_frozen_parameters_frozen():
    """A frozen weight / bias gives a frozen mu and rho; a trainable one trainable ones."""
    from pyfastbayes.vi import to_bayesian

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Conv2d(1, 1, 1))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    to_bayesian(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {"0.weight_mu": False, "0.weight_rho": False, "0.bias_mu": False, "0.bias_rho": False,
                     "2.weight_mu": True, "2.weight_rho": True, "2.bias_mu": False, "2.bias_rho": False,
                     "3.weight_mu": True, "3.weight_rho": True, "3.bias_mu": True, "3.bias_rho": True}
    model[0](torch.randn(5, 3)).sum()  # the frozen layer still samples


def test_kl_divergence_inside_torch_func_transforms():
    """torch.func.grad over a functional_call of a model at its means plus its KL equals plain
    autograd of the same loss (the KL by the closed form there; the fused op has no functorch
    rules); vmap over parameter sets gives each set's KL."""
    from pyfastbayes.vi import BayesianLinear, kl_divergence

    torch.manual_seed(0)
    m = nn.Sequential(BayesianLinear(3, 4, prior_std=0.7), nn.Tanh(), BayesianLinear(4, 2)).double()
    with torch.no_grad():
        m[0].weight_rho[0, 0] = -35.0  # log softplus taken as rho down there
    for layer in (m[0], m[2]):
        layer.sample_weights = False
    x = torch.randn(5, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    class Loss(nn.Module):  # the KL read inside the call, while functional_call's tensors are in the model
        def __init__(self, net, data_weight):
            super().__init__()
            self.net, self.data_weight = net, data_weight

        def forward(self, x):
            return self.data_weight * self.net(x).square().sum() + kl_divergence(self.net)

    def loss(p, data_weight=1.0):
        return torch.func.functional_call(Loss(m, data_weight), {f"net.{k}": v for k, v in p.items()}, (x,))

    got = torch.func.grad(loss)(params)
    m.zero_grad()
    (m(x).square().sum() + kl_divergence(m)).backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12)
    stacked = {k: torch.stack([v, v + 0.1]) for k, v in params.items()}
    kls = torch.vmap(lambda p: loss(p, 0.0))(stacked)
    with torch.no_grad():
        want = [kl_divergence(m).item()]
        for p in m.parameters():
            p.add_(0.1)
        want.append(kl_divergence(m).item())
    torch.testing.assert_close(kls, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_reseed_gives_a_deep_copy_its_own_noise():
    """A deep copy keeps the RNG position (the same noise as its original); reseed_ draws a new seed
    at step 0, repeatably from a generator; a CUDA generator or a seed in its place is refused."""
    import copy

    from pyfastbayes.vi import BayesianLinear

    layer = BayesianLinear(3, 2, init_std=0.5)
    x = torch.randn(4, 3)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    a = copy.deepcopy(layer).reseed_(torch.Generator().manual_seed(3))
    b = copy.deepcopy(layer).reseed_(torch.Generator().manual_seed(3))
    assert a.rng[1].item() == 0 and torch.equal(a.rng, b.rng) and not torch.equal(a.rng, layer.rng)
    assert not torch.allclose(a(x), layer(x))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        layer.reseed_(3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            layer.reseed_(torch.Generator(device="cuda"))
