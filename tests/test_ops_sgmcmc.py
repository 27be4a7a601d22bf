"""Fused SG-MCMC steps (sgld_step_, sghmc_step_, psgld_step_) and any_nonfinite: the op contract,
and what is particular to them (noise scale, skip flag, empty groups, CUDA graphs)."""
import math

import pytest
import torch

from pyfastbayes import _reference as R
from pyfastbayes import ops

from _helpers import (ALL_DTYPES, DEVICES, Bad, OpContract, OpSpec, expanded_like, needs_cuda, needs_native,
                      placement, put, self_overlapping)

# kind -> (wrapper, reference, name of the state list or None); fixed seeds per kind
OPS = {"sgld": (ops.sgld_step_, R.sgld_step_, None),
       "sghmc": (ops.sghmc_step_, R.sghmc_step_, "momenta"),
       "psgld": (ops.psgld_step_, R.psgld_step_, "square_avg")}
SEEDS = {"sgld": 11, "sghmc": 12, "psgld": 13}
DTYPE_SEEDS = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def make_lists(dtype, device, gen):
    """Mixed sizes: empty, odd, aligned, an unaligned view, a non-contiguous view, a big one."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    params = [rnd(0), rnd(1), rnd(3), rnd(4, 5), rnd(1027)[1:], rnd(17, 9).t(), rnd(3, 4, 5), rnd(70_001)]
    grads = [rnd(*p.shape) for p in params]
    bufs = [rnd(*p.shape).abs() for p in params]  # |.|: pSGLD's square_avg must be >= 0
    return params, grads, bufs


def hyper_for(kind, device):
    extra = {"sgld": [0.0, 0.0], "sghmc": [0.1, 0.0], "psgld": [0.9, 1e-3]}[kind]
    return torch.tensor([1e-3, 0.7, 500.0, 2.0] + extra, dtype=torch.float64, device=device)


def step_args(kind, params, grads, bufs, hyper, rng, skip=None, offsets=None):
    """The arguments of one step as a dict keyed by the schema's names."""
    state = OPS[kind][2]
    return dict(params=params, grads=grads, **({state: bufs} if state else {}), hyper=hyper, rng=rng, skip=skip,
                offsets=offsets)


def run(fn, kind, params, grads, bufs, hyper, rng, skip=None, offsets=None):
    fn(**step_args(kind, params, grads, bufs, hyper, rng, skip, offsets))


def random_offsets(n, gen):
    """n stream offsets: 0, odd ones, multiples of 4 +- 1, one past 2^32 blocks (the block index's
    high word) and random ones."""
    fixed = [0, 1, 3, 4 * 1000 + 2, 5, 2**34 + 7, 70_001]
    rnd = torch.randint(0, 10**6, (n,), generator=gen).tolist()
    return [fixed[i] if i < len(fixed) else rnd[i] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# the contract of the three steps
# ---------------------------------------------------------------------------------------------
def step_spec(kind):
    state = OPS[kind][2]

    def make(case, device, dtype, gen):
        gen.manual_seed(SEEDS[kind] * 100 + DTYPE_SEEDS[dtype] * 10 + ("random", "empty", "noncontig").index(case))
        rng = torch.tensor([123456789012345, 5], dtype=torch.int64, device=device)
        hyper = hyper_for(kind, device)
        if case == "random":  # three steps on the mixed list of make_lists: the state carries over;
            p, g, b = make_lists(dtype, device, gen)  # offsets None, then random ones (odd included)
            return [step_args(kind, p, g, b, hyper, rng, offsets=off)
                    for off in (None, random_offsets(len(p), gen), random_offsets(len(p), gen)[::-1])]
        elif case == "empty":  # an empty group (the step still advances rng), then empty tensors
            e = [torch.zeros(0, dtype=dtype, device=device), torch.zeros(3, 0, dtype=dtype, device=device)]
            return [step_args(kind, [], [], [], hyper, rng),
                    step_args(kind, e, [x.clone() for x in e], [x.clone() for x in e], hyper, rng)]
        else:  # every tensor a view: transposed, strided, offset
            def rnd(*shape):
                return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
            views = lambda: [rnd(9, 7).t(), rnd(40)[1::3], rnd(5, 6, 4).permute(2, 0, 1), rnd(300, 2)[:, 1]]  # noqa: E731
            p, g = views(), views()
            b = [x.abs() for x in views()]
        return [step_args(kind, p, g, b, hyper, rng, offsets=off) for off in (None, [3, 0, 6, 1], [1, 2, 3, 4])]

    def good(device):
        gen = torch.Generator().manual_seed(0)
        p = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
        g = [torch.randn_like(x) for x in p]
        b = [torch.rand_like(x) for x in p]
        p, g, b = ([x.to(device) for x in lst] for lst in (p, g, b))
        return step_args(kind, p, g, b, hyper_for(kind, device), torch.tensor([3, 0], device=device))

    def with_skip(device):
        return {**good(device), "skip": torch.tensor(False, device=device)}

    def with_offsets(device):
        return {**good(device), "offsets": [7, 2]}

    lst = lambda name, f: (lambda a, d: [f(t, d) for t in a[name]])  # noqa: E731
    op = f"{kind}_step_"
    bad = [
        Bad("grads-count", put(grads=lambda a, d: a["grads"] * 2), f"{op}: got 2 params but 4 grads"),
        Bad("one-dtype", put(params=lambda a, d: [a["params"][0], a["params"][1].double()],
                             grads=lambda a, d: [a["grads"][0], a["grads"][1].double()]),
            r"params\[1\] has dtype Double but params\[0\] has Float \(one dtype per call\)"),
        Bad("grad-dtype", put(grads=lambda a, d: [a["grads"][0].double(), a["grads"][1]]),
            r"grads\[0\] has dtype Double but params\[0\] has Float \(one dtype per call\)"),
        Bad("grad-shape", put(grads=lambda a, d: [torch.zeros(4, device=d), a["grads"][1]]),
            r"grads\[0\] has shape \[4\] but params\[0\] has shape \[5\]"),
        Bad("int-params", put(params=lst("params", lambda t, d: t.long()), grads=lst("grads", lambda t, d: t.long()),
                              **({state: lst(state, lambda t, d: t.long())} if state else {})),
            f"{op}: params must be floating point, got Long"),
        Bad("hyper-float32", put(hyper=lambda a, d: a["hyper"].float()), f"{op}: hyper must be a contiguous float64"),
        Bad("hyper-short", put(hyper=lambda a, d: a["hyper"][:5]), "hyper must be a contiguous float64 vector of length 6"),
        Bad("hyper-strided", put(hyper=lambda a, d: a["hyper"].repeat_interleave(2)[::2]), "hyper must be a contiguous"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)), r"rng must be a contiguous int64 \[2\]"),
        Bad("rng-int32", put(rng=lambda a, d: a["rng"].int()), r"rng must be a contiguous int64 \[2\] = \(seed, step\)"),
        Bad("skip-float", put(skip=lambda a, d: torch.tensor(1.0, device=d)), f"{op}: skip must be a bool scalar"),
        Bad("skip-vector", put(skip=lambda a, d: torch.tensor([True, True], device=d)), "skip must be a bool scalar"),
        Bad("offsets-count", put(offsets=[0]), f"{op}: got 2 params but 1 offsets"),
        Bad("offsets-count-empty-group", put(params=[], grads=[], **({state: []} if state else {}), offsets=[4]),
            f"{op}: got 0 params but 1 offsets"),
        Bad("offsets-negative", put(offsets=[0, -3]), rf"{op}: offsets\[1\] must be >= 0, got -3"),
        Bad("offsets-overflow", put(offsets=[2**63 - 3, 0]),
            rf"{op}: offsets\[0\] \+ 5 elements must be below 2\^63, got offsets\[0\] = {2**63 - 3}"),
        Bad("empty-group-rng", put(params=[], grads=[], **({state: []} if state else {}),
                                   rng=lambda a, d: torch.tensor([4], device=d)), "rng must be"),
        Bad("empty-group-skip", put(params=[], grads=[], **({state: []} if state else {}),
                                    skip=lambda a, d: torch.tensor(1.0, device=d)), "skip must be"),
        Bad("duplicate-params", put(params=lambda a, d: [a["params"][0], a["params"][0]],
                                    grads=lambda a, d: [a["grads"][0], a["grads"][0].clone()],
                                    **({state: lambda a, d: [a[state][0], a[state][0].clone()]} if state else {})),
            rf"{op}: params\[1\] overlaps params\[0\]"),
        Bad("grad-is-param", put(grads=lambda a, d: [a["params"][0], a["grads"][1]]),
            rf"{op}: grads\[0\] overlaps params\[0\]"),
        Bad("partial-overlap", overlapping_views(state), rf"{op}: params\[1\] overlaps params\[0\]"),
        Bad("rng-in-params", rng_in_params, rf"{op}: rng overlaps params\[0\]"),
        Bad("expanded-param", put(params=lambda a, d: [expanded_like(a["params"][0]), a["params"][1]]),
            rf"{op}: params\[0\] has internal overlap"),
        Bad("as-strided-param", put(  # partial self-overlap without a stride 0 (found in review)
            params=lambda a, d: [self_overlapping(dtype=a["params"][0].dtype, device=d), a["params"][1]],
            grads=lambda a, d: [torch.ones(3, 2, dtype=a["grads"][0].dtype, device=d), a["grads"][1]],
            **({state: lambda a, d: [torch.zeros(3, 2, dtype=a[state][0].dtype, device=d), a[state][1]]}
               if state else {})),
            rf"{op}: params\[0\] has internal overlap"),
    ] + placement(op, "grads", "params[0]", index=0,
                  device=rf"{op}: (tensors are on cpu, expected CUDA|grads\[0\] is on cpu but params\[0\] is on cuda:0)")
    bad += placement(op, "hyper", "params[0]")
    if state:
        bad += [
            Bad("state-count", put(**{state: lambda a, d: a[state][:1]}), f"{op}: got 2 params but 1 state buffers"),
            Bad("state-shape", put(**{state: lambda a, d: [a[state][0], torch.zeros(3, 2, device=d)]}),
                r"state\[1\] has shape \[3, 2\] but params\[1\] has shape \[2, 3\]"),
            Bad("state-is-param", put(**{state: lambda a, d: [a["params"][0], a[state][1]]}),
                rf"{op}: {state}\[0\] overlaps params\[0\]"),
        ] + placement(op, state, "params[0]", index=1, sparse=False)
    def post(case, calls, outs, after):  # each call advanced the step by one; dtypes and shapes kept
        steps = calls[0]["rng"][1].item() + len(calls)
        assert after[-1]["rng"].tolist() == [calls[0]["rng"][0].item(), steps]
        if case == "random":
            assert after[-1]["rng"].tolist() == [123456789012345, 8]
        for a, b in zip(calls, after):
            for name in ("params", state) if state else ("params",):
                assert [(t.dtype, t.shape) for t in a[name]] == [(t.dtype, t.shape) for t in b[name]]

    return OpSpec(op, grid=ALL_DTYPES, make=make, good=good, bad=bad, opcheck=[with_skip, with_offsets], post=post,
                  seed=SEEDS[kind])


def overlapping_views(state):
    """params[1] = elements 2..4 of params[0] (a partial overlap), the other lists shaped alike."""
    def edit(a, d):
        out = dict(a, params=[a["params"][0], a["params"][0][2:]], grads=[a["grads"][0], torch.zeros(3, device=d)])
        if state:
            out[state] = [a[state][0], torch.zeros(3, device=d)]
        return out
    return edit


def rng_in_params(a, d):
    """rng = the first 16 bytes of params[0]'s memory (an int64 view of it)."""
    base = torch.zeros(6, device=d)
    return dict(a, params=[base[:5], a["params"][1]], rng=base.view(torch.int64)[:2])


class TestSgldStep(OpContract):
    spec = step_spec("sgld")


class TestSghmcStep(OpContract):
    spec = step_spec("sghmc")


class TestPsgldStep(OpContract):
    spec = step_spec("psgld")


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", list(OPS))
def test_stepping_pieces_with_offsets_equals_stepping_the_whole(kind, backend):
    """The offsets rule: a tensor split at any element k (k not a multiple of 4 too), the pieces
    stepped with offsets (0, k) on the same stream index, equals the whole tensor stepped (state
    included), bit for bit: each element draws the same normal. Also the pieces in two calls
    with stream index 1 (the tensor's place in its list) and in another order."""
    if backend == "native" and not ops.native_op(f"{kind}_step_", "cpu"):
        pytest.skip("needs the compiled extension")
    fn = OPS[kind][0]
    gen = torch.Generator().manual_seed(21)
    n = 3 * 16384 + 1030  # several CPU work items and noise buffers of 1024
    x, g = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    b0 = torch.rand(n, generator=gen, dtype=torch.float64)
    other = torch.randn(10, generator=gen, dtype=torch.float64)  # list position 0: the tensor is stream 1
    hyper = hyper_for(kind, "cpu")
    whole, wb = x.clone(), b0.clone()
    for _ in range(2):
        fn(**step_args(kind, [other.clone(), whole], [other, g], [other.abs(), wb], hyper, torch.tensor([5, 9])),
           backend=backend)
    for k in (1, 2, 3, 4, 1023, 1025, 16383, 16389, n - 1):
        pieces = [(0, k), (k, n)]
        got, gb = x.clone(), b0.clone()
        for _ in range(2):
            for lo, hi in pieces[::-1]:  # order does not matter: each piece has its own offset
                fn(**step_args(kind, [other.clone(), got[lo:hi]], [other, g[lo:hi]], [other.abs(), gb[lo:hi]],
                               hyper, torch.tensor([5, 9]), offsets=[0, lo]), backend=backend)
        torch.testing.assert_close(got, whole, rtol=0, atol=0, msg=lambda m: f"split at {k}: {m}")
        if OPS[kind][2]:
            torch.testing.assert_close(gb, wb, rtol=0, atol=0)
    # offsets [0] is the default (None); offsets [1] draws other noise
    outs = []
    for off in ([0], None, [1]):
        y = x[:100].clone()
        fn(**step_args(kind, [y], [g[:100]], [b0[:100].clone()], hyper, torch.tensor([1, 2]), offsets=off),
           backend=backend)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@needs_native
@pytest.mark.parametrize("kind", list(OPS))
def test_noise_is_injected_with_the_right_scale(kind):
    """Zero gradient, zero prior: the update is pure noise of known standard deviation."""
    fused = OPS[kind][0]
    n = 400_000
    p, g, b = [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)]
    lr, temp = 1e-2, 0.5
    hyper = torch.tensor([lr, temp, 10.0, 0.0, 0.1 if kind == "sghmc" else 0.0, 1.0], dtype=torch.float64)
    run(fused, kind, p, g, b, hyper, torch.tensor([7, 0]))
    expected = {"sgld": (lr * temp) ** 0.5, "sghmc": (2 * 0.1 * lr * temp) ** 0.5,
                "psgld": (lr * temp / (1.0 + 0.0)) ** 0.5}[kind]  # pSGLD: V = 0 -> G = 1/eps = 1
    assert abs(p[0].std().item() / expected - 1) < 5 * (0.5 / n) ** 0.5


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", list(OPS))
def test_skip_flag_changes_nothing(kind, backend):
    if backend == "native" and not ops.native_op(f"{kind}_step_", "cpu"):
        pytest.skip("needs the compiled extension")
    fused = OPS[kind][0]
    p, g, b = make_lists(torch.float32, "cpu", torch.Generator().manual_seed(3))
    p0, b0 = [x.clone() for x in p], [x.clone() for x in b]
    rng = torch.tensor([1, 2])
    step = lambda skip: fused(**step_args(kind, p, g, b, hyper_for(kind, "cpu"), rng, skip), backend=backend)  # noqa: E731
    step(torch.tensor(True))
    assert rng.tolist() == [1, 2]
    for a, e in zip(p + b, p0 + b0):
        assert torch.equal(a, e)
    step(torch.tensor(False))
    assert rng.tolist() == [1, 3] and not torch.equal(p[-1], p0[-1])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_op_level_argument_checks(backend):
    """The first checks of issue 8, kept as written: both backends, RuntimeError, nothing written."""
    if backend == "native" and not ops.native_op("sgld_step_", "cpu"):
        pytest.skip("needs the compiled extension")
    p, g = [torch.zeros(3)], [torch.zeros(3)]
    hyper, rng = hyper_for("sgld", "cpu"), torch.tensor([0, 0])
    step = lambda *a: ops.sgld_step_(*a, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="1 params but 2 grads"):
        step(p, g + g, hyper, rng)
    with pytest.raises(RuntimeError, match="one dtype per call"):
        step(p + [torch.zeros(2, dtype=torch.float64)], g + [torch.zeros(2, dtype=torch.float64)], hyper, rng)
    with pytest.raises(RuntimeError, match="shape"):
        step(p, [torch.zeros(4)], hyper, rng)
    with pytest.raises(RuntimeError, match="hyper must be"):
        step(p, g, hyper.float(), rng)
    with pytest.raises(RuntimeError, match="rng must be"):
        step(p, g, hyper, torch.tensor([0, 0, 0]))
    assert torch.equal(p[0], torch.zeros(3)) and rng.tolist() == [0, 0]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_group_still_checks_and_advances_rng(device, backend):
    if backend == "native" and not ops.native_op("sgld_step_", device):
        pytest.skip("needs the compiled extension")
    hyper, rng = hyper_for("sgld", device), torch.tensor([4, 7], device=device)
    ops.sgld_step_([], [], hyper, rng, backend=backend)
    assert rng.tolist() == [4, 8]
    with pytest.raises(RuntimeError, match="rng must be"):
        ops.sgld_step_([], [], hyper, torch.tensor([4], device=device), backend=backend)
    with pytest.raises(RuntimeError, match="skip must be"):
        ops.sgld_step_([], [], hyper, rng, torch.tensor(1.0, device=device), backend=backend)
    assert rng.tolist() == [4, 8]


@needs_native
def test_ops_trace_under_torch_compile():
    """The fake kernels let dynamo/AOT trace the mutating ops (fullgraph), with eager results."""
    def step_and_score(ps, gs, bufs, hyper, rng):
        torch.ops.pyfastbayes.sghmc_step_.default(ps, gs, bufs, hyper, rng)
        return sum((p * p).sum() for p in ps) + ops.any_nonfinite(gs).float()

    gen = torch.Generator().manual_seed(2)
    p1 = [torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen)]
    g = [torch.randn_like(x) for x in p1]
    p2, b1, b2 = [x.clone() for x in p1], [torch.zeros_like(x) for x in p1], [torch.zeros_like(x) for x in p1]
    hyper = hyper_for("sghmc", "cpu")
    rng1, rng2 = torch.tensor([5, 0]), torch.tensor([5, 0])
    compiled = torch.compile(step_and_score, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        out_c = compiled(p1, g, b1, hyper, rng1)
        out_e = step_and_score(p2, g, b2, hyper, rng2)
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(p1 + b1, p2 + b2):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert rng1.tolist() == rng2.tolist() == [5, 2]


@needs_native
def test_compile_refuses_bad_input_with_the_kernel_message():
    """The fake kernels run the references' checks: torch.compile refuses with the same text."""
    p, g = [torch.zeros(3)], [torch.zeros(4)]
    hyper, rng = hyper_for("sgld", "cpu"), torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4\] but params\[0\] has shape \[3\]") as eager:
        ops.sgld_step_(p, g, hyper, rng)
    compiled = torch.compile(lambda *a: ops.sgld_step_(*a), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"grads\[0\] has shape \[4\] but params\[0\] has shape \[3\]") as traced:
        compiled(p, g, hyper, rng)
    assert str(eager.value).splitlines()[0] in str(traced.value)


# ---------------------------------------------------------------------------------------------
# any_nonfinite
# ---------------------------------------------------------------------------------------------
def nonfinite_make(case, device, dtype, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    if case == "empty":
        return [dict(tensors=[torch.zeros(0, dtype=dtype, device=device)]),
                dict(tensors=[torch.zeros(3, 0, dtype=dtype, device=device), rnd(2)])]
    if case == "noncontig":
        base = [rnd(30, 20).t(), rnd(100)[::7], rnd(4, 5, 6).permute(1, 2, 0)]
    else:  # clean, and one NaN / +inf / -inf in each position of a mixed list (other dtypes too)
        base = [rnd(10), rnd(3), torch.zeros(0, dtype=dtype, device=device), rnd(70_000),
                torch.arange(5, device=device), torch.ones(2, dtype=torch.float64, device=device)]
    calls = [dict(tensors=base, limit=None)]
    for i in range(len(base)):
        if not base[i].is_floating_point() or base[i].numel() == 0:
            continue
        for bad in (float("nan"), float("inf"), -float("inf")):
            ts = [t.clone() for t in base]
            ts[i][torch.unravel_index(torch.tensor(ts[i].numel() // 2 + 1), ts[i].shape)] = bad
            calls.append(dict(tensors=ts, limit=None))
    # the limit: the largest magnitude (flagged when >= limit), just above it, below it, a limit
    # between two values of the dtype, one past the dtype's range (only inf and NaN flagged)
    top = max(float(t.abs().max()) for t in base if t.is_floating_point() and t.numel())
    for limit in (top, math.nextafter(top, math.inf), top * 0.999, 1.0, 0.0625, 1e300):
        calls.append(dict(tensors=base, limit=limit))
    return calls


NONFINITE_BAD = placement("any_nonfinite", "tensors", "tensors[0]", index=1,
                          device=r"any_nonfinite: tensors on (cpu and cuda:0|cuda:0 and cpu)") + [
    Bad("limit-zero", put(limit=0.0), r"^any_nonfinite: limit must be > 0 \(a bound on the magnitude\), got 0$"),
    Bad("limit-negative", put(limit=-2.5), r"^any_nonfinite: limit must be > 0 .*, got -2.5$"),
    Bad("limit-nan", put(limit=math.nan), r"^any_nonfinite: limit must be > 0 .*, got nan$"),
]

ANY_NONFINITE = OpSpec(
    "any_nonfinite", grid=ALL_DTYPES, make=nonfinite_make, seed=4,
    good=lambda device: dict(tensors=[torch.randn(4, device=device), torch.randn(3, device=device)], limit=2.0),
    bad=NONFINITE_BAD)


class TestAnyNonfinite(OpContract):
    spec = ANY_NONFINITE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_any_nonfinite_limit_is_exact_in_every_dtype(backend, device):
    """|x| >= limit compared exactly: for each dtype the largest value below a limit is not flagged,
    the smallest at or above it is (float32 at sqrt(float32 max): 2^64 - 2^40 passes, 2^64 is
    flagged); a limit past a dtype's range flags only inf and NaN; complex: either part."""
    if backend == "native" and not ops.native_op("any_nonfinite", device):
        pytest.skip("no native kernel")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        for limit in (info.max ** 0.5, 1.0, 3.0, 1e-3, float(info.max) * 0.75):
            at = torch.tensor(limit, dtype=torch.float64).to(dtype)  # the nearest value of the dtype
            if float(at) < limit:
                at = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype))
            below = torch.nextafter(at, torch.tensor(0.0, dtype=dtype))
            for v, want in ((at, True), (-at, True), (below, False), (-below, False)):
                # 70 000 zeros before it: the CUDA kernel's vector path and several blocks
                got = ops.any_nonfinite([torch.zeros(5, dtype=dtype, device=device),
                                         torch.cat([torch.zeros(70_000, dtype=dtype), v.reshape(1)]).to(device)],
                                        limit, backend=backend)
                assert bool(got) == want, (dtype, limit, float(v))
        big = torch.tensor([info.max, -info.max], dtype=dtype, device=device)
        assert not ops.any_nonfinite([big], 1e300 if dtype != torch.float64 else math.inf, backend=backend)
        assert ops.any_nonfinite([torch.tensor([math.inf], dtype=dtype, device=device)], 1e300, backend=backend)
    z = torch.tensor([1 + 4j, 2 - 1j], dtype=torch.complex64, device=device)
    assert ops.any_nonfinite([z], 4.0, backend=backend) and not ops.any_nonfinite([z], 4.5, backend=backend)
    assert ops.any_nonfinite([z.conj()], 4.0, backend=backend)


@needs_native
def test_any_nonfinite():
    ts = [torch.zeros(10), torch.ones(3, dtype=torch.float64), torch.zeros(0), torch.ones(70_000, dtype=torch.bfloat16)]
    assert not ops.any_nonfinite(ts).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        ts[3][65_537] = bad
        assert ops.any_nonfinite(ts).item() and R.any_nonfinite(ts).item()
        ts[3][65_537] = 0
    ts[1][0] = 1e300  # large but finite double: not flagged
    assert not ops.any_nonfinite(ts).item()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_any_nonfinite_checks_real_and_imaginary_parts(dtype, backend):
    if backend == "native" and not ops.native_op("any_nonfinite", "cpu"):
        pytest.skip("needs the compiled extension")
    clean = torch.randn(1000, dtype=dtype)
    got = {}
    for where, bad in [("real", complex(float("nan"), 0.0)), ("imag", complex(0.0, float("inf"))),
                       ("imag-neg", complex(1.0, -float("inf")))]:
        z = clean.clone()
        z[501] = bad
        got[where] = bool(ops.any_nonfinite([torch.zeros(3), z], backend=backend))
    got["clean"] = bool(ops.any_nonfinite([clean, clean.conj()], backend=backend))
    got["conj"] = bool(ops.any_nonfinite([z.conj()], backend=backend))
    want = {"real": True, "imag": True, "imag-neg": True, "clean": False, "conj": True}
    assert got == want


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("kind", list(OPS))
def test_cuda_matches_cpu(kind):
    fused = OPS[kind][0]
    p, g, b = make_lists(torch.float32, "cpu", torch.Generator().manual_seed(5))
    pc, gc, bc = ([x.cuda() for x in lst] for lst in (p, g, b))
    run(fused, kind, p, g, b, hyper_for(kind, "cpu"), torch.tensor([9, 1]))
    run(fused, kind, pc, gc, bc, hyper_for(kind, "cuda"), torch.tensor([9, 1], device="cuda"))
    for a, e in zip(pc, p):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_graph_capture_with_changing_lr():
    """A captured step replays with the live lr/temperature and advances the RNG each replay."""
    n = 10_000
    p = [torch.zeros(n, device="cuda")]
    g = [torch.ones(n, device="cuda")]
    hyper = torch.tensor([1e-3, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device="cuda")
    rng = torch.tensor([1, 0], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.sgld_step_(p, g, hyper, rng)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sgld_step_(p, g, hyper, rng)
    p[0].zero_()
    rng[1] = 0
    lrs = [1e-3, 2e-3, 5e-3]
    for lr in lrs:
        hyper[0] = lr
        graph.replay()
    torch.cuda.synchronize()
    # T = 0: deterministic, theta = -sum(lr/2 * g)
    torch.testing.assert_close(p[0], torch.full_like(p[0], -sum(lrs) / 2))
    assert rng[1].item() == 3
