"""The vi family, section 1 (reparameterised noise): vi_sample, vi_sample_backward, vi_local_noise,
vi_local_noise_backward, vi_rademacher_. The op contract of each against the reference (which
draws eps from the random family's reference philox_normal), and closed forms: sigma ~ 0 gives mu,
the noise is philox_normal_'s stream bit for bit (CPU, fp32), the backward ops are the derivatives
of the forward ones (finite differences in fp64, torch autograd), the rng position is read (seed's
64 bits, the step's low 32) and never advanced, the signs are +-1, balanced and reproducible.
CUDA against the CPU op: tests/test_ops_vi_cuda.py.

Tolerances. The kernels' eps comes from fp32 polynomials (csrc/common/fastmath.h), the reference's
from float64 Box-Muller rounded to fp32: they differ by up to ~2e-6 absolute (the philox_normal_
tests' tolerance). Both are float32 numbers in every dtype, so a float64 result can agree with the
reference only to ~2e-6 * |the noise term|; given the kernel's own eps (ops.philox_normal_) the
float64 results agree to 1e-12 (test_*_float64_given_the_same_eps). fp16 / bf16 results round the
same fp32 value, one ulp apart at most.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from pyfastbayes import _reference as R
from pyfastbayes import ops

from _helpers import (ALL_DTYPES, DEVICES, TOL, Bad, OpContract, OpSpec, expanded_like, placement, put,
                      self_overlapping)

# (seed, stream, step): zeros, the largest int64 seed, a negative seed (its two's complement is the
# key) with the largest stream and uint32 step, and a step past 2^32 (only its low 32 bits count)
POSITIONS = [(0, 0, 0), (2**63 - 1, 7, 3), (-5, 2**32 - 1, 2**32 - 1), (123, 5, 2**32 + 9)]
# shapes: one element, tails of a Philox block, 2-D, past one CPU task (4096 blocks) and several
# kViBuf pieces, a 0-dim tensor
SHAPES = [(1,), (3,), (4,), (5,), (2, 4), (13, 79), (40_003,), ()]
# op -> (first input, second input, kind of the second input)
PAIR_OPS = {
    "vi_sample": ("mu", "rho", "rho"),
    "vi_sample_backward": ("grad_w", "rho", "rho"),
    "vi_local_noise": ("mean", "var", "var"),
    "vi_local_noise_backward": ("grad_out", "var", "var"),
}


def rng_of(seed, step, device="cpu"):
    return torch.tensor([seed, step], dtype=torch.int64, device=device)


def backends(op, device):
    return ["reference"] + (["native"] if ops.native_op(op, device) else [])


def native_eps(shape, seed, stream, step, device="cpu"):
    """The kernels' own noise: ops.philox_normal_ (fp32) of the same position."""
    z = torch.empty(shape, device=device)
    ops.philox_normal_(z, seed, stream, step)
    return z


def pair_values(kind, shape, dtype, gen, specials=True):
    """(a, b) on the CPU: a ~ N(0, 1); b = rho ~ 3 N(0, 1) or var ~ 2 U(0, 1), with edge values when
    there are >= 8 elements: rho above / at / across the softplus threshold 20 (a = 0 there: the noise
    term alone), -30, +-inf, NaN in b and in a; var = 0, a tiny negative (rounding), NaN, +inf, 1e-30."""
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "rho":
        b = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        edge = [25.0, -30.0, 20.0, 21.0, -math.inf, math.inf, math.nan, 0.5]
    else:
        b = 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
        edge = [0.0, -1e-7, math.nan, math.inf, 1e-30, 0.0, 1.0, 0.5]
    if specials and a.numel() >= 8:
        af, bf = a.view(-1), b.view(-1)
        bf[:8] = torch.tensor(edge, dtype=torch.float64)
        af[:6] = 0.0
        af[7] = math.nan
    return a.to(dtype), b.to(dtype)


def pair_tol(t):
    # eps: ~2e-6 apart (see the module docstring) times a noise scale up to ~25 (rho = 25 with mu = 0,
    # so relative); fp16 / bf16: the rounding of the same fp32 value, an ulp apart
    if t.dtype in (torch.float32, torch.float64):
        return dict(rtol=1e-5, atol=2e-5)
    return TOL.get(t.dtype, dict(rtol=0, atol=0))  # rng (int64): unchanged


def pair_spec(op):
    an, bn, kind = PAIR_OPS[op]

    def call(a, b, rng, stream):
        return {an: a, bn: b, "rng": rng, "stream": stream}

    def make(case, device, dtype, gen):
        if case == "random":
            calls = []
            for shape in SHAPES:
                for seed, stream, step in POSITIONS:
                    a, b = pair_values(kind, shape, dtype, gen)
                    calls.append(call(a.to(device), b.to(device), rng_of(seed, step, device), stream))
            return calls
        if case == "empty":
            return [call(torch.zeros(0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device),
                         rng_of(1, 2, device), 3),
                    call(torch.zeros(3, 0, dtype=dtype, device=device), torch.zeros(3, 0, dtype=dtype, device=device),
                         rng_of(-1, 0, device), 0)]
        # views: transposed, strided, a stride-0 (expanded) first input (e.g. a zero mean), channels_last
        a1, b1 = pair_values(kind, (30, 40), dtype, gen)
        a2, b2 = pair_values(kind, (9, 14), dtype, gen)
        b3 = pair_values(kind, (5, 6), dtype, gen)[1]
        a4, b4 = pair_values(kind, (2, 3, 4, 5), dtype, gen)
        cl = lambda t: t.to(device).contiguous(memory_format=torch.channels_last)  # noqa: E731
        return [call(a1.to(device).t(), b1.t().contiguous().to(device), rng_of(11, 9, device), 2),
                call(a2.to(device)[:, 1::3], b2.to(device)[:, ::3], rng_of(-3, 1, device), 5),
                call(torch.zeros((), dtype=dtype, device=device).expand(5, 6), b3.to(device), rng_of(4, 4, device), 1),
                call(cl(a4), cl(b4), rng_of(8, 2**32 + 1, device), 2**32 - 1)]

    def good(device):
        gen = torch.Generator().manual_seed(5)
        a, b = pair_values(kind, (4, 5), torch.float32, gen, specials=False)
        return call(a.to(device), b.to(device), rng_of(11, 3, device), 2)

    def post(case, calls, outs, after):
        """A new contiguous result of the first input's shape and dtype; every input (rng included:
        the ops never advance it) unchanged."""
        for c, out, a in zip(calls, outs, after):
            assert out.is_contiguous() and out.shape == c[an].shape and out.dtype == c[an].dtype
            assert out.data_ptr() not in (a[an].data_ptr(), a[bn].data_ptr()) or out.numel() == 0
            for name in (an, bn, "rng"):
                torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, equal_nan=True)

    mix = (rf"^{op}: ({an} is on cpu, expected CUDA|{bn} is on cpu but {an} is on cuda:0"
           rf"|rng must be a contiguous int64 \[2\] = \(seed, step\) on cuda:0)$")
    rng_msg = rf"^{op}: rng must be a contiguous int64 \[2\] = \(seed, step\) on cpu$"
    bad = [
        Bad(f"{an}-int", put(**{an: lambda a, d: a[an].long()}),
            rf"^{op}: {an} must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("both-int", put(**{an: lambda a, d: a[an].long(), bn: lambda a, d: a[bn].long()}),
            rf"^{op}: {an} must be float64, float32, float16 or bfloat16, got Long$"),
        Bad(f"{an}-bool", put(**{an: lambda a, d: a[an] > 0, bn: lambda a, d: a[bn] > 0}),
            rf"^{op}: {an} must be float64, float32, float16 or bfloat16, got Bool$"),
        Bad(f"{an}-complex", put(**{an: lambda a, d: a[an].to(torch.complex64)}),
            rf"^{op}: {an} must be float64, float32, float16 or bfloat16, got ComplexFloat$"),
        Bad(f"{bn}-dtype", put(**{bn: lambda a, d: a[bn].double()}),
            rf"^{op}: {bn} has dtype Double but {an} has Float$"),
        Bad(f"{bn}-half", put(**{bn: lambda a, d: a[bn].half()}), rf"^{op}: {bn} has dtype Half but {an} has Float$"),
        Bad(f"{bn}-shape", put(**{bn: lambda a, d: a[bn][:3]}),
            rf"^{op}: {bn} has shape \[3, 5\] but {an} has shape \[4, 5\]$"),
        Bad(f"{bn}-broadcastable", put(**{bn: lambda a, d: a[bn][:1]}),
            rf"^{op}: {bn} has shape \[1, 5\] but {an} has shape \[4, 5\]$"),
        Bad(f"{bn}-transposed-shape", put(**{bn: lambda a, d: a[bn].t()}),
            rf"^{op}: {bn} has shape \[5, 4\] but {an} has shape \[4, 5\]$"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)), rng_msg.replace("cpu", ".*")),
        Bad("rng-1", put(rng=lambda a, d: torch.tensor([7], device=d)), rng_msg.replace("cpu", ".*")),
        Bad("rng-int32", put(rng=lambda a, d: a["rng"].int()), rng_msg.replace("cpu", ".*")),
        Bad("rng-float", put(rng=lambda a, d: a["rng"].double()), rng_msg.replace("cpu", ".*")),
        Bad("rng-2d", put(rng=lambda a, d: a["rng"][None]), rng_msg.replace("cpu", ".*")),
        Bad("rng-strided", put(rng=lambda a, d: torch.tensor([1, 0, 2, 0], device=d)[::2]),
            rng_msg.replace("cpu", ".*")),
        Bad("stream-negative", put(stream=-1), rf"^{op}: stream must be in \[0, 2\^32\), got -1$"),
        Bad("stream-2^32", put(stream=2**32), rf"^{op}: stream must be in \[0, 2\^32\), got 4294967296$"),
    ] + placement(op, an, bn, device=mix) + placement(op, bn, an, device=mix) + placement(op, "rng", an, device=mix)

    def opcheck_args(dtype, shape):
        def args(device):
            gen = torch.Generator().manual_seed(6)
            a, b = pair_values(kind, shape, dtype, gen, specials=False)
            return call(a.to(device), b.to(device), rng_of(-9, 2, device), 7)
        return args

    return OpSpec(op, grid=ALL_DTYPES, make=make, good=good, bad=bad, post=post, tol=pair_tol, seed=len(op),
                  opcheck=[opcheck_args(torch.float64, (33,)), opcheck_args(torch.bfloat16, (2, 3, 5)),
                           opcheck_args(torch.float16, (0,))])


class TestViSample(OpContract):
    spec = pair_spec("vi_sample")


class TestViSampleBackward(OpContract):
    spec = pair_spec("vi_sample_backward")


class TestViLocalNoise(OpContract):
    spec = pair_spec("vi_local_noise")


class TestViLocalNoiseBackward(OpContract):
    spec = pair_spec("vi_local_noise_backward")


# ---- vi_rademacher_ ----------------------------------------------------------------------------
RADEMACHER_DTYPES = ALL_DTYPES


def rad_make(case, device, dtype, gen):
    if case == "random":
        return [dict(out=torch.empty(shape, dtype=dtype, device=device), rng=rng_of(seed, step, device), stream=stream)
                for shape in SHAPES for seed, stream, step in POSITIONS]
    if case == "empty":
        return [dict(out=torch.empty(0, dtype=dtype, device=device), rng=rng_of(1, 2, device), stream=3),
                dict(out=torch.empty(2, 0, 3, dtype=dtype, device=device), rng=rng_of(1, 2, device), stream=3)]
    return [dict(out=torch.zeros(40, 30, dtype=dtype, device=device).t(), rng=rng_of(11, 9, device), stream=2),
            dict(out=torch.zeros(7, 9, dtype=dtype, device=device)[:, 1:6], rng=rng_of(-3, 1, device), stream=5),
            dict(out=torch.zeros(2, 3, 4, 5, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last),
                 rng=rng_of(5, 5, device), stream=0)]


def rad_post(case, calls, outs, after):
    """The wrapper returns out itself, filled with +-1 only; rng unchanged."""
    for c, out, a in zip(calls, outs, after):
        assert out is a["out"]
        assert bool(((out == 1) | (out == -1)).all())
        assert torch.equal(a["rng"], c["rng"])


def _rng_in_out(a, d):
    """rng = the first 16 bytes of out's memory (an int64 view of it)."""
    base = torch.zeros(8, dtype=torch.float64, device=d)
    return dict(a, out=base[:6], rng=base.view(torch.int64)[:2])


_RAD_MIX = (r"^vi_rademacher_: (out is on cpu, expected CUDA"
            r"|rng must be a contiguous int64 \[2\] = \(seed, step\) on cuda:0)$")

VI_RADEMACHER = OpSpec(
    "vi_rademacher_", grid=RADEMACHER_DTYPES, make=rad_make, post=rad_post, seed=77,
    tol=lambda t: dict(rtol=0, atol=0),  # +-1 exactly, on both backends
    good=lambda device: dict(out=torch.empty(4, 5, device=device), rng=rng_of(11, 3, device), stream=2),
    opcheck=[lambda device: dict(out=torch.empty(37, dtype=torch.float64, device=device),
                                 rng=rng_of(-1, 2**32 + 3, device), stream=2**32 - 1),
             lambda device: dict(out=torch.zeros(6, 8, dtype=torch.bfloat16, device=device).t(),
                                 rng=rng_of(2, 1, device), stream=0)],
    bad=[
        Bad("out-int", put(out=lambda a, d: torch.zeros(5, dtype=torch.int64, device=d)),
            r"^vi_rademacher_: out must be floating point, got Long$"),
        Bad("out-bool", put(out=lambda a, d: torch.zeros(5, dtype=torch.bool, device=d)),
            r"^vi_rademacher_: out must be floating point, got Bool$"),
        Bad("out-complex", put(out=lambda a, d: torch.zeros(5, dtype=torch.complex64, device=d)),
            r"^vi_rademacher_: out must be floating point, got ComplexFloat$"),
        Bad("expanded-out", put(out=lambda a, d: expanded_like(torch.empty(6, device=d))),
            r"^vi_rademacher_: out has internal overlap"),
        Bad("as-strided-out", put(out=lambda a, d: self_overlapping(device=d)),
            r"^vi_rademacher_: out has internal overlap"),
        Bad("rng-in-out", _rng_in_out, r"^vi_rademacher_: rng overlaps out \(the same memory twice in one call\); "
            r"pass each tensor once$"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)),
            r"^vi_rademacher_: rng must be a contiguous int64 \[2\] = \(seed, step\) on "),
        Bad("rng-int32", put(rng=lambda a, d: a["rng"].int()), r"^vi_rademacher_: rng must be a contiguous int64"),
        Bad("rng-strided", put(rng=lambda a, d: torch.tensor([1, 0, 2, 0], device=d)[::2]),
            r"^vi_rademacher_: rng must be a contiguous int64"),
        Bad("stream-negative", put(stream=-2), r"^vi_rademacher_: stream must be in \[0, 2\^32\), got -2$"),
        Bad("stream-2^32", put(stream=2**32 + 5), r"^vi_rademacher_: stream must be in \[0, 2\^32\), got 4294967301$"),
    ] + placement("vi_rademacher_", "out", "rng", device=_RAD_MIX)
    + placement("vi_rademacher_", "rng", "out", device=_RAD_MIX))


class TestViRademacher(OpContract):
    spec = VI_RADEMACHER


# ---- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sample_with_sigma_zero_is_mu(device, dtype):
    """rho = -200 (sigma = exp(-200) ~ 1e-87, 0 in fp32) and -inf: w == mu to the bit."""
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(1001, generator=gen).to(dtype=dtype, device=device)
    rho = torch.full_like(mu, -200.0)
    rho[::7] = -math.inf
    for backend in backends("vi_sample", device):
        w = ops.vi_sample(mu, rho, rng_of(3, 4, device), 9, backend=backend)
        assert torch.equal(w, mu), backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,stream,step", POSITIONS)
def test_sample_noise_is_the_philox_normal_stream(device, seed, stream, step):
    """(w - mu) / softplus(rho) equals philox_normal_ of the same (seed, stream, step). Bit for bit on
    the CPU (fp32): mu = 0 and rho a power of two above the threshold, so softplus(rho) = rho and
    w = rho * eps are exact; to 1e-6 on CUDA (another kernel compiles the same Box-Muller code). With
    random mu, rho in fp64: (w - mu) / softplus(rho) = eps to the roundoff of the subtraction."""
    n = 4099
    gen = torch.Generator().manual_seed(2)
    z = native_eps((n,), seed, stream, step, device)
    rho = torch.tensor([32.0, 64.0, 1024.0, 2.0**40], device=device)[torch.randint(0, 4, (n,), generator=gen)]
    w = ops.vi_sample(torch.zeros(n, device=device), rho, rng_of(seed, step, device), stream)
    if device == "cpu" and ops.native_op("vi_sample", "cpu"):
        assert torch.equal(w / rho, z)
    torch.testing.assert_close(w / rho, z, rtol=1e-6, atol=2e-6)
    mu = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    rho = (3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(device)
    w = ops.vi_sample(mu, rho, rng_of(seed, step, device), stream)
    s = F.softplus(rho)
    if device == "cpu" and ops.native_op("vi_sample", "cpu"):  # the same eps: only the roundoff of w and w - mu
        err = ((w - mu) / s - z.double()).abs()
        assert bool((err <= 1e-14 * (1 + mu.abs() / s)).all()), float(err.max())
    torch.testing.assert_close((w - mu) / s, z.double(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_pair_ops_float64_given_the_same_eps(device):
    """Native float64 results equal the closed forms computed in float64 from the kernel's own eps
    to 1e-12. The kernel's eps is read back exactly from vi_sample(0, rho = 32) / 32 (softplus(32) =
    32, a power of two); it is philox_normal_'s stream (bit for bit on the CPU, to ~1e-6 on CUDA,
    where another kernel compiles the same Box-Muller code)."""
    if not ops.native_op("vi_sample", device):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(3)
    n, seed, stream, step = 5003, -77, 12, 40
    rng = rng_of(seed, step, device)
    f64 = dict(dtype=torch.float64, device=device)
    z = ops.vi_sample(torch.zeros(n, **f64), torch.full((n,), 32.0, **f64), rng, stream) / 32
    if device == "cpu":
        assert torch.equal(z, native_eps((n,), seed, stream, step, device).double())
    torch.testing.assert_close(z, native_eps((n,), seed, stream, step, device).double(), rtol=1e-6, atol=1e-6)
    a = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    rho = (4 * torch.randn(n, generator=gen, dtype=torch.float64)).to(device)
    rho[:4] = torch.tensor([20.0, 20.5, 19.5, 30.0])
    var = torch.rand(n, generator=gen, dtype=torch.float64).to(device) + 1e-3
    sig = torch.where(rho > 20, torch.ones_like(rho), torch.sigmoid(rho))
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(ops.vi_sample(a, rho, rng, stream), a + F.softplus(rho) * z)
    close(ops.vi_sample_backward(a, rho, rng, stream), a * z * sig)
    close(ops.vi_local_noise(a, var, rng, stream), a + var.sqrt() * z)
    close(ops.vi_local_noise_backward(a, var, rng, stream), a * z / (2 * var.sqrt()))


class _Sample(torch.autograd.Function):
    """w = vi_sample(mu, rho) with its backward from the ops (what a Bayesian layer does)."""

    @staticmethod
    def forward(ctx, mu, rho, rng, stream, backend):
        ctx.save_for_backward(rho, rng)
        ctx.stream, ctx.backend = stream, backend
        return ops.vi_sample(mu, rho, rng, stream, backend=backend)

    @staticmethod
    def backward(ctx, g):
        rho, rng = ctx.saved_tensors
        return g, ops.vi_sample_backward(g, rho, rng, ctx.stream, backend=ctx.backend), None, None, None


class _LocalNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, var, rng, stream, backend):
        ctx.save_for_backward(var, rng)
        ctx.stream, ctx.backend = stream, backend
        return ops.vi_local_noise(mean, var, rng, stream, backend=backend)

    @staticmethod
    def backward(ctx, g):
        var, rng = ctx.saved_tensors
        return g, ops.vi_local_noise_backward(g, var, rng, ctx.stream, backend=ctx.backend), None, None, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_sample_backward_is_the_derivative(device, backend):
    """torch.autograd.gradcheck (central finite differences, fp64) of vi_sample with vi_sample_backward
    as its derivative at a fixed rng, rho on both sides of the threshold 20 (the step 1e-6 does not
    cross it); and the same gradient as torch autograd through mu + F.softplus(rho) * eps."""
    if backend == "native" and not ops.native_op("vi_sample", device):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(4)
    n, stream = 23, 6
    rng = rng_of(2**40 + 3, 11, device)
    mu = torch.randn(n, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    rho = (3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(device)
    rho[:4] = torch.tensor([19.5, 20.5, 25.0, -8.0])
    rho.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, r: _Sample.apply(m, r, rng, stream, backend), (mu, rho),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    # the backend's own eps, read back exactly: w(mu = 0, rho = 32) / 32
    f64 = dict(dtype=torch.float64, device=device)
    z = ops.vi_sample(torch.zeros(n, **f64), torch.full((n,), 32.0, **f64), rng, stream, backend=backend) / 32
    want = torch.autograd.grad((mu + F.softplus(rho) * z).mul(g).sum(), rho)[0]
    got = torch.autograd.grad(_Sample.apply(mu, rho, rng, stream, backend).mul(g).sum(), rho)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert rng.tolist() == [2**40 + 3, 11]  # read, never advanced


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_local_noise_backward_is_the_derivative(device, backend):
    """gradcheck of vi_local_noise with vi_local_noise_backward (var well above 0, fp64); where
    var == 0 the gradient is 0 and where var < 0 (rounding) the output is mean and the gradient 0."""
    if backend == "native" and not ops.native_op("vi_local_noise", device):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(5)
    n, stream = 19, 2**31 + 1
    rng = rng_of(-1, 2**32 + 2, device)
    mean = torch.randn(n, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    var = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: _LocalNoise.apply(m, v, rng, stream, backend), (mean, var),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    v = torch.tensor([0.0, -1e-9, -0.0, 1.0], dtype=torch.float64, device=device)
    m = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=device)
    out = ops.vi_local_noise(m, v, rng, stream, backend=backend)
    assert out[:3].tolist() == [1.0, 2.0, 3.0] and out[3].item() != 4.0
    g = ops.vi_local_noise_backward(torch.ones_like(m), v, rng, stream, backend=backend)
    assert g[:3].tolist() == [0.0, 0.0, 0.0] and g[3].item() != 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(PAIR_OPS))
def test_rng_position_selects_the_noise(device, op):
    """Another step, seed or stream gives other noise; the step's bits above 32 do not count (the
    SG-MCMC kernels read it the same way); calls are reproducible; rng stays as it was."""
    an, bn, kind = PAIR_OPS[op]
    a, b = pair_values(kind, (257,), torch.float32, torch.Generator().manual_seed(6), specials=False)
    a, b = a.to(device), b.to(device) + 0.5
    for backend in backends(op, device):
        f = lambda seed, step, stream: getattr(ops, op)(a, b, rng_of(seed, step, device), stream,  # noqa: E731
                                                         backend=backend)
        base = f(3, 5, 1)
        assert torch.equal(f(3, 5, 1), base)
        assert torch.equal(f(3, 2**32 + 5, 1), base)
        for other in [f(3, 6, 1), f(4, 5, 1), f(3 + 2**32, 5, 1), f(3, 5, 2)]:
            assert (other != base).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_rademacher_values_balance_and_reproducibility(device):
    """n = 10^6 signs: each is +-1; the mean of each lane (word k of every block, so every word's top
    bit) is within 5 standard errors (5 / sqrt(n / 4)) of 0, the overall mean within 5 / sqrt(n);
    neighbouring signs are uncorrelated (5 / sqrt(n)); the same call repeats bit for bit, another
    stream or step gives other signs (uncorrelated), and the reference gives the same signs."""
    n = 1_000_000
    out = torch.empty(n, device=device)
    rng = rng_of(1234, 5, device)
    ops.vi_rademacher_(out, rng, 3)
    assert bool(((out == 1) | (out == -1)).all())
    assert abs(out.double().mean().item()) < 5 / math.sqrt(n)
    lanes = out.view(-1, 4).double()
    assert (lanes.mean(0).abs() < 5 / math.sqrt(n / 4)).all()
    assert abs((out[1:].double() * out[:-1].double()).mean().item()) < 5 / math.sqrt(n)
    again = torch.empty(n, device=device)
    ops.vi_rademacher_(again, rng, 3)
    assert torch.equal(again, out)
    for stream, step in [(4, 5), (3, 6)]:
        other = torch.empty(n, device=device)
        ops.vi_rademacher_(other, rng_of(1234, step, device), stream)
        assert abs((other.double() * out.double()).mean().item()) < 5 / math.sqrt(n)
    ref = torch.empty(n, device=device)
    ops.vi_rademacher_(ref, rng, 3, backend="reference")
    assert torch.equal(ref, out)
    assert rng.tolist() == [1234, 5]


def test_rademacher_is_the_top_bit_of_the_philox_words():
    """The documented rule, from the random family's philox4x32: element i is -1 iff bit 31 of word
    i % 4 of the block i // 4 under counter (block, stream, step) and key seed."""
    n, seed, stream, step = 41, -2, 9, 7
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64)
    ctr = torch.stack([blocks, torch.zeros_like(blocks), torch.full_like(blocks, stream),
                       torch.full_like(blocks, step)], 1)
    words = ops.philox4x32(ctr, seed & 0xFFFFFFFF, (seed % 2**64) >> 32).reshape(-1)[:n]
    want = torch.where(words >= 2**31, -1.0, 1.0)
    out = torch.empty(n)
    ops.vi_rademacher_(out, rng_of(seed, step), stream)
    assert torch.equal(out, want)


def test_rademacher_other_floating_dtypes():
    """Any floating dtype: float8 through the float32 temporary, fp64 non-contiguous."""
    rng = rng_of(8, 8)
    want = torch.empty(60)
    ops.vi_rademacher_(want, rng, 1)
    for dtype in [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]:
        out = torch.zeros(60, dtype=dtype)
        ops.vi_rademacher_(out, rng, 1)
        assert torch.equal(out.float(), want), dtype
    view = torch.zeros(6, 10, dtype=torch.float64).t()
    ops.vi_rademacher_(view, rng, 1)
    assert torch.equal(view.float().reshape(-1), want)


def test_half_dtypes_round_the_float32_result():
    """fp16 / bf16: the math runs in fp32 from the converted inputs and is rounded once, so the result
    is the fp32 op on the converted inputs, rounded (the same kernel, bit for bit)."""
    if not ops.native_op("vi_sample", "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(9)
    rng = rng_of(5, 6)
    for op, (an, bn, kind) in PAIR_OPS.items():
        for dtype in (torch.float16, torch.bfloat16):
            a, b = pair_values(kind, (777,), dtype, gen)
            f = getattr(ops, op)
            want = f(a.float(), b.float(), rng, 4).to(dtype)
            torch.testing.assert_close(f(a, b, rng, 4), want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{op}: {m}")


def test_reference_checks_match_the_messages():
    """A few refusals by hand: the reference's RuntimeError text is the kernels' (checks/vi.h)."""
    with pytest.raises(RuntimeError, match=re.escape("vi_sample: rho has shape [3] but mu has shape [2]")):
        R.vi_sample(torch.zeros(2), torch.zeros(3), rng_of(0, 0), 0)
    with pytest.raises(RuntimeError, match=re.escape("vi_local_noise: stream must be in [0, 2^32), got -1")):
        R.vi_local_noise(torch.zeros(2), torch.zeros(2), rng_of(0, 0), -1)
