"""The vi family, section 4 (a layer's weight function with its KL term): vi_weight_kl and
vi_weight_kl_backward_ (grad_rho, grad_mu in place). The op contract of each against the reference
(torch's softplus / sigmoid, the random family's reference eps, vi_kl's float64 closed form) for
every dtype and every kind (0: mu + sigma eps, 1: sigma eps, 2: sigma^2); then the closed forms:
w is vi_sample's / vi_sigma_sq's, the KL vi_kl's and its gradients vi_kl_backward's, the data
gradients vi_sample_backward's / vi_sigma_sq_backward_'s (bit for bit on the CPU where the same
expressions run), the backward is the derivative of <G, w> + c kl (gradcheck, float64), the KL does
not depend on the thread count, and a refused call writes nothing.

Tolerances: as tests/test_ops_vi.py (the reference's eps is ~2e-6 from the kernels'); the KL sums
float32 terms in float32 runs added in float64 (the reference sums float64 terms): 1e-5 relative.
"""
import math

import pytest
import torch

from pyfastbayes import ops

from _helpers import ALL_DTYPES, DEVICES, TOL, Bad, OpContract, OpSpec, placement, put, self_overlapping
from test_ops_vi import POSITIONS, pair_tol, rng_of

KINDS3 = (0, 1, 2)
GRID = [(dtype, k) for dtype in ALL_DTYPES for k in KINDS3]
# one element, a Philox block's tail, 2-D, several 1024-element pieces and a partial one, 0-dim
SHAPES = [(1,), (5,), (13, 79), (3000,), ()]


def values(shape, dtype, gen, specials=False):
    """(mu, rho, grad_rho, grad_mu) on the CPU: mu ~ 0.3 N, rho ~ 3 N - 2 (sigma ~1e-4 .. 10), the
    gradients ~ N; with specials (>= 10 elements) rho at / across the threshold 20, -30, -inf, +inf,
    NaN, and a NaN mu."""
    mu = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    rho = 3 * torch.randn(shape, generator=gen, dtype=torch.float64) - 2
    gr = torch.randn(shape, generator=gen, dtype=torch.float64)
    gm = torch.randn(shape, generator=gen, dtype=torch.float64)
    if specials and mu.numel() >= 10:
        rho.view(-1)[:7] = torch.tensor([25.0, -30.0, 20.0, 21.0, -math.inf, math.inf, math.nan], dtype=torch.float64)
        mu.view(-1)[8] = math.nan
    return [t.to(dtype) for t in (mu, rho, gr, gm)]


def tol(t):
    if t.dim() == 0 and t.dtype == torch.float32:  # the KL: float32 runs vs float64 terms
        return dict(rtol=1e-5, atol=1e-4)
    return pair_tol(t)


def fwd_call(mu, rho, rng, stream, kind):
    return dict(mu=mu, rho=rho, rng=rng, stream=stream, prior_var=0.7, kind=kind)


def bwd_call(gr, gm, mu, rho, rng, stream, kind, g, want_w=True):
    return dict(grad_rho=gr, grad_mu=gm, mu=mu, rho=rho, rng=rng, stream=stream, kl_grad=g, prior_var=0.7, kind=kind,
                want_w=want_w)


def make_for(backward):
    def make(case, device, grid, gen):
        dtype, k = grid
        on = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        g = torch.tensor(0.37, device=device)

        def call(ts, seed, stream, step, want_w=True):
            mu, rho, gr, gm = ts
            rng = rng_of(seed, step, device)
            return bwd_call(gr, gm, mu, rho, rng, stream, k, g, want_w) if backward else \
                fwd_call(mu, rho, rng, stream, k)

        if case == "random":
            return [call(on(values(shape, dtype, gen, specials=shape == (13, 79))), *pos, want_w=i % 2 == 0)
                    for i, (shape, pos) in enumerate((s, p) for s in SHAPES for p in POSITIONS[:2])]
        if case == "empty":
            z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
            return [call([z(0)] * 4 if not backward else [z(0), z(0), z(0), z(0)], 1, 2, 3),
                    call([z(3, 0), z(3, 0), z(3, 0), z(3, 0)], -1, 0, 0)]
        m1, r1, g1, h1 = values((30, 40), dtype, gen)
        m2, r2, g2, h2 = values((9, 14), dtype, gen)
        cl = lambda t: t.to(device).contiguous(memory_format=torch.channels_last)  # noqa: E731
        m3, r3, g3, h3 = (cl(t) for t in values((2, 3, 4, 5), dtype, gen))
        return [call([m1.to(device).t(), r1.t().contiguous().to(device), g1.to(device).t(), h1.t().contiguous().to(device)],
                     11, 2, 9),
                call([m2.to(device)[:, 1::3], r2.to(device)[:, ::3], g2.to(device)[:, 1::3], h2.to(device)[:, ::3]],
                     -3, 5, 1),
                call([m3, r3, g3, h3], 8, 2**32 - 1, 2**32 + 1)]
    return make


def good_for(backward):
    def good(device):
        mu, rho, gr, gm = (t.to(device) for t in values((4, 5), torch.float32, torch.Generator().manual_seed(5)))
        rng = rng_of(11, 3, device)
        if backward:
            return bwd_call(gr, gm, mu, rho, rng, 2, 1, torch.tensor(0.5, device=device))
        return fwd_call(mu, rho, rng, 2, 0)
    return good


def opcheck_for(backward, dtype, shape, kind):
    def args(device):
        mu, rho, gr, gm = (t.to(device) for t in values(shape, dtype, torch.Generator().manual_seed(6)))
        rng = rng_of(-9, 2, device)
        if backward:
            return bwd_call(gr, gm, mu, rho, rng, 7, kind, torch.tensor(0.25, dtype=torch.float64, device=device),
                            kind != 1)
        return fwd_call(mu, rho, rng, 7, kind)
    return args


def common_bad(op):
    rng_msg = rf"^{op}: rng must be a contiguous int64 \[2\] = \(seed, step\) on .*$"
    return [
        Bad("mu-int", put(mu=lambda a, d: a["mu"].long()), rf"^{op}: mu must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("rho-dtype", put(rho=lambda a, d: a["rho"].double()), rf"^{op}: rho has dtype Double but mu has Float$"),
        Bad("rho-shape", put(rho=lambda a, d: a["rho"][:3]), rf"^{op}: rho has shape \[3, 5\] but mu has shape \[4, 5\]$"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)), rng_msg),
        Bad("stream-negative", put(stream=-1), rf"^{op}: stream must be in \[0, 2\^32\), got -1$"),
        Bad("prior-zero", put(prior_var=0.0), rf"^{op}: prior_var must be finite and > 0, got 0$"),
        Bad("prior-nan", put(prior_var=math.nan), rf"^{op}: prior_var must be finite and > 0, got nan$"),
        Bad("prior-inf", put(prior_var=math.inf), rf"^{op}: prior_var must be finite and > 0, got inf$"),
        Bad("kind-3", put(kind=3), rf"^{op}: kind must be 0 \(mu \+ sigma eps\), 1 \(sigma eps\) or 2 \(sigma\^2\), got 3$"),
        Bad("kind-negative", put(kind=-1), rf"^{op}: kind must be 0 .*, got -1$"),
    ]


def fwd_bad():
    op = "vi_weight_kl"
    mix = rf"^{op}: (\w+ is on cpu, expected CUDA|\w+ is on (cpu|cuda:0) but \w+ is on (cpu|cuda:0)|rng must be .*)$"
    return common_bad(op) + placement(op, "mu", "rho", device=mix) + placement(op, "rho", "mu", device=mix)


def bwd_bad():
    op = "vi_weight_kl_backward_"
    mix = (rf"^{op}: (\w+ is on cpu, expected CUDA|\w+ is on (cpu|cuda:0) but \w+ is on (cpu|cuda:0)|rng must be .*"
           rf"|kl_grad must be .*)$")
    grad_msg = rf"^{op}: kl_grad must be a 0-dim float64, float32, float16 or bfloat16 tensor on .*$"
    return common_bad(op) + [
        Bad("grad_rho-dtype", put(grad_rho=lambda a, d: a["grad_rho"].double()),
            rf"^{op}: rho has dtype Float but grad_rho has Double$"),
        Bad("grad_mu-shape", put(grad_mu=lambda a, d: a["grad_mu"].t().contiguous()),
            rf"^{op}: rho has shape \[4, 5\] but grad_mu has shape \[5, 4\]$"),
        Bad("kl_grad-vector", put(kl_grad=lambda a, d: torch.ones(1, device=d)), grad_msg),
        Bad("kl_grad-int", put(kl_grad=lambda a, d: torch.tensor(1, device=d)), grad_msg),
        Bad("grad_rho-expanded", put(grad_rho=lambda a, d: torch.zeros((), device=d).expand(4, 5)),
            rf"^{op}: grad_rho has internal overlap"),
        Bad("grad_mu-as-strided", put(grad_mu=lambda a, d: self_overlapping(device=d), grad_rho=lambda a, d: a["grad_rho"][:3, :2],
                                      mu=lambda a, d: a["mu"][:3, :2], rho=lambda a, d: a["rho"][:3, :2]),
            rf"^{op}: grad_mu has internal overlap"),
        Bad("grad_mu-is-grad_rho", lambda a, d: dict(a, grad_mu=a["grad_rho"]),
            rf"^{op}: (grad_rho overlaps grad_mu|grad_mu overlaps grad_rho) \(the same memory twice in one call\)"),
        Bad("grad_rho-is-mu", lambda a, d: dict(a, grad_rho=a["mu"]),
            rf"^{op}: (grad_rho overlaps mu|mu overlaps grad_rho) \(the same memory twice in one call\)"),
    ] + (placement(op, "grad_rho", "grad_mu", device=mix) + placement(op, "grad_mu", "grad_rho", device=mix)
         + placement(op, "kl_grad", "grad_rho", device=mix, sparse=False))


def post_fwd(case, calls, outs, after):
    """(w, kl): w a new contiguous tensor of mu's shape and dtype, bit for bit vi_sample /
    vi_sigma_sq (CPU; CUDA to 1e-6), kl vi_kl's (1e-6); inputs unchanged."""
    for c, (w, kl), a in zip(calls, outs, after):
        assert w.is_contiguous() and w.shape == c["mu"].shape and w.dtype == c["mu"].dtype
        assert kl.dim() == 0 and kl.dtype == (torch.float64 if c["mu"].dtype == torch.float64 else torch.float32)
        k, mu, rho = c["kind"], c["mu"], c["rho"]
        want = {0: lambda: ops.vi_sample(mu, rho, c["rng"], c["stream"], backend="native"),
                1: lambda: ops.vi_sample(torch.zeros_like(mu), rho, c["rng"], c["stream"], backend="native"),
                2: lambda: ops.vi_sigma_sq(rho, backend="native")}[k]()
        exact = w.device.type == "cpu"
        torch.testing.assert_close(w, want, equal_nan=True, **(dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)))
        if mu.numel():
            pv = torch.tensor([c["prior_var"]], dtype=torch.float64, device=mu.device)
            torch.testing.assert_close(kl, ops.vi_kl([mu], [rho], pv, backend="native"), rtol=1e-6, atol=1e-6,
                                       equal_nan=True)
        else:
            assert kl.item() == 0
        for name in ("mu", "rho", "rng"):
            torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, equal_nan=True)


def post_bwd(case, calls, outs, after):
    """grad_rho, grad_mu: the data gradient (vi_sample_backward / vi_sigma_sq_backward_ of the entry
    grad_rho) plus vi_kl_backward's, grad_mu's base its entry value (kinds 1, 2) or grad_rho's (0);
    w as vi_weight_kl's or an empty [0]; inputs unchanged."""
    for c, w, a in zip(calls, outs, after):
        k, mu, rho, rng, s = c["kind"], c["mu"], c["rho"], c["rng"], c["stream"]
        if c["want_w"]:
            torch.testing.assert_close(w, ops.vi_weight_kl(mu, rho, rng, s, c["prior_var"], k, backend="native")[0],
                                       rtol=0, atol=0, equal_nan=True)
        else:
            assert w.shape == (0,) and w.dtype == mu.dtype
        if not mu.numel():
            continue
        if k == 2:
            data = ops.vi_sigma_sq_backward_(c["grad_rho"].clone(), rho, backend="native")
        else:
            data = ops.vi_sample_backward(c["grad_rho"], rho, rng, s, backend="native")
        pv = torch.tensor([c["prior_var"]], dtype=torch.float64, device=mu.device)
        gkm, gkr = ops.vi_kl_backward(c["kl_grad"], [mu], [rho], pv, backend="native")
        base = c["grad_rho"] if k == 0 else c["grad_mu"]
        t = TOL[mu.dtype] if mu.dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["grad_rho"], data + gkr[0], equal_nan=True, **t)
        torch.testing.assert_close(a["grad_mu"], base + gkm[0], equal_nan=True, **t)
        for name in ("mu", "rho", "rng", "kl_grad"):
            torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, equal_nan=True)


def spec(op, backward, post, seed):
    opcheck = [opcheck_for(backward, torch.float64, (33,), 2), opcheck_for(backward, torch.bfloat16, (2, 3, 5), 0),
               opcheck_for(backward, torch.float16, (0,), 1)]
    return OpSpec(op, grid=GRID, make=make_for(backward), good=good_for(backward),
                  bad=bwd_bad() if backward else fwd_bad(), post=post, tol=tol, seed=seed, opcheck=opcheck)


class TestViWeightKl(OpContract):
    spec = spec("vi_weight_kl", False, post_fwd, 51)


class TestViWeightKlBackward(OpContract):
    spec = spec("vi_weight_kl_backward_", True, post_bwd, 52)


# ---- closed forms ------------------------------------------------------------------------------
def _backends(device):
    return ["reference"] + (["native"] if ops.native_op("vi_weight_kl", device) else [])


class _WeightKl(torch.autograd.Function):
    """(w, kl) of one kind with the fused backward: gradcheck's function."""

    @staticmethod
    def forward(ctx, mu, rho, rng, kind, backend):
        ctx.save_for_backward(mu, rho, rng)
        ctx.kind, ctx.backend = kind, backend
        return ops.vi_weight_kl(mu, rho, rng, 3, 0.7, kind, backend=backend)

    @staticmethod
    def backward(ctx, gw, gkl):
        mu, rho, rng = ctx.saved_tensors
        gr, gm = gw.clone(), torch.zeros_like(mu)
        ops.vi_weight_kl_backward_(gr, gm, mu, rho, rng, 3, gkl, 0.7, ctx.kind, backend=ctx.backend)
        return gm, gr, None, None, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS3)
def test_gradcheck(device, kind):
    """torch.autograd.gradcheck (finite differences, float64) of (w, kl) with the fused backward, the
    noise fixed by the rng position, on both sides of the softplus threshold 20."""
    gen = torch.Generator().manual_seed(4)
    mu = (0.5 * torch.randn(30, generator=gen, dtype=torch.float64)).to(device)
    rho = torch.cat([2 * torch.randn(27, generator=gen, dtype=torch.float64) - 1,
                     torch.tensor([25.0, 19.0, -25.0], dtype=torch.float64)]).to(device)
    rng = rng_of(7, 2, device)
    for backend in _backends(device):
        assert torch.autograd.gradcheck(lambda m, r: _WeightKl.apply(m, r, rng, kind, backend),
                                        (mu.clone().requires_grad_(True), rho.clone().requires_grad_(True)))


@pytest.mark.parametrize("device", DEVICES)
def test_kl_and_its_gradient_are_vi_kl_and_vi_kl_backward(device):
    """With a zero weight gradient the op's grad_rho / grad_mu (kind 1: grad_mu's entry 0) are
    vi_kl_backward's, and the forward's KL is vi_kl's, over 40 003 elements (many pieces)."""
    gen = torch.Generator().manual_seed(9)
    mu = (0.2 * torch.randn(40_003, generator=gen)).to(device)
    rho = (3 * torch.randn(40_003, generator=gen) - 3).to(device)
    rng, g = rng_of(3, 4, device), torch.tensor(-1.25, device=device)
    pv = torch.tensor([2.5], dtype=torch.float64, device=device)
    for backend in _backends(device):
        _, kl = ops.vi_weight_kl(mu, rho, rng, 0, 2.5, 1, backend=backend)
        torch.testing.assert_close(kl, ops.vi_kl([mu], [rho], pv, backend=backend), rtol=1e-6, atol=0)
        gr, gm = torch.zeros_like(mu), torch.zeros_like(mu)
        ops.vi_weight_kl_backward_(gr, gm, mu, rho, rng, 0, g, 2.5, 1, backend=backend)
        want_m, want_r = ops.vi_kl_backward(g, [mu], [rho], pv, backend=backend)
        torch.testing.assert_close(gm, want_m[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gr, want_r[0], rtol=1e-6, atol=1e-7)


def test_kl_does_not_depend_on_the_thread_count():
    """The forward's KL is summed in pieces fixed from element 0: bit for bit with 1 and 2 threads."""
    if not ops.native_op("vi_weight_kl", "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(2)
    mu, rho = 0.1 * torch.randn(300_001, generator=gen), torch.randn(300_001, generator=gen) - 4
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.vi_weight_kl(mu, rho, rng_of(1, 1), 0, 1.0, 0)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_a_refused_call_writes_nothing():
    """Checks run before any write: grad_rho / grad_mu keep their values when the call is refused."""
    mu, rho = torch.randn(4, 5), torch.randn(4, 5)
    for bad in (dict(prior_var=-1.0), dict(kind=5), dict(kl_grad=torch.ones(2)), dict(rho=torch.randn(4, 6)),
                dict(stream=2**32)):
        gr, gm = torch.randn(4, 5), torch.randn(4, 5)
        before = gr.clone(), gm.clone()
        args = bwd_call(gr, gm, mu, rho, rng_of(1, 1), 0, 0, torch.tensor(1.0))
        args.update(bad)
        for backend in _backends("cpu"):
            with pytest.raises(RuntimeError):
                ops.vi_weight_kl_backward_(**args, backend=backend)
            assert torch.equal(gr, before[0]) and torch.equal(gm, before[1])
