"""Review findings on the posterior interface (twelfth session), each a test that failed before
its fix: MultiSWAG's equal weighting (its fixed split gave run 0 every sample(1) and unequal
weights in predict), SWAG.log_prob's gradient (it was computed under no_grad), outputs whose class
dimension is ambiguous, tensor bn_loaders whose last chunk was a lone remainder, one-shot
bn_loaders, a bn_loader of another dtype, and argument checks of SWAG / MultiSWAG."""
import numpy as np
import pytest
import torch
from torch import nn

from pyfastbayes.nn import update_bn
from pyfastbayes.posteriors import SWAG, MultiSWAG


def _swag(seed, spread=1e-4, n=3, model=None):
    torch.manual_seed(seed)
    m = model if model is not None else nn.Linear(2, 3)
    s = SWAG(m, max_rank=2)
    for _ in range(n):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(spread * torch.randn_like(p))
        s.collect()
    return s


def _mixture(M=4):
    return MultiSWAG([_swag(i) for i in range(M)])


@pytest.mark.parametrize("n", [6, 7, 30])
def test_multiswag_predict_weighs_every_run_equally(n):
    ms = _mixture()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    equal = torch.stack([s.predict_mean(x) for s in ms.posteriors]).mean(0)  # each run ~ a point mass
    got = ms.predict(x, n_samples=n, generator=torch.Generator().manual_seed(0))
    assert (got - equal).abs().max() < 1e-3


def test_multiswag_regression_variance_is_the_equal_mixture_s():
    ms = _mixture(3)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    outs = torch.stack([s.predict_mean(x, likelihood="regression")[0] for s in ms.posteriors])  # [M, N, C]
    mean, var = ms.predict(x, n_samples=5, likelihood="regression", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean, outs.mean(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(var, outs.var(0, unbiased=False), atol=1e-3, rtol=0)


def _component(ms, theta):
    means = torch.stack([s.mean for s in ms.posteriors])
    return int((theta - means).norm(dim=1).argmin())


def test_multiswag_sample_one_comes_from_every_run():
    ms = _mixture()
    g = torch.Generator().manual_seed(0)
    counts = np.bincount([_component(ms, ms.sample(1, generator=g)[0]) for _ in range(200)], minlength=4)
    assert counts.min() >= 25, counts  # uniform: 50 each; the fixed split gave [200, 0, 0, 0]


def test_multiswag_iter_samples_is_stratified_for_large_models(monkeypatch):
    import pyfastbayes.posteriors.base as base
    monkeypatch.setattr(base, "_DRAW_BYTES", 8)  # one draw per sample() call, as for a model of > 33 M weights
    ms = _mixture(3)
    counts = np.bincount([_component(ms, t) for t in ms.iter_samples(30, generator=torch.Generator().manual_seed(0))],
                         minlength=3)
    assert counts.tolist() == [10, 10, 10]


def test_multiswag_sample_rows_are_shuffled():
    ms = _mixture()
    which = [_component(ms, t) for t in ms.sample(40, generator=torch.Generator().manual_seed(0))]
    assert np.bincount(which, minlength=4).tolist() == [10, 10, 10, 10]
    assert which != sorted(which)


def test_swag_log_prob_is_differentiable():
    s = _swag(0, spread=0.1, n=5)
    s.model.double()
    theta = s.sample(3).double().requires_grad_()
    lp = s.log_prob(theta)
    g, = torch.autograd.grad(lp.sum(), theta)
    var = (s.sq_mean.double() - s.mean.double() ** 2).clamp_min(s.var_clamp) * 0.5
    D = s.D[:s.rank].double()
    cov = torch.diag(var) + 0.5 / (s.rank - 1) * D.T @ D
    ref = torch.distributions.MultivariateNormal(s.mean.double(), cov)
    th = theta.detach().clone().requires_grad_()
    g_ref, = torch.autograd.grad(ref.log_prob(th).sum(), th)
    torch.testing.assert_close(lp.detach(), ref.log_prob(th).detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_log_prob_of_zero_parameters():
    m = nn.Linear(0, 0, bias=True)
    m.weight.requires_grad_(False)
    s = SWAG(m, max_rank=0)
    s.collect()
    assert s.log_prob(torch.zeros(0), cov="diag").item() == 0.0


def test_classification_outputs_with_an_ambiguous_class_dimension_are_refused():
    conv = nn.Conv2d(1, 4, 1)
    s = _swag(0, spread=0.1, model=conv)
    x = torch.randn(2, 1, 5, 6)
    with pytest.raises(ValueError, match="output_fn=lambda out: out.movedim"):
        s.predict(x, n_samples=2)
    probs = s.predict(x, n_samples=2, output_fn=lambda out: out.movedim(1, -1).flatten(0, -2))
    assert probs.shape == (60, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(60))


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_tensor_bn_loader_has_no_lone_remainder_chunk():
    model = _bn_model()
    X = torch.randn(1030, 8) * 3 + 1
    update_bn(X, model, batch_size=1024)  # chunks of 515 + 515, not 1024 + 6
    h = model[0](X).detach()
    torch.testing.assert_close(model[1].running_mean, h.mean(0), atol=1e-5, rtol=0)
    update_bn(X[:1025], model, batch_size=1024)  # 1024 + 1 crashed BatchNorm in train mode


def test_one_shot_bn_loader_is_refused_up_front():
    model = _bn_model()
    s = _swag(0, spread=0.1, model=model)
    X = torch.randn(64, 8)
    with pytest.raises(TypeError, match="bn_loader is a one-shot iterator"):
        s.predict(X, n_samples=2, bn_loader=iter([X[:32], X[32:]]))
    s.predict(X, n_samples=1, bn_loader=iter([X[:32], X[32:]]))  # read once: fine


def test_bn_loader_of_another_dtype_is_named():
    model = _bn_model()
    s = _swag(0, spread=0.1, model=model)
    X = torch.randn(64, 8)
    with pytest.raises(TypeError, match="^bn_loader: the inputs are torch.float64"):
        s.predict(X, n_samples=2, bn_loader=X.double())
    with pytest.raises(TypeError, match="^loader: the inputs are torch.float64"):
        update_bn(X.double(), model)


def test_input_fn_failing_on_a_tensor_chunk_says_why():
    s = _swag(0, spread=0.1)
    with pytest.raises(TypeError, match="input_fn failed on a \\(4, 2\\) chunk of the tensor x"):
        s.predict(torch.randn(4, 2), n_samples=2, input_fn=lambda b: b["x"])


def test_swag_argument_checks():
    m = nn.Linear(2, 3)
    assert SWAG(m, max_rank=np.int64(4)).max_rank == 4
    with pytest.raises(ValueError, match="max_rank must be an int >= 0"):
        SWAG(m, max_rank=-1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="store_device=0 is not a usable device"):
            SWAG(m, store_device=0)
    s = _swag(0, spread=0.1)
    with pytest.raises(ValueError, match="scale must be"):
        s.iter_samples(3, scale=-1)  # before the first draw is asked for
    with pytest.raises(ValueError, match="^scale must be"):
        _mixture(2).sample(2, scale=-1)  # the caller's argument, not posteriors[0]'s


def test_predict_on_an_empty_tensor_gives_no_rows():
    # an empty test shard on one rank (e.g. of a sharded SWAG, whose predict is collective): the
    # rank must take part and return [0, C], not raise while the others wait in the all-gather
    s = _swag(0, spread=0.1)
    assert s.predict(torch.randn(0, 2), n_samples=2).shape == (0, 3)
    mean, var = s.predict(torch.randn(0, 2), n_samples=2, likelihood="regression")
    assert mean.shape == var.shape == (0, 3)
