"""pyfastbayes.posteriors on bad input and changed state: every public method refuses with a clear
error naming the argument, and a call that fails leaves the posterior's state (moments, deviation
ring, counters, stored draws) and the user's model as they were.

Each test reproduces an audit finding: a generator that is not a torch.Generator failing deep
inside torch, load_state_dict truncating non-int counters with int() (or raising KeyError),
loading values that overflow to inf in the state's dtype or that make the state require grad,
update_bn leaving the BatchNorm buffers reset after a failed pass, predict on inputs of another
dtype, and MultiSWAG's obscure or anonymous errors."""
import numpy as np
import pytest
import torch
from torch import nn

from pyfastbayes.posteriors import SWA, SWAG, MultiSWAG, SampleBuffer


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if bn else []), nn.ReLU(), nn.Linear(8, 3))


def _jiggle(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _collected(cls, seed=0, n=4, **kw):
    model = _mlp(seed)
    post = cls(model, **kw)
    for _ in range(n):
        _jiggle(model)
        post.collect()
    return post


def _state(obj):
    """Every tensor and number attribute of a posterior, copied."""
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in vars(obj).items()
            if torch.is_tensor(v) or isinstance(v, (int, float))}


def _same(a, b):
    return a.keys() == b.keys() and all(
        (torch.equal(a[k], b[k]) and a[k].requires_grad == b[k].requires_grad) if torch.is_tensor(a[k])
        else a[k] == b[k] for k in a)


# ---- generators ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [3, "cpu", np.random.default_rng(0)])
@pytest.mark.parametrize("call", [
    lambda p, g: p.sample(2, generator=g),
    lambda p, g: p.sample_(generator=g),
    lambda p, g: p.predict(torch.ones(5, 4), 2, generator=g),
    lambda p, g: p.iter_samples(2, generator=g),
])
@pytest.mark.parametrize("kind", ["swag", "buffer", "multi"])
def test_generator_must_be_a_torch_generator(kind, call, bad):
    """Before: AttributeError "'int' object has no attribute 'device'" (SWAG) or torch.randint's
    overload list (SampleBuffer, MultiSWAG.sample_); now a TypeError naming generator, nothing
    drawn and the model untouched."""
    post = {"swag": lambda: _collected(SWAG, max_rank=3), "buffer": lambda: _collected(SampleBuffer, max_samples=3),
            "multi": lambda: MultiSWAG([_collected(SWAG, 0, max_rank=3), _collected(SWAG, 1, max_rank=3)])}[kind]()
    weights = [p.detach().clone() for p in post.model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got"):
        call(post, bad)
    assert all(torch.equal(a, b) for a, b in zip(weights, post.model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())


def test_sample_buffer_takes_a_generator_of_any_device():
    """The indices are drawn on the generator's device (before: only a CPU generator worked):
    the same generator state gives the same picks."""
    buf = _collected(SampleBuffer, max_samples=4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(buf.sample(5, generator=g1), buf.sample(5, generator=g2))


# ---- load_state_dict -----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, exc, match", [
    ("max_rank", "3", ValueError, r"state_dict\['max_rank'\] must be an int >= 0, got '3'"),
    ("max_rank", 3.5, ValueError, r"state_dict\['max_rank'\] must be an int"),
    ("max_rank", None, ValueError, r"state_dict\['max_rank'\] must be an int"),
    ("position", 1.0, ValueError, r"state_dict\['position'\] must be an int"),
    ("position", None, ValueError, r"state_dict\['position'\] must be an int"),
    ("position", ..., ValueError, "state_dict has no 'position'"),
    ("n_averaged", ..., ValueError, "state_dict has no 'n_averaged'"),
    ("mean", torch.full((99,), 1e300, dtype=torch.float64)[:0], ValueError, r"state_dict\['mean'\] has shape"),
    ("mean", "meta", ValueError, r"state_dict\['mean'\] is a meta tensor"),
    ("mean", "huge", ValueError, r"state_dict\['mean'\] holds values up to 1e\+300, beyond the largest finite "
                                 r"torch.float32"),
    ("D", "huge", ValueError, r"state_dict\['D'\] holds values up to 1e\+300"),
    ("sq_mean", "huge", ValueError, r"state_dict\['sq_mean'\] holds values up to"),
])
def test_swag_load_state_dict_checks_counters_and_ranges(key, value, exc, match):
    """Before: int('3') / int(3.5) accepted a malformed max_rank or position, a missing position
    raised KeyError, None a TypeError from int(), a meta tensor "Tensor.item() cannot be called
    on meta tensors", and float64 values beyond float32's range loaded as inf (every draw
    non-finite). Now a ValueError naming the key, and the SWAG unchanged."""
    src = _collected(SWAG, 0, n=5, max_rank=3)
    sd = src.state_dict()
    if value is ...:
        del sd[key]
    elif value == "meta":
        sd[key] = torch.empty_like(sd[key], device="meta")
    elif value == "huge":
        sd[key] = torch.full_like(sd[key], 1e300, dtype=torch.float64)
    else:
        sd[key] = value
    dst = _collected(SWAG, 1, n=2, max_rank=3)
    before = _state(dst)
    with pytest.raises(exc, match=match):
        dst.load_state_dict(sd)
    assert _same(before, _state(dst))


def test_load_state_dict_of_tensors_that_require_grad_leaves_the_state_out_of_autograd():
    """Before: copy_ outside no_grad made mean / D / draws require grad (part of a graph), and the
    next collect's in-place update ran on autograd-tracked state."""
    src = _collected(SWAG, 0, n=4, max_rank=3)
    sd = {k: (v.clone().requires_grad_() if torch.is_tensor(v) else v) for k, v in src.state_dict().items()}
    dst = SWAG(_mlp(1), max_rank=3)
    dst.load_state_dict(sd)
    assert not (dst.mean.requires_grad or dst.sq_mean.requires_grad or dst.D.requires_grad)
    assert torch.equal(dst.mean, src.mean) and torch.equal(dst.D, src.D)
    buf = _collected(SampleBuffer, max_samples=3)
    sd = buf.state_dict()
    sd["draws"] = sd["draws"].clone().requires_grad_()
    other = SampleBuffer(_mlp(1), 3)
    other.load_state_dict(sd)
    assert not other.draws.requires_grad and torch.equal(other.stored(), buf.stored())


def test_swa_load_state_dict_accepts_numpy_counts_and_refuses_huge_means():
    sw = _collected(SWA, n=2)
    sd = sw.state_dict()
    other = SWA(_mlp(1))
    other.load_state_dict(dict(sd, n_averaged=np.int64(2)))  # e.g. after a round trip through NumPy
    assert other.n_averaged == 2 and torch.equal(other.mean, sw.mean)
    before = _state(other)
    with pytest.raises(ValueError, match="holds values up to"):
        other.load_state_dict(dict(sd, mean=torch.full((sw.numel,), -1e39, dtype=torch.float64)))
    assert _same(before, _state(other))


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("count"), "state_dict has no 'count'"),
    (lambda sd: sd.pop("calls"), "state_dict has no 'calls'"),
    (lambda sd: sd.update(count="9"), r"state_dict\['count'\] must be an int >= 0, got '9'"),
    (lambda sd: sd.update(count=5.7), r"state_dict\['count'\] must be an int"),
    (lambda sd: sd.update(calls=2.5), r"state_dict\['calls'\] must be an int"),
    (lambda sd: sd.update(calls=1), "calls 1 is smaller than its count 5"),
    (lambda sd: sd.update(order="newest_first"), r"state_dict\['order'\] must be 'oldest_first'"),
    (lambda sd: sd.update(draws=torch.full_like(sd["draws"], 1e300, dtype=torch.float64)),
     r"state_dict\['draws'\] holds values up to"),
    (lambda sd: sd.update(draws=torch.empty_like(sd["draws"], device="meta")), "on meta"),
])
def test_sample_buffer_load_state_dict_checks_counters(edit, match):
    """Before: KeyError for a missing count/calls, int() truncating '9' / 5.7, calls < count, an
    unknown order read as the old ring order, float64 draws loading as inf, a meta tensor failing
    in .item(); now a ValueError and the buffer unchanged."""
    sd = _collected(SampleBuffer, 0, n=5, max_samples=3).state_dict()
    edit(sd)
    buf = _collected(SampleBuffer, 1, n=2, max_samples=3)
    before = _state(buf)
    with pytest.raises(ValueError, match=match):
        buf.load_state_dict(sd)
    assert _same(before, _state(buf))


# ---- update_bn -------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", [
    lambda: torch.randn(6, 7),  # the model refuses the first batch
    lambda: [torch.randn(6, 4), torch.randn(3, 7)],  # ... a later batch, after one was averaged
    lambda: [],  # no batches
])
def test_update_bn_that_fails_puts_the_batchnorm_buffers_back(loader):
    """Before: the running statistics stayed reset (mean 0, var 1) or half-averaged after a failed
    pass, and the model predicted from them."""
    model = _mlp(bn=True)
    model.train()
    model(torch.randn(20, 4) * 3 + 1)
    swa = SWA(model)
    swa.collect()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises((RuntimeError, ValueError)):
        swa.update_bn(loader())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_update_bn_batch_size_is_checked():
    """Before: RuntimeError 'split_size can only be 0 if dimension size is 0'."""
    swa = _collected(SWA, n=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        swa.update_bn(torch.randn(5, 4), batch_size=0)


# ---- predict -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [SWA, SWAG, SampleBuffer])
def test_predict_names_inputs_of_another_dtype(kind):
    """Before: torch's 'mat1 and mat2 must have the same dtype, but got Double and Float'."""
    post = _collected(kind, **({"max_samples": 3} if kind is SampleBuffer else {}))
    with pytest.raises(TypeError, match=r"x: the inputs are torch.float64 but the model's parameters are "
                                        r"torch.float32: cast the data \(x.to\(torch.float32\)\)"):
        post.predict(torch.randn(5, 4, dtype=torch.float64), 2)
    post.predict(torch.randn(5, 4), 2)  # the same call on float32 inputs works


# ---- MultiSWAG -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, "swag", 3])
def test_multiswag_needs_a_list(bad):
    """Before: "'NoneType' object is not iterable" / a SWAG passed itself: "'SWAG' object is not
    iterable"; a string gave "posteriors[0] is a str"."""
    with pytest.raises(TypeError, match="posteriors must be a list of SWAG objects"):
        MultiSWAG(bad)
    with pytest.raises(TypeError, match="posteriors must be a list of SWAG objects"):
        MultiSWAG(SWAG(_mlp()))


def test_multiswag_names_the_component_that_cannot_draw():
    a, b = _collected(SWAG, 0, max_rank=3), SWAG(_mlp(1), max_rank=3)
    ms = MultiSWAG([a, b])
    for call in (lambda: ms.sample(4), lambda: ms.predict(torch.randn(3, 4), 4), lambda: ms.sample_()):
        with pytest.raises(RuntimeError, match=r"posteriors\[1\]: the SWAG has no collected models yet"):
            call()


def test_multiswag_load_state_dict_messages_and_no_partial_load():
    a, b = _collected(SWAG, 0, max_rank=3), _collected(SWAG, 1, max_rank=3)
    ms = MultiSWAG([a, b])
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match="not a MultiSWAG of 2 components.*components a int"):
        ms.load_state_dict({"kind": "MultiSWAG", "components": 5})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        ms.load_state_dict([1])
    sd = ms.state_dict()
    sd["components"][1]["mean"][0] = float("nan")
    with pytest.raises(ValueError, match=r"state_dict\['components'\]\[1\]: state_dict\['mean'\] holds NaN"):
        ms.load_state_dict(sd)
    assert _same(before[0], _state(a)) and _same(before[1], _state(b))


def test_refresh_bn_with_a_dict_missing_batchnorm_buffers_changes_nothing():
    """tensors= without some BatchNorm buffer: a bare KeyError after the buffers before it had been
    reset (mean 0, var 1). Now a ValueError naming the key, before anything is reset."""
    from pyfastbayes.nn import refresh_bn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    m[1].running_mean.fill_(7.0)
    t = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("4.")}
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(ValueError, match=r"tensors has no '4.running_mean': it must hold the BatchNorm buffers"):
        refresh_bn(m, torch.randn(8, 3), t)
    assert all(torch.equal(t[k], before[k]) for k in t)
    with pytest.raises(ValueError, match=r"tensors has no '1.running_mean'"):
        refresh_bn(m, torch.randn(8, 3), dict(m.named_parameters()))


def test_meta_models_and_meta_storage_are_refused_at_construction():
    """A model on the meta device (no values) and storage on it (every draw dropped): ValueErrors
    naming what to do, before anything is collected."""
    from pyfastbayes import SWA, SWAG
    from pyfastbayes.posteriors import SampleBuffer

    meta = nn.Linear(4, 3, device="meta")
    for make in (lambda: SWA(meta), lambda: SWAG(meta, max_rank=2), lambda: SampleBuffer(meta, 3)):
        with pytest.raises(ValueError, match="on the meta device.*to_empty"):
            make()
    m = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="store_device='meta' holds no values"):
        SWAG(m, max_rank=2, store_device="meta")
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        SampleBuffer(m, 3, device="meta")


def test_parameters_that_overlap_themselves_are_refused():
    class Expanded(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 3).expand(4, 3))

        def forward(self, x):
            return x @ self.w

    from pyfastbayes import SWAG
    with pytest.raises(ValueError, match="parameter 'w' overlaps itself.*clone"):
        SWAG(Expanded(), max_rank=2)


def test_swa_refuses_parameters_its_mean_cannot_hold():
    """A float64 parameter of 1e39 in a float32 mean, or +-3e38 whose difference overflows: refused,
    the mean unchanged (SWAG already refused them through its square's limit)."""
    from pyfastbayes import SWA

    m = nn.Linear(2, 1).double()
    swa = SWA(m, dtype=torch.float32)
    swa.collect()
    before = swa.mean.clone()
    with torch.no_grad():
        m.weight[0, 0] = 1e39
    with pytest.raises(ValueError, match=r"magnitude 1e\+39.*half of torch.float32's largest value.*float64"):
        swa.collect()
    assert torch.equal(swa.mean, before) and swa.n_averaged == 1
    f = nn.Linear(1, 1, bias=False)
    swa = SWA(f)
    with torch.no_grad():
        f.weight.fill_(-1e38)
    swa.collect()
    with torch.no_grad():
        f.weight.fill_(3e38)
    with pytest.raises(ValueError, match="would overflow"):
        swa.collect()
    assert swa.mean.item() == pytest.approx(-1e38, rel=1e-7)


def test_swag_arguments_checked_at_construction():
    from pyfastbayes import SWA, SWAG

    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="var_clamp must be finite in the state dtype torch.float32"):
        SWAG(m, max_rank=2, var_clamp=1e300)
    SWAG(m, max_rank=2, var_clamp=1e300, dtype=torch.float64)  # fits a float64 state
    swag = SWAG(m, max_rank=2)
    for _ in range(3):
        with torch.no_grad():
            m.weight.add_(0.1)
        swag.collect()
    with pytest.raises(TypeError, match="scale must be a number or None, got str"):
        swag.sample(2, scale="2")
    swag.sample(2, scale=torch.tensor(2.0))
    bn = _mlp(bn=True)
    swa = SWA(bn)
    swa.collect()
    with pytest.raises(ValueError, match="^loader yielded no batches"):  # the argument's own name
        swa.update_bn([])
