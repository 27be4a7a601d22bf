"""pyfastbayes.posteriors: the one Posterior interface and model-averaging loop, SampleBuffer, and the
defects of issue 8 that live in the shared code (item numbers in the comments)."""
import copy
import inspect
import math

import pytest
import torch
from torch import nn

from pyfastbayes import data
from pyfastbayes.posteriors import SWA, SWAG, MultiSWAG, Posterior, SampleBuffer

COMMON = ["likelihood", "bn_loader", "batch_size", "progress", "generator", "input_fn", "output_fn"]


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _jiggle(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _fed(post, collects):
    """``post`` after ``collects`` collects of its model, jiggled before each."""
    for _ in range(collects):
        _jiggle(post.model)
        post.collect()
    return post


def _buffer(model, cap, collects):
    return _fed(SampleBuffer(model, cap), collects)


def _swag(model, collects=4):
    return _fed(SWAG(model, max_rank=3), collects)


def _manual_bma(model, draws, x, link=lambda o: o.softmax(-1)):
    """Each flat draw written into a deep copy in eval mode, outputs through ``link``, averaged."""
    ref = copy.deepcopy(model).eval()
    outs = []
    for th in draws:
        torch.nn.utils.vector_to_parameters(th.to(torch.float32), [p for p in ref.parameters() if p.requires_grad])
        outs.append(link(ref(x)).detach())
    return torch.stack(outs).mean(0)


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SampleBuffer, SWA, SWAG, MultiSWAG])
def test_every_posterior_has_the_same_interface(cls):
    assert issubclass(cls, Posterior)
    pred = inspect.signature(cls.predict).parameters
    names = list(pred)
    assert names[:3] == ["self", "x", "n_samples"]
    assert all(pred[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names[3:])  # after n_samples: keywords
    assert set(COMMON) <= set(names[3:])
    samp = inspect.signature(cls.sample).parameters
    assert list(samp)[:2] == ["self", "n"] and samp["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    samp_ = inspect.signature(cls.sample_).parameters
    assert list(samp_)[:2] == ["self", "model"] and samp_["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        Posterior(_mlp())  # abstract


def test_sample_buffer_sample_and_predict_with_n_samples():
    torch.manual_seed(0)
    model = _mlp()
    buf = _buffer(model, 4, 6)
    stored = buf.stored()
    th = buf.sample(50, generator=torch.Generator().manual_seed(3))
    assert th.shape == (50, buf.numel)
    assert all(any(torch.equal(t, s) for s in stored) for t in th)  # every draw is a stored one
    assert len({tuple(t.tolist()) for t in th}) == 4  # and all four appear among 50 picks
    x = torch.randn(6, 5)
    p = buf.predict(x, 7, generator=torch.Generator().manual_seed(4))
    again = buf.sample(7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(p, _manual_bma(model, again, x))
    m2 = buf.sample_(copy.deepcopy(model), generator=torch.Generator().manual_seed(5))
    first = buf.sample(1, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(buf.layout.flatten(m2), first)


def test_swa_and_sample_buffer_average_the_same_way():
    """Peer check of the shared loop: a SampleBuffer holding the SWA mean predicts what SWA does."""
    torch.manual_seed(0)
    model = _mlp()
    swa = _fed(SWA(model), 3)
    swa.load_mean_()
    buf = SampleBuffer(model, 1)
    buf.collect()
    x = torch.randn(9, 5)
    for lik in ("classification", "regression"):
        a, b = swa.predict(x, likelihood=lik), buf.predict(x, likelihood=lik)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v)
    assert torch.equal(swa.sample(2), swa.mean.expand(2, -1))


# ---------------------------------------------------------------------------------------------
# item 1: SampleBuffer state into a larger / smaller buffer after the ring wrapped
# ---------------------------------------------------------------------------------------------
def test_sample_buffer_load_state_after_wrap_keeps_exactly_the_saved_draws():
    """Item 1: 5 collects into a ring of 3, loaded into a buffer of 5: 3 draws, no garbage rows."""
    torch.manual_seed(0)
    model = _mlp()
    b = SampleBuffer(model, 3)
    traj = []
    for _ in range(5):
        _jiggle(model)
        b.collect()
        traj.append(b.layout.flatten())
    newest = torch.stack(traj[-3:])
    assert torch.equal(b.stored(), newest)  # oldest first
    b2 = SampleBuffer(model, 5)
    b2.load_state_dict(b.state_dict())
    assert len(b2) == 3 and b2.count == 5 and torch.equal(b2.stored(), newest)
    x = torch.randn(4, 5)
    p2 = b2.predict(x)
    assert torch.isfinite(p2).all()
    torch.testing.assert_close(p2, _manual_bma(model, newest, x))
    _jiggle(model)
    b2.collect()  # the next draw lands after the loaded ones
    assert torch.equal(b2.stored(), torch.cat([newest, b2.layout.flatten()[None]]))
    small = SampleBuffer(model, 2)  # smaller: keeps the newest
    small.load_state_dict(b.state_dict())
    assert len(small) == 2 and torch.equal(small.stored(), newest[1:])
    assert torch.equal(small.params_of(0)["2.bias"], newest[1, -3:])  # index 0 = oldest stored
    # a state dict of the old format (rows in ring order, no header) is read in logical order too
    old = {"draws": b.draws.clone(), "count": 5, "calls": 5}
    b3 = SampleBuffer(model, 3)
    b3.load_state_dict(old)
    assert torch.equal(b3.stored(), newest)


def test_sample_buffer_load_state_refuses_what_does_not_fit():
    model = _mlp()
    b = _buffer(model, 3, 2)
    sd = b.state_dict()
    other = SampleBuffer(nn.Linear(2, 3), 3)
    with pytest.raises(ValueError, match="other trainable parameters"):
        other.load_state_dict(sd)
    bad = dict(sd, draws=sd["draws"][:, :5])
    fresh = SampleBuffer(model, 3)
    with pytest.raises(ValueError, match="draws must be"):
        fresh.load_state_dict(bad)
    assert len(fresh) == 0 and fresh.count == 0
    with pytest.raises(ValueError, match="SampleBuffer"):
        fresh.load_state_dict(dict(sd, kind="SWAG"))


# ---------------------------------------------------------------------------------------------
# item 5: predict evaluates in eval mode and restores the mode
# ---------------------------------------------------------------------------------------------
def _bn_dropout_net():
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_predict_in_eval_mode_leaves_model_and_buffers_alone():
    """Item 5: after a training loop (train mode) SampleBuffer.predict used batch statistics,
    overwrote the running buffers and kept dropout on: two identical calls differed."""
    torch.manual_seed(0)
    model = _bn_dropout_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    buf = SampleBuffer(model, 4)
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        buf.collect()
    assert model.training
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    xt = torch.randn(10, 4)
    p1, p2 = buf.predict(xt), buf.predict(xt)
    assert torch.equal(p1, p2)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.named_buffers():
        assert torch.equal(v, bufs[k]), k
    torch.testing.assert_close(p1, _manual_bma(model, buf.stored(), xt))
    swag = SWAG(model, max_rank=3)
    for _ in range(3):
        _jiggle(model, 0.05)
        swag.collect()
    model.train()
    q1 = swag.predict(xt, 3, generator=torch.Generator().manual_seed(1))
    q2 = swag.predict(xt, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q1, q2) and model.training


# ---------------------------------------------------------------------------------------------
# item 6: one logit per point: refuse classification, support binary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("squeeze", [True, False], ids=["N", "Nx1"])
def test_binary_outputs(squeeze):
    """Item 6: outputs [N] / [N, 1] under 'classification' gave softmax over the batch / over one
    class (all ones); now refused with a pointer to 'binary', which averages sigmoids -> [N]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)) if squeeze else nn.Linear(3, 1)
    buf = _buffer(model, 5, 5)
    swag = _swag(model)
    x = torch.randn(8, 3)
    for post in (buf, swag):
        with pytest.raises(ValueError, match="likelihood='binary'"):
            post.predict(x, 3)
    p = buf.predict(x, likelihood="binary")
    assert p.shape == (8,)
    torch.testing.assert_close(p, _manual_bma(model, buf.stored(), x, lambda o: o.sigmoid().reshape(-1)))
    q = swag.predict(x, 4, likelihood="binary", generator=torch.Generator().manual_seed(2))
    draws = swag.sample(4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(q, _manual_bma(model, draws, x, lambda o: o.sigmoid().reshape(-1)))
    with pytest.raises(ValueError, match="likelihood='classification'"):
        _buffer(_mlp(), 2, 2).predict(torch.randn(4, 5), likelihood="binary")  # 3 outputs per point
    with pytest.raises(ValueError, match="likelihood must be one of"):
        buf.predict(x, likelihood="poisson")


# ---------------------------------------------------------------------------------------------
# item 9: MultiSWAG compares the full layout
# ---------------------------------------------------------------------------------------------
def test_multiswag_refuses_other_layouts_with_the_same_count():
    """Item 9: Linear(4, 3) and Linear(2, 5) both have 15 parameters and were mixed."""
    a, b = _swag(nn.Linear(4, 3)), _swag(nn.Linear(2, 5))
    assert a.numel == b.numel == 15
    with pytest.raises(ValueError, match=r"posteriors\[1\] tracks other parameters.*\(3, 4\)"):
        MultiSWAG([a, b])
    with pytest.raises(ValueError, match="float64"):
        MultiSWAG([a, _swag(nn.Linear(4, 3).double())])
    multi = MultiSWAG([a, _swag(nn.Linear(4, 3))])
    assert len(multi) == 2


def test_multiswag_sample_into_model_picks_a_component():
    torch.manual_seed(0)
    swags = [_swag(nn.Linear(4, 3).double()) for _ in range(2)]
    multi = MultiSWAG(swags)
    target = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(9)
    i = int(torch.randint(2, (), generator=g))
    expect = swags[i].sample(1, generator=g)[0]
    multi.sample_(target, generator=torch.Generator().manual_seed(9))
    assert torch.equal(multi.layout.flatten(target), expect)


# ---------------------------------------------------------------------------------------------
# item 20: regression BMA against the exact Bayesian-linear-regression posterior
# ---------------------------------------------------------------------------------------------
def test_regression_predict_matches_blr_epistemic_variance():
    """Item 20: draws from the exact posterior N(mu, Sigma); at x* the epistemic variance is
    x*^T Sigma x* and the predictive one x*^T Sigma x* + sigma^2."""
    noise_var = 0.25
    x, y, _ = data.linear_regression_data(n=30, d=3, noise_std=math.sqrt(noise_var), seed=1)
    mu, Sigma = data.blr_posterior(x, y, noise_var=noise_var, prior_precision=1.0)
    S = 8000
    g = torch.Generator().manual_seed(0)
    draws = mu + torch.randn(S, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(Sigma).T
    model = nn.Linear(3, 1, bias=False).double()
    buf = SampleBuffer(model, S)
    for th in draws:
        buf.layout.write_(th)
        buf.collect()
    xs = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [3.0, 3.0, -3.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    mean, var = buf.predict(xs, likelihood="regression")
    assert mean.shape == var.shape == (4, 1)
    exact_var = torch.einsum("nd,de,ne->n", xs, Sigma, xs)
    exact_mean = xs @ mu
    # sample variance of S Gaussian values: sd = var sqrt(2 / S) (1.6 % here); 5 sd. The first point
    # (x* = 0) has no epistemic variance at all.
    rel = 5 * math.sqrt(2 / S)
    assert var[0, 0] == 0 and mean[0, 0] == 0
    assert ((var[1:, 0] - exact_var[1:]).abs() <= rel * exact_var[1:]).all(), (var[:, 0], exact_var)
    assert ((mean[1:, 0] - exact_mean[1:]).abs() <= 5 * (exact_var[1:] / S).sqrt()).all()
    predictive = var[:, 0] + noise_var
    assert ((predictive - (exact_var + noise_var)).abs() <= rel * exact_var + 1e-12).all()
    # a 20 % too narrow posterior is caught by the same tolerance
    assert not ((0.8 * var[1:, 0] - exact_var[1:]).abs() <= rel * exact_var[1:]).all()


# ---------------------------------------------------------------------------------------------
# unclear errors: dict batches, tuple outputs
# ---------------------------------------------------------------------------------------------
class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(5, 3)

    def forward(self, x):
        return self.f(x), x.sum()


def test_dict_batches_and_tuple_outputs_are_explained_or_adapted():
    torch.manual_seed(0)
    model = _mlp()
    buf = _buffer(model, 3, 3)
    swag = _swag(model)
    x = torch.randn(12, 5)
    loader = [{"pixels": x[i:i + 4], "label": torch.zeros(4)} for i in range(0, 12, 4)]
    for post in (buf, swag):
        with pytest.raises(TypeError, match=r"dicts \(keys 'pixels', 'label'\).*input_fn"):
            post.predict(loader, 2)
    got = buf.predict(loader, input_fn=lambda b: b["pixels"])
    torch.testing.assert_close(got, buf.predict(x))
    tmodel = _TupleNet()
    tbuf = _buffer(tmodel, 2, 2)
    with pytest.raises(TypeError, match=r"returned a tuple.*output_fn=lambda out: out\[0\]"):
        tbuf.predict(x)
    got = tbuf.predict(x, output_fn=lambda out: out[0])
    plain = copy.deepcopy(tmodel.f)
    torch.testing.assert_close(got, _manual_bma(plain, tbuf.stored(), x))
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        tbuf.predict(x, output_fn=lambda out: out)
    with pytest.raises(ValueError, match="no inputs"):
        buf.predict([])
    assert buf.predict(x[:0]).shape == (0, 3)  # an empty tensor is N = 0 points


# load_state_dict is checked whole before anything is written (found by review after issue 8)
@pytest.mark.parametrize("edit, exc, match", [
    (lambda sd: sd.pop("var_clamp"), ValueError, "var_clamp"),
    (lambda sd: sd.update(var_clamp=float("nan")), ValueError, "var_clamp must be finite"),
    (lambda sd: sd.update(var_clamp=-1.0), ValueError, "var_clamp must be finite"),
    (lambda sd: sd["mean"].__setitem__(0, float("nan")), ValueError, r"state_dict\['mean'\] holds NaN"),
    (lambda sd: sd["D"].__setitem__((0, 0), float("inf")), ValueError, r"state_dict\['D'\] holds NaN or inf"),
    (lambda sd: sd.update(sq_mean=sd["sq_mean"].long()), TypeError, r"state_dict\['sq_mean'\] must be a floating"),
    (lambda sd: sd.update(n_averaged=-1), ValueError, "n_averaged"),
])
def test_swag_load_state_dict_refuses_before_writing(edit, exc, match):
    torch.manual_seed(5)
    src = _swag(_mlp(), collects=4)
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in src.state_dict().items()}
    var_clamp = sd.get("var_clamp")
    edit(sd)
    dst = _swag(_mlp(), collects=2)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in dst.state_dict().items()}
    with pytest.raises(exc, match=match):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    for k, v in before.items():
        assert (torch.equal(v, after[k]) if torch.is_tensor(v) else v == after[k]), k
    assert var_clamp == dst.var_clamp


def test_sample_buffer_load_state_dict_messages():
    torch.manual_seed(6)
    buf = _buffer(_mlp(), 3, 2)
    sd = buf.state_dict()
    with pytest.raises(ValueError, match="calls must be >= 0"):
        SampleBuffer(_mlp(), 3).load_state_dict(dict(sd, calls=-5))
    with pytest.raises(ValueError, match="floating point and finite"):
        SampleBuffer(_mlp(), 3).load_state_dict(dict(sd, draws=sd["draws"].long()))
    bad = sd["draws"].clone()
    bad[0, 0] = float("nan")
    other = SampleBuffer(_mlp(), 3)
    with pytest.raises(ValueError, match="floating point and finite"):
        other.load_state_dict(dict(sd, draws=bad))
    assert len(other) == 0
