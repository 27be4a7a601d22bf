"""The vi family, section 3 (the local reparameterisation's weight variance): vi_sigma_sq,
vi_sigma_sq_backward_ (in place over grad) and vi_sigma_sq_and_backward_. The op contract of each
against the reference (torch's F.softplus and sigmoid in the op math type), the combined op bit for
bit the two single ones, and the closed forms: the backward is the derivative of the forward (torch
autograd through F.softplus(rho)^2 in float64, and gradcheck), on both sides of the softplus
threshold 20. CUDA against the CPU op: tests/test_ops_vi_cuda.py.

Tolerances. The CPU kernels evaluate exp and log1p by vectorised polynomials (csrc/cpu/vi.cpp),
within ~2 ulp of libm's, so results agree with torch's to ~1e-6 relative in float32 and ~1e-14 in
float64; fp16 / bf16 round the same float32 value, an ulp apart at most.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pyfastbayes import ops

from _helpers import ALL_DTYPES, DEVICES, TOL, Bad, OpContract, OpSpec, expanded_like, placement, put, self_overlapping

# shapes: one element, a few, 2-D, past one CPU task (16 384 elements) and several 1024-element pieces, 0-dim
SHAPES = [(1,), (3,), (5,), (13, 79), (40_003,), ()]


def tol(t):
    if t.dtype == torch.float32:
        return dict(rtol=2e-6, atol=1e-30)
    if t.dtype == torch.float64:
        return dict(rtol=1e-13, atol=1e-300)
    return TOL[t.dtype]


def values(shape, dtype, gen, specials=True):
    """(rho, grad) on the CPU: rho ~ 3 N(0, 1) (sigma from ~1e-4 to ~10), grad ~ N(0, 1); with >= 10
    elements, rho at / across the threshold 20, -30, +-inf, NaN and a NaN grad."""
    rho = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    if specials and rho.numel() >= 10:
        r, g = rho.view(-1), grad.view(-1)
        r[:8] = torch.tensor([25.0, -30.0, 20.0, 21.0, -math.inf, math.inf, math.nan, 19.5], dtype=torch.float64)
        g[8] = math.nan
        g[9] = 0.0
    return rho.to(dtype), grad.to(dtype)


def views(device, dtype, gen, with_grad):
    """Non-contiguous inputs: transposed, strided, channels_last (grad, written in place, too); each
    call its own tensors (a grad shared by two calls would carry the first call's writes over)."""
    r1, g1 = values((30, 40), dtype, gen)
    r2, g2 = values((9, 14), dtype, gen)
    r3, g3 = values((2, 3, 4, 5), dtype, gen)
    r4, g4 = values((9, 14), dtype, gen)
    cl = lambda t: t.to(device).contiguous(memory_format=torch.channels_last)  # noqa: E731
    pairs = [(r1.to(device).t(), g1.t().contiguous().to(device)), (r2.to(device)[:, ::3], g2.to(device)[:, 1::3]),
             (cl(r3), cl(g3)), (r4.t().contiguous().to(device), g4.to(device).t())]
    return [dict(grad=g, rho=r) if with_grad else dict(rho=r) for r, g in pairs]


def make_for(with_grad):
    def make(case, device, dtype, gen):
        if case == "random":
            calls = []
            for shape in SHAPES:
                r, g = values(shape, dtype, gen)
                calls.append(dict(grad=g.to(device), rho=r.to(device)) if with_grad else dict(rho=r.to(device)))
            return calls
        if case == "empty":
            z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
            return [dict(grad=z(0), rho=z(0)), dict(grad=z(3, 0), rho=z(3, 0))] if with_grad else \
                [dict(rho=z(0)), dict(rho=z(3, 0))]
        return views(device, dtype, gen, with_grad)
    return make


def good_for(with_grad):
    def good(device):
        r, g = values((4, 5), torch.float32, torch.Generator().manual_seed(5), specials=False)
        return dict(grad=g.to(device), rho=r.to(device)) if with_grad else dict(rho=r.to(device))
    return good


def opcheck_for(with_grad, dtype, shape):
    def args(device):
        r, g = values(shape, dtype, torch.Generator().manual_seed(6), specials=False)
        return dict(grad=g.to(device), rho=r.to(device)) if with_grad else dict(rho=r.to(device))
    return args


def rho_bad(op):
    return [
        Bad("rho-int", put(rho=lambda a, d: a["rho"].long()),
            rf"^{op}: rho must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("rho-bool", put(rho=lambda a, d: a["rho"] > 0),
            rf"^{op}: rho must be float64, float32, float16 or bfloat16, got Bool$"),
        Bad("rho-complex", put(rho=lambda a, d: a["rho"].to(torch.complex64)),
            rf"^{op}: rho must be float64, float32, float16 or bfloat16, got ComplexFloat$"),
    ]


def grad_bad(op):
    mix = rf"^{op}: (rho is on cpu, expected CUDA|grad is on (cpu|cuda:0) but rho is on (cpu|cuda:0))$"
    return rho_bad(op) + [
        Bad("grad-dtype", put(grad=lambda a, d: a["grad"].double()), rf"^{op}: grad has dtype Double but rho has Float$"),
        Bad("grad-int", put(grad=lambda a, d: a["grad"].long()), rf"^{op}: grad has dtype Long but rho has Float$"),
        Bad("grad-shape", put(grad=lambda a, d: a["grad"][:3]),
            rf"^{op}: grad has shape \[3, 5\] but rho has shape \[4, 5\]$"),
        Bad("grad-transposed-shape", put(grad=lambda a, d: a["grad"].t().contiguous()),
            rf"^{op}: grad has shape \[5, 4\] but rho has shape \[4, 5\]$"),
        Bad("grad-expanded", put(grad=lambda a, d: expanded_like(a["grad"])), rf"^{op}: grad has internal overlap"),
        Bad("grad-as-strided", put(grad=lambda a, d: self_overlapping(device=d), rho=lambda a, d: a["rho"][:3, :2]),
            rf"^{op}: grad has internal overlap"),
        Bad("grad-is-rho", lambda a, d: dict(a, grad=a["rho"]),
            rf"^{op}: (rho overlaps grad|grad overlaps rho) \(the same memory twice in one call\)"),
    ] + placement(op, "grad", "rho", device=mix) + placement(op, "rho", "grad", device=mix)


def post_single(case, calls, outs, after):
    """vi_sigma_sq: a new contiguous tensor of rho's shape and dtype; rho unchanged."""
    for c, out, a in zip(calls, outs, after):
        assert out.is_contiguous() and out.shape == c["rho"].shape and out.dtype == c["rho"].dtype
        assert out.numel() == 0 or out.data_ptr() != a["rho"].data_ptr()
        torch.testing.assert_close(a["rho"], c["rho"], rtol=0, atol=0, equal_nan=True)


def post_backward(case, calls, outs, after):
    """vi_sigma_sq_backward_: returns grad itself, rho unchanged."""
    for c, out, a in zip(calls, outs, after):
        assert out is a["grad"]
        torch.testing.assert_close(a["rho"], c["rho"], rtol=0, atol=0, equal_nan=True)


def post_combined(case, calls, outs, after):
    """vi_sigma_sq_and_backward_: sigma^2 and the updated grad bit for bit the two native ops' results;
    rho unchanged."""
    for c, s2, a in zip(calls, outs, after):
        want_s2 = ops.vi_sigma_sq(c["rho"], backend="native")
        want_g = ops.vi_sigma_sq_backward_(c["grad"].clone(), c["rho"], backend="native")
        exact = dict(rtol=0, atol=0)  # one loop (CPU) / one kernel (CUDA) for the three ops, the same expressions
        assert s2.is_contiguous() and s2.shape == c["rho"].shape and s2.dtype == c["rho"].dtype
        torch.testing.assert_close(s2, want_s2, equal_nan=True, **exact)
        torch.testing.assert_close(a["grad"], want_g, equal_nan=True, **exact)
        torch.testing.assert_close(a["rho"], c["rho"], rtol=0, atol=0, equal_nan=True)


def spec(op, with_grad, post, seed):
    return OpSpec(op, grid=ALL_DTYPES, make=make_for(with_grad), good=good_for(with_grad),
                  bad=grad_bad(op) if with_grad else rho_bad(op) + placement(op, "rho", "rho", meta=False),
                  post=post, tol=tol, seed=seed,
                  opcheck=[opcheck_for(with_grad, torch.float64, (33,)), opcheck_for(with_grad, torch.bfloat16, (2, 3, 5)),
                           opcheck_for(with_grad, torch.float16, (0,))])


class TestViSigmaSq(OpContract):
    spec = spec("vi_sigma_sq", False, post_single, 41)


class TestViSigmaSqBackward(OpContract):
    spec = spec("vi_sigma_sq_backward_", True, post_backward, 42)


class TestViSigmaSqAndBackward(OpContract):
    spec = spec("vi_sigma_sq_and_backward_", True, post_combined, 43)


# ---- closed forms ------------------------------------------------------------------------------
def _backends(op, device):
    return ["reference"] + (["native"] if ops.native_op(op, device) else [])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_autograd_through_softplus_squared(device):
    """vi_sigma_sq_backward_(grad, rho) == torch.autograd.grad(F.softplus(rho)^2, rho, grad) in float64,
    over rho from -60 to 60 (both sides of the threshold, where softplus' is exactly 1 above 20)."""
    rho = torch.cat([torch.linspace(-60, 60, 4001, dtype=torch.float64), torch.tensor([20.0, 19.999, 20.001],
                                                                                      dtype=torch.float64)]).to(device)
    grad = torch.randn(rho.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    r = rho.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.softplus(r).square(), r, grad)
    for backend in _backends("vi_sigma_sq_backward_", device):
        got = ops.vi_sigma_sq_backward_(grad.clone(), rho, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
        torch.testing.assert_close(ops.vi_sigma_sq(rho, backend=backend), F.softplus(rho).square(), rtol=1e-13, atol=0)


class _SigmaSq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rho, backend):
        ctx.save_for_backward(rho)
        ctx.backend = backend
        return ops.vi_sigma_sq(rho, backend=backend)

    @staticmethod
    def backward(ctx, g):
        (rho,) = ctx.saved_tensors
        return ops.vi_sigma_sq_backward_(g.clone(), rho, backend=ctx.backend), None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck(device, backend):
    """torch.autograd.gradcheck (finite differences in float64) of vi_sigma_sq with its backward."""
    if backend == "native" and not ops.native_op("vi_sigma_sq", device):
        pytest.skip("no native kernel")
    rho = (3 * torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).to(device)
    rho = torch.cat([rho, torch.tensor([25.0, 19.0, -25.0], dtype=torch.float64, device=device)])
    assert torch.autograd.gradcheck(lambda r: _SigmaSq.apply(r, backend), (rho.requires_grad_(True),))


def test_a_refused_call_leaves_grad_unchanged():
    """Checks run before any write: a grad of the wrong dtype / shape or overlapping rho is not touched."""
    rho = torch.randn(4, 5)
    buf = torch.randn(40)
    for bad_grad, other in ((torch.randn(4, 5, dtype=torch.float64), rho), (torch.randn(4, 6), rho), (rho, rho),
                            (buf[:20].view(4, 5), buf[10:30].view(4, 5))):  # dtype, shape, rho itself, half shared
        before, other_before = bad_grad.clone(), other.clone()
        for backend in _backends("vi_sigma_sq_backward_", "cpu"):
            for op in (ops.vi_sigma_sq_and_backward_, ops.vi_sigma_sq_backward_):
                with pytest.raises(RuntimeError):
                    op(bad_grad, other, backend=backend)
                assert torch.equal(bad_grad, before) and torch.equal(other, other_before)


# ---- the local estimator's autograd node against plain autograd ---------------------------------
_LOCAL_CASES = {
    "linear": ("linear", {}, (5, 7), (3, 7)),
    "linear-3d": ("linear", {}, (2, 5, 7), (3, 7)),
    "conv": ("conv2d", dict(stride=(2, 2), padding=(1, 1), groups=2), (2, 4, 9, 9), (6, 2, 3, 3)),
}


@pytest.mark.parametrize("case", list(_LOCAL_CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_local_moments_gradients_for_every_needs_input_grad(case, bias):
    """LocalMoments (the 'local' layer's mean and variance, sigma^2 from the native ops) against autograd
    through affine(x, mu, b) and affine(x^2, softplus(rho)^2, softplus(rho_b)^2), float64, for every
    combination of the inputs that need a gradient (the first layer's x does not; a frozen rho or bias
    takes other branches), with upstream gradients on both outputs and on one only."""
    import itertools

    from pyfastbayes.vi._functions import Affine, LocalMoments

    kind, kw, xs, ws = _LOCAL_CASES[case]
    affine = Affine(kind, **kw)
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n_in = 5 if bias else 3
    for req in itertools.product([False, True], repeat=n_in):
        if not any(req):
            continue
        rho = 3 * rnd(ws)
        rho.view(-1)[0] = 25.0  # above the softplus threshold
        ins = [rnd(xs), 0.3 * rnd(ws), rho] + ([rnd(ws[0]), 3 * rnd(ws[0])] if bias else [None, None])
        for t, r in zip(ins, req):
            t.requires_grad_(r)
        want_inputs = [t for t in ins if t is not None and t.requires_grad]
        mean, var = LocalMoments.apply(*ins, affine)
        sb2 = None if ins[4] is None else F.softplus(ins[4]).square()
        mean_r, var_r = affine(ins[0], ins[1], ins[3]), affine(ins[0].square(), F.softplus(ins[2]).square(), sb2)
        torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, var_r, rtol=1e-12, atol=1e-12)
        gm, gv = rnd(mean.shape), rnd(var.shape)
        for use in ("both", "mean", "var"):
            got_out = [o for o, u in ((mean, "mean"), (var, "var")) if use in (u, "both")]
            ref_out = [o for o, u in ((mean_r, "mean"), (var_r, "var")) if use in (u, "both")]
            grads = [g for g, u in ((gm, "mean"), (gv, "var")) if use in (u, "both")]
            if not any(o.requires_grad for o in ref_out):
                continue
            got = torch.autograd.grad(got_out, want_inputs, grads, allow_unused=True, retain_graph=True)
            want = torch.autograd.grad([o for o in ref_out if o.requires_grad],
                                       want_inputs, [g for o, g in zip(ref_out, grads) if o.requires_grad],
                                       allow_unused=True, retain_graph=True)
            for i, (a, b) in enumerate(zip(got, want)):
                a = torch.zeros_like(want_inputs[i]) if a is None else a
                b = torch.zeros_like(want_inputs[i]) if b is None else b
                assert a.dtype == b.dtype and a.shape == b.shape, (case, bias, req, use, i)
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{case} {bias} {req} {use} {i}: {m}")
