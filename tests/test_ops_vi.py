"""The vi family, section 1 (reparameterised noise): vi_sample, vi_sample_backward, vi_local_noise,
vi_local_noise_backward, vi_rademacher_. The op contract of each against the reference (which
draws eps from the random family's reference philox_normal), and closed forms: sigma ~ 0 gives mu,
the noise is philox_normal_'s stream bit for bit (CPU, fp32), the backward ops are the derivatives
of the forward ones (finite differences in fp64, torch autograd), the rng position is read (seed's
64 bits, the step's low 32) and never advanced, the signs are +-1, balanced and reproducible.
Section 2 (vi_kl, vi_kl_backward: the closed-form KL over lists of tensors) at the end of the file.
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

from _helpers import (ALL_DTYPES, DEVICES, TOL, Bad, OpContract, OpSpec, expanded_like, meta_like, placement, put,
                      self_overlapping, tensors_of)

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
                call(torch.full((), 0.375, dtype=dtype, device=device).expand(5, 6), b3.to(device), rng_of(4, 4, device), 1),
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


# ---- vi_sample_and_backward: vi_sample and vi_sample_backward from one draw --------------------
SAB = "vi_sample_and_backward"


def sab_values(shape, dtype, gen, specials=True):
    mu, rho = pair_values("rho", shape, dtype, gen, specials)
    return mu, rho, torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def sab_call(mu, rho, grad_w, rng, stream):
    return dict(mu=mu, rho=rho, grad_w=grad_w, rng=rng, stream=stream)


def sab_make(case, device, dtype, gen):
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    if case == "random":
        return [sab_call(*on(*sab_values(shape, dtype, gen)), rng_of(seed, step, device), stream)
                for shape in SHAPES for seed, stream, step in POSITIONS]
    if case == "empty":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return [sab_call(z(0), z(0), z(0), rng_of(1, 2, device), 3),
                sab_call(z(3, 0), z(3, 0), z(3, 0), rng_of(-1, 0, device), 0)]
    m1, r1, g1 = sab_values((30, 40), dtype, gen)
    m2, r2, g2 = sab_values((9, 14), dtype, gen)
    m4, r4, g4 = sab_values((2, 3, 4, 5), dtype, gen)
    cl = lambda t: t.to(device).contiguous(memory_format=torch.channels_last)  # noqa: E731
    return [sab_call(m1.to(device).t(), r1.t().contiguous().to(device), g1.to(device).t(), rng_of(11, 9, device), 2),
            sab_call(m2.to(device)[:, 1::3], r2.to(device)[:, ::3], g2.to(device)[:, 1::3], rng_of(-3, 1, device), 5),
            sab_call(torch.full((), -0.625, dtype=dtype, device=device).expand(9, 14), r2.to(device), g2.to(device),
                     rng_of(4, 4, device), 1),
            sab_call(cl(m4), cl(r4), cl(g4), rng_of(8, 2**32 + 1, device), 2**32 - 1)]


def sab_good(device):
    gen = torch.Generator().manual_seed(5)
    return sab_call(*[t.to(device) for t in sab_values((4, 5), torch.float32, gen, specials=False)],
                    rng_of(11, 3, device), 2)


def sab_post(case, calls, outs, after):
    """(w, grad_rho): new contiguous tensors of mu's shape and dtype, bit for bit what the two
    native ops give (CPU; CUDA to 1e-6: nvcc may contract the two kernels' FMAs differently);
    every input unchanged."""
    for c, (w, gr), a in zip(calls, outs, after):
        for out in (w, gr):
            assert out.is_contiguous() and out.shape == c["mu"].shape and out.dtype == c["mu"].dtype
        assert w.numel() == 0 or w.data_ptr() != gr.data_ptr()
        want_w = ops.vi_sample(c["mu"], c["rho"], c["rng"], c["stream"], backend="native")
        want_g = ops.vi_sample_backward(c["grad_w"], c["rho"], c["rng"], c["stream"], backend="native")
        tol = dict(rtol=0, atol=0) if w.device.type == "cpu" else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w, want_w, equal_nan=True, **tol)
        torch.testing.assert_close(gr, want_g, equal_nan=True, **tol)
        for name in ("mu", "rho", "grad_w", "rng"):
            torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, equal_nan=True)


def sab_spec():
    op = SAB
    mix = (rf"^{op}: (\w+ is on cpu, expected CUDA|\w+ is on (cpu|cuda:0) but \w+ is on (cpu|cuda:0)"
           rf"|rng must be a contiguous int64 \[2\] = \(seed, step\) on cuda:0)$")
    rng_msg = rf"^{op}: rng must be a contiguous int64 \[2\] = \(seed, step\) on .*$"
    bad = [
        Bad("mu-int", put(mu=lambda a, d: a["mu"].long()), rf"^{op}: mu must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("rho-dtype", put(rho=lambda a, d: a["rho"].double()), rf"^{op}: rho has dtype Double but mu has Float$"),
        Bad("grad_w-dtype", put(grad_w=lambda a, d: a["grad_w"].half()),
            rf"^{op}: rho has dtype Float but grad_w has Half$"),
        Bad("grad_w-int", put(grad_w=lambda a, d: a["grad_w"].long()),
            rf"^{op}: grad_w must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("rho-shape", put(rho=lambda a, d: a["rho"][:3]), rf"^{op}: rho has shape \[3, 5\] but mu has shape \[4, 5\]$"),
        Bad("grad_w-shape", put(grad_w=lambda a, d: a["grad_w"].t()),
            rf"^{op}: rho has shape \[4, 5\] but grad_w has shape \[5, 4\]$"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)), rng_msg),
        Bad("rng-float", put(rng=lambda a, d: a["rng"].double()), rng_msg),
        Bad("stream-negative", put(stream=-1), rf"^{op}: stream must be in \[0, 2\^32\), got -1$"),
    ] + (placement(op, "mu", "rho", device=mix) + placement(op, "rho", "mu", device=mix)
         + placement(op, "grad_w", "rho", device=mix) + placement(op, "rng", "mu", device=mix))

    def opcheck_args(dtype, shape):
        def args(device):
            gen = torch.Generator().manual_seed(6)
            return sab_call(*[t.to(device) for t in sab_values(shape, dtype, gen, specials=False)],
                            rng_of(-9, 2, device), 7)
        return args

    return OpSpec(op, grid=ALL_DTYPES, make=sab_make, good=sab_good, bad=bad, post=sab_post, tol=pair_tol, seed=31,
                  opcheck=[opcheck_args(torch.float64, (33,)), opcheck_args(torch.bfloat16, (2, 3, 5)),
                           opcheck_args(torch.float16, (0,))])


class TestViSampleAndBackward(OpContract):
    spec = sab_spec()


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


# ---- vi_rademacher_mul: x times the signs ------------------------------------------------------
def rmul_values(shape, dtype, gen, specials=True):
    """x ~ N(0, 1) with, from 6 elements on, 0, -0, +-inf and NaN (all flipped exactly)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if specials and x.numel() >= 6:
        x.view(-1)[:5] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    return x.to(dtype)


def rmul_make(case, device, dtype, gen):
    if case == "random":
        return [dict(x=rmul_values(shape, dtype, gen).to(device), rng=rng_of(seed, step, device), stream=stream)
                for shape in SHAPES for seed, stream, step in POSITIONS]
    if case == "empty":
        return [dict(x=torch.zeros(0, dtype=dtype, device=device), rng=rng_of(1, 2, device), stream=3),
                dict(x=torch.zeros(2, 0, 3, dtype=dtype, device=device), rng=rng_of(1, 2, device), stream=3)]
    return [dict(x=rmul_values((40, 30), dtype, gen).to(device).t(), rng=rng_of(11, 9, device), stream=2),
            dict(x=rmul_values((7, 9), dtype, gen).to(device)[:, 1:6], rng=rng_of(-3, 1, device), stream=5),
            dict(x=torch.ones((), dtype=dtype, device=device).expand(5, 6), rng=rng_of(4, 4, device), stream=1),
            dict(x=rmul_values((2, 3, 4, 5), dtype, gen).to(device).contiguous(memory_format=torch.channels_last),
                 rng=rng_of(5, 5, device), stream=0)]


def rmul_post(case, calls, outs, after):
    """A new contiguous tensor of x's shape and dtype holding x or -x in every element, with the
    signs vi_rademacher_'s reference draws (exact); x and rng unchanged."""
    for c, out, a in zip(calls, outs, after):
        x = c["x"]
        assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
        assert out.data_ptr() != a["x"].data_ptr() or out.numel() == 0
        seed, step = (int(v) for v in c["rng"].cpu())
        signs = R.vi.rademacher(x.numel(), seed, c["stream"], step).view(x.shape).to(x.device)
        want = torch.where(signs > 0, x, -x)
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~out.isnan()], want[~want.isnan()])
        assert torch.equal(out.signbit()[~out.isnan()], want.signbit()[~want.isnan()])  # -0.0 where it flips 0.0
        for name in ("x", "rng"):
            torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, equal_nan=True)


_RMUL_MIX = (r"^vi_rademacher_mul: (x is on cpu, expected CUDA"
             r"|rng must be a contiguous int64 \[2\] = \(seed, step\) on cuda:0)$")
_RMUL_RNG = r"^vi_rademacher_mul: rng must be a contiguous int64 \[2\] = \(seed, step\) on "


def _rmul_opcheck(dtype, shape):
    def args(device):
        return dict(x=rmul_values(shape, dtype, torch.Generator().manual_seed(8), specials=False).to(device),
                    rng=rng_of(-9, 2, device), stream=7)
    return args


VI_RADEMACHER_MUL = OpSpec(
    "vi_rademacher_mul", grid=ALL_DTYPES, make=rmul_make, post=rmul_post, seed=78,
    tol=lambda t: dict(rtol=0, atol=0),
    good=lambda device: dict(x=torch.randn(4, 5, device=device), rng=rng_of(11, 3, device), stream=2),
    bad=[
        Bad("x-int", put(x=lambda a, d: a["x"].long()),
            r"^vi_rademacher_mul: x must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("x-bool", put(x=lambda a, d: a["x"] > 0),
            r"^vi_rademacher_mul: x must be float64, float32, float16 or bfloat16, got Bool$"),
        Bad("x-complex", put(x=lambda a, d: a["x"].to(torch.complex64)),
            r"^vi_rademacher_mul: x must be float64, float32, float16 or bfloat16, got ComplexFloat$"),
        Bad("rng-3", put(rng=lambda a, d: torch.tensor([0, 0, 0], device=d)), _RMUL_RNG),
        Bad("rng-int32", put(rng=lambda a, d: a["rng"].int()), _RMUL_RNG),
        Bad("rng-strided", put(rng=lambda a, d: torch.tensor([1, 0, 2, 0], device=d)[::2]), _RMUL_RNG),
        Bad("stream-negative", put(stream=-2), r"^vi_rademacher_mul: stream must be in \[0, 2\^32\), got -2$"),
        Bad("stream-2^32", put(stream=2**32 + 5),
            r"^vi_rademacher_mul: stream must be in \[0, 2\^32\), got 4294967301$"),
    ] + placement("vi_rademacher_mul", "x", "rng", device=_RMUL_MIX)
    + placement("vi_rademacher_mul", "rng", "x", device=_RMUL_MIX),
    opcheck=[_rmul_opcheck(torch.float64, (33,)), _rmul_opcheck(torch.bfloat16, (2, 3, 5)),
             _rmul_opcheck(torch.float16, (0,))])


class TestViRademacherMul(OpContract):
    spec = VI_RADEMACHER_MUL


def test_rademacher_mul_is_x_times_the_signs_of_vi_rademacher_():
    """Native and reference: vi_rademacher_mul(x) == x * vi_rademacher_(empty) of the same position,
    bit for bit, past a Philox tile and a task (n = 100 003) and in every dtype."""
    gen = torch.Generator().manual_seed(9)
    for dtype in ALL_DTYPES:
        x = torch.randn(100_003, generator=gen).to(dtype)
        signs = torch.empty(100_003, dtype=dtype)
        ops.vi_rademacher_(signs, rng_of(3, 2**32 + 4), 11)
        for backend in backends("vi_rademacher_mul", "cpu"):
            assert torch.equal(ops.vi_rademacher_mul(x, rng_of(3, 2**32 + 4), 11, backend=backend), x * signs), dtype


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
    """n = 10^6 signs: each is +-1; the mean of each of the 128 lanes (bit k of word w of every
    block) is within 5 standard errors (5 / sqrt(n / 128)) of 0, the overall mean within 5 / sqrt(n);
    neighbouring signs are uncorrelated (5 / sqrt(n)); the same call repeats bit for bit, another
    stream or step gives other signs (uncorrelated), and the reference gives the same signs."""
    n = 1_000_000
    out = torch.empty(n, device=device)
    rng = rng_of(1234, 5, device)
    ops.vi_rademacher_(out, rng, 3)
    assert bool(((out == 1) | (out == -1)).all())
    assert abs(out.double().mean().item()) < 5 / math.sqrt(n)
    lanes = out[:n // 128 * 128].view(-1, 128).double()
    assert (lanes.mean(0).abs() < 5 / math.sqrt(n // 128)).all()
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


def test_rademacher_is_every_bit_of_the_philox_words():
    """The documented rule, from the random family's philox4x32, element by element in Python:
    element i is -1 iff bit i % 32 of word (i // 32) % 4 of the block i // 128 under counter
    (block, stream, step) and key seed (n = 16 385: past a 1 024-sign piece and a 16 K-sign task,
    a partial last block)."""
    n, seed, stream, step = 16_385, -2, 9, 7
    blocks = torch.arange((n + 127) // 128, dtype=torch.int64)
    ctr = torch.stack([blocks, torch.zeros_like(blocks), torch.full_like(blocks, stream),
                       torch.full_like(blocks, step)], 1)
    words = ops.philox4x32(ctr, seed & 0xFFFFFFFF, (seed % 2**64) >> 32).tolist()  # [blocks, 4]
    want = torch.tensor([-1.0 if (int(words[i // 128][(i // 32) % 4]) >> (i % 32)) & 1 else 1.0 for i in range(n)])
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


# ======================= Section 2: vi_kl, vi_kl_backward ========================================
# The closed-form KL of mean-field Gaussians against N(0, prior_var[t]) over lists of tensors, and
# its gradients. Tolerances: the reference computes in float64; the kernels' terms are float32
# (float64 for float64), summed in float32 runs of <= 65 terms added in float64 (relative ~1e-6 for
# these positive terms); fp64 kernels define log sigma = rho below rho = -20 and softplus'/sigma = 1
# there, the reference's float64 softplus differs by exp(rho) / 2 < 1e-9 (rtol 1e-8).
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

KL_RHO_EDGES = [-80.0, 80.0, -20.0, 20.0, 20.5, -20.5, -25.0, 0.0]  # both thresholds, both ends
# tensor lists: one tensor; a matrix, one element and 3 CPU work items / CUDA chunks; empty tensors
# between odd sizes, one element past a chunk (16 385) and a 0-dim tensor; 70 small tensors (the
# CUDA launcher's 512-slot table and its binary search)
KL_LISTS = [[(5,)], [(13, 79), (1,), (40_003,)], [(7,), (0,), (3, 0), (16_385,), ()],
            [(i % 7 + 1,) for i in range(70)]]


def kl_result_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_values(shapes, dtype, gen, specials=True):
    """(mus, rhos, prior_var) on the CPU: mu ~ N(0, 1), rho ~ 3 N(0, 1) - 2 with KL_RHO_EDGES in the
    first elements of every tensor of >= 8 elements; prior variances in [0.05, 4] (float64)."""
    mus, rhos = [], []
    for shape in shapes:
        mu = torch.randn(shape, generator=gen, dtype=torch.float64)
        rho = 3 * torch.randn(shape, generator=gen, dtype=torch.float64) - 2
        if specials and rho.numel() >= 8:
            rho.view(-1)[:8] = torch.tensor(KL_RHO_EDGES, dtype=torch.float64)
        mus.append(mu.to(dtype))
        rhos.append(rho.to(dtype))
    return mus, rhos, 0.05 + 3.95 * torch.rand(len(shapes), generator=gen, dtype=torch.float64)


def kl_tol(t):
    if t.dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    if t.dtype == torch.float64:
        return dict(rtol=1e-8, atol=1e-10)
    return TOL[t.dtype]  # fp16 / bf16 gradients: the same value rounded, an ulp apart at most


def closed_form_kl(mus, rhos, prior_var):
    """torch.distributions' KL(Normal(mu, softplus(rho)) || Normal(0, sqrt(v))) summed, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for m, r, v in zip(mus, rhos, prior_var.tolist()):
        m, r = m.double().cpu(), r.double().cpu()
        q = Normal(m, F.softplus(r))
        p = Normal(torch.zeros_like(m), torch.full_like(m, math.sqrt(v)))
        total = total + torch_kl(q, p).sum()
    return total


def kl_spec(op):
    backward = op == "vi_kl_backward"
    grads = [0.75, -1.25, 2.0]

    def call(mus, rhos, pv, device, g=None, gdtype=None):
        args = dict(mus=[m.to(device) for m in mus], rhos=[r.to(device) for r in rhos], prior_var=pv.to(device))
        if backward:
            dt = gdtype or kl_result_dtype(mus[0].dtype)
            args = dict(grad=torch.tensor(g, dtype=dt, device=device), **args)
        return args

    def make(case, device, dtype, gen):
        if case == "random":
            calls = []
            for k, shapes in enumerate(KL_LISTS):
                mus, rhos, pv = kl_values(shapes, dtype, gen)
                # grad in vi_kl's result dtype, and in float64 / float16 (any kernel float dtype)
                calls.append(call(mus, rhos, pv, device, grads[k % 3], [None, torch.float64, torch.float16][k % 3]))
            return calls
        if case == "empty":
            a = kl_values([(0,)], dtype, gen)
            b = kl_values([(0,), (2, 0), (3,)], dtype, gen)
            return [call(*a, device, 1.0), call(*b, device, -0.5)]
        # views: transposed mu, strided pair, a stride-0 (expanded) mu, channels_last pair, 0-dim pair;
        # prior_var a strided view
        m1, r1, _ = kl_values([(30, 40)], dtype, gen)
        m2, r2, _ = kl_values([(9, 14)], dtype, gen)
        _, r3, _ = kl_values([(5, 6)], dtype, gen)
        m4, r4, _ = kl_values([(2, 3, 4, 5)], dtype, gen)
        m5, r5, _ = kl_values([()], dtype, gen)
        cl = lambda t: t.to(device).contiguous(memory_format=torch.channels_last)  # noqa: E731
        mus = [m1[0].to(device).t(), m2[0].to(device)[:, 1::3], torch.ones((), dtype=dtype, device=device).expand(5, 6),
               cl(m4[0]), m5[0].to(device)]
        rhos = [r1[0].t().contiguous().to(device), r2[0].to(device)[:, ::3], r3[0].to(device), cl(r4[0]),
                r5[0].to(device)]
        pv = (0.1 + torch.rand(10, generator=gen, dtype=torch.float64)).to(device)[::2]
        args = dict(mus=mus, rhos=rhos, prior_var=pv)
        if backward:
            args = dict(grad=torch.tensor(0.5, dtype=kl_result_dtype(dtype), device=device), **args)
        return [args]

    def good(device):
        gen = torch.Generator().manual_seed(5)
        mus, rhos, _ = kl_values([(4, 5), (3,)], torch.float32, gen, specials=False)
        return call(mus, rhos, torch.tensor([0.5, 2.0], dtype=torch.float64), device, 1.5)

    def post(case, calls, outs, after):
        """vi_kl: a 0-dim result of the documented dtype; vi_kl_backward: two lists of new contiguous
        tensors shaped like mus in their dtype; every input unchanged."""
        for c, out, a in zip(calls, outs, after):
            dtype = c["mus"][0].dtype
            if backward:
                gms, grs = out
                assert len(gms) == len(grs) == len(c["mus"])
                for m, gm, gr in zip(c["mus"], gms, grs):
                    for x in (gm, gr):
                        assert x.shape == m.shape and x.dtype == dtype and x.is_contiguous() and x.device == m.device
            else:
                assert out.dim() == 0 and out.dtype == kl_result_dtype(dtype)
            torch.testing.assert_close(tensors_of(a), tensors_of(c), rtol=0, atol=0, equal_nan=True)

    first = "grad" if backward else "mus[0]"  # the call's first real tensor (schema order)
    mix = (rf"^{op}: (mus\[0\] is on cpu, expected CUDA|(mus|rhos)\[\d\] is on cpu but mus\[0\] is on cuda:0"
           r"|prior_var must be a float64 vector of length 2 \(one prior variance per tensor\) on cuda:0; got Double "
           r"of shape \[2\] on cpu|grad must be a 0-dim .* on cuda:0; got .* on cpu)$")
    pv_msg = rf"^{op}: prior_var must be a float64 vector of length 2 \(one prior variance per tensor\) on cpu; got "

    def at(name, i, f):
        """Bad.edit replacing element i of the list argument `name` by f(element, device)."""
        def edit(args, device):
            items = list(args[name])
            items[i] = f(items[i], device)
            return dict(args, **{name: items})
        return edit

    def both(f):
        """Bad.edit applying f to mus[0] and rhos[0]."""
        def edit(args, device):
            return at("rhos", 0, f)(at("mus", 0, f)(args, device), device)
        return edit

    bad = [
        Bad("empty-lists", put(mus=[], rhos=[], prior_var=lambda a, d: torch.zeros(0, dtype=torch.float64, device=d)),
            rf"^{op}: mus is empty; pass at least one \(mu, rho\) pair$"),
        Bad("rhos-short", put(rhos=lambda a, d: a["rhos"][:1]), rf"^{op}: got 2 mus but 1 rhos$"),
        Bad("rhos-long", put(rhos=lambda a, d: a["rhos"] + a["rhos"][:1]), rf"^{op}: got 2 mus but 3 rhos$"),
        Bad("mus-int", both(lambda t, d: t.long()),
            rf"^{op}: mus\[0\] must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("mus-bool", both(lambda t, d: t > 0),
            rf"^{op}: mus\[0\] must be float64, float32, float16 or bfloat16, got Bool$"),
        Bad("mus-complex", both(lambda t, d: t.to(torch.complex64)),
            rf"^{op}: mus\[0\] must be float64, float32, float16 or bfloat16, got ComplexFloat$"),
        Bad("mus1-double", at("mus", 1, lambda t, d: t.double()),
            rf"^{op}: mus\[1\] has dtype Double but mus\[0\] has Float$"),
        Bad("rhos0-half", at("rhos", 0, lambda t, d: t.half()),
            rf"^{op}: rhos\[0\] has dtype Half but mus\[0\] has Float$"),
        Bad("rhos1-int", at("rhos", 1, lambda t, d: t.int()),
            rf"^{op}: rhos\[1\] has dtype Int but mus\[0\] has Float$"),
        Bad("rhos1-shape", at("rhos", 1, lambda t, d: t[:2]),
            rf"^{op}: rhos\[1\] has shape \[2\] but mus\[1\] has shape \[3\]$"),
        Bad("rhos0-transposed", at("rhos", 0, lambda t, d: t.t()),
            rf"^{op}: rhos\[0\] has shape \[5, 4\] but mus\[0\] has shape \[4, 5\]$"),
        Bad("rhos0-broadcastable", at("rhos", 0, lambda t, d: t[:1]),
            rf"^{op}: rhos\[0\] has shape \[1, 5\] but mus\[0\] has shape \[4, 5\]$"),
        Bad("rhos-swapped", put(rhos=lambda a, d: a["rhos"][::-1]),
            rf"^{op}: rhos\[0\] has shape \[3\] but mus\[0\] has shape \[4, 5\]$"),
        Bad("prior_var-float32", put(prior_var=lambda a, d: a["prior_var"].float()),
            pv_msg.replace("cpu", ".*") + r"Float of shape \[2\] on "),
        Bad("prior_var-short", put(prior_var=lambda a, d: a["prior_var"][:1]),
            pv_msg.replace("cpu", ".*") + r"Double of shape \[1\]"),
        Bad("prior_var-long", put(prior_var=lambda a, d: a["prior_var"].repeat(2)),
            pv_msg.replace("cpu", ".*") + r"Double of shape \[4\]"),
        Bad("prior_var-2d", put(prior_var=lambda a, d: a["prior_var"][None]),
            pv_msg.replace("cpu", ".*") + r"Double of shape \[1, 2\]"),
        Bad("prior_var-0d", put(prior_var=lambda a, d: a["prior_var"][0]),
            pv_msg.replace("cpu", ".*") + r"Double of shape \[\]"),
        Bad("prior_var-int", put(prior_var=lambda a, d: a["prior_var"].long()), pv_msg.replace("cpu", ".*") + "Long"),
    ]
    if backward:
        g_msg = rf"^{op}: grad must be a 0-dim float64, float32, float16 or bfloat16 tensor on .*; got "
        bad += [
            Bad("grad-1d", put(grad=lambda a, d: a["grad"][None]), g_msg + r"Float of shape \[1\] on "),
            Bad("grad-2", put(grad=lambda a, d: torch.ones(2, device=d)), g_msg + r"Float of shape \[2\] on "),
            Bad("grad-int", put(grad=lambda a, d: torch.tensor(1, device=d)), g_msg + r"Long of shape \[\] on "),
            Bad("grad-complex", put(grad=lambda a, d: a["grad"].to(torch.complex64)), g_msg + "ComplexFloat"),
        ] + placement(op, "grad", "mus[0]", device=mix)
    bad += (placement(op, "mus", first, device=mix, index=1)
            + placement(op, "rhos", first, device=mix, index=0)
            + placement(op, "prior_var", first, device=mix)
            + [Bad("meta-mus[0]", at("mus", 0, lambda t, d: meta_like(t)),
                   rf"^{op}: mus\[0\] is a meta tensor but {re.escape('grad' if backward else 'mus[1]')} is on")])

    def opcheck_args(dtype, shapes):
        def args(device):
            gen = torch.Generator().manual_seed(6)
            mus, rhos, pv = kl_values(shapes, dtype, gen, specials=False)
            return call(mus, rhos, pv, device, -0.5)
        return args

    return OpSpec(op, grid=ALL_DTYPES, make=make, good=good, bad=bad, post=post, tol=kl_tol, seed=len(op) + 100,
                  opcheck=[opcheck_args(torch.float64, [(33,), (2, 3)]), opcheck_args(torch.bfloat16, [(2, 3, 5)]),
                           opcheck_args(torch.float16, [(0,), (4,)])])


class TestViKl(OpContract):
    spec = kl_spec("vi_kl")


class TestViKlBackward(OpContract):
    spec = kl_spec("vi_kl_backward")


@pytest.mark.parametrize("op", ["vi_kl", "vi_kl_backward"])
@pytest.mark.parametrize("value,text", [(-1.0, "-1"), (0.0, "0"), (-0.0, "-0"), (math.nan, "nan"), (math.inf, "inf"),
                                        (-math.inf, "-inf"), (-2.5e-7, "-2.5e-07")])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_kl_prior_var_values_checked_on_cpu(op, value, text, backend):
    """A CPU prior_var must be finite and > 0, each value checked (the first bad one named), before
    any work, with the same text on both backends; the inputs are unchanged."""
    if backend == "native" and not ops.native_op(op, "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(7)
    mus, rhos, _ = kl_values([(3,), (4, 2), (5,)], torch.float32, gen)
    pv = torch.tensor([0.5, value, 1.0], dtype=torch.float64)
    args = dict(mus=mus, rhos=rhos, prior_var=pv)
    if op == "vi_kl_backward":
        args = dict(grad=torch.tensor(1.0), **args)
    before = [t.clone() for t in tensors_of(args)]
    with pytest.raises(RuntimeError) as info:
        getattr(ops, op)(**args, backend=backend)
    assert str(info.value) == f"{op}: prior_var[1] must be finite and > 0, got {text}"
    for t, b in zip(tensors_of(args), before):
        assert torch.equal(t, b) or (t.isnan() & b.isnan()).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_kl_is_the_closed_form(device, dtype, backend):
    """vi_kl = sum of torch.distributions.kl_divergence(Normal(mu, softplus(rho)), Normal(0, sqrt(v)))
    over every element of every tensor (float64 closed form of the same inputs): to 1e-12 in fp64,
    1e-6 in fp32 (float32 terms; the terms are >= 0, so their sum has no cancellation)."""
    if backend == "native" and not ops.native_op("vi_kl", device):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(8)
    shapes = [(300, 7), (1,), (0,), (16_385,), ()]
    mus, rhos, pv = kl_values(shapes, dtype, gen)
    want = closed_form_kl(mus, rhos, pv)
    got = ops.vi_kl([m.to(device) for m in mus], [r.to(device) for r in rhos], pv.to(device), backend=backend)
    assert got.dtype == kl_result_dtype(dtype) and got.dim() == 0 and got.device.type == device
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=0)
    # the per-tensor split: the KL of a list is the sum of the KLs of its tensors
    parts = sum(ops.vi_kl([m.to(device)], [r.to(device)], pv[i:i + 1].to(device), backend=backend).double()
                for i, (m, r) in enumerate(zip(mus, rhos)))
    torch.testing.assert_close(got.double(), parts, rtol=rtol, atol=0)


def test_kl_at_the_prior_is_zero_and_grows_away_from_it():
    """mu = 0 and softplus(rho) = sqrt(v): KL = 0 (to rounding) and both gradients 0; moving mu or
    rho away raises it."""
    if not ops.native_op("vi_kl", "cpu"):
        pytest.skip("no native kernel")
    v = torch.tensor([0.25, 4.0], dtype=torch.float64)
    inv_softplus = lambda s: math.log(math.expm1(s))  # noqa: E731
    mus = [torch.zeros(1000, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
    rhos = [torch.full((1000,), inv_softplus(0.5), dtype=torch.float64),
            torch.full((3, 3), inv_softplus(2.0), dtype=torch.float64)]
    kl = ops.vi_kl(mus, rhos, v)
    assert abs(kl.item()) < 1e-12
    gms, grs = ops.vi_kl_backward(torch.tensor(1.0, dtype=torch.float64), mus, rhos, v)
    assert all(bool((g.abs() < 1e-12).all()) for g in gms + grs)
    assert ops.vi_kl([mus[0] + 0.1, mus[1]], rhos, v).item() > 1e-3
    assert ops.vi_kl(mus, [rhos[0], rhos[1] - 0.1], v).item() > 1e-3


class _KLFn(torch.autograd.Function):
    """vi_kl with vi_kl_backward as its derivative (what pyfastbayes.vi's kl_divergence does)."""

    @staticmethod
    def forward(ctx, prior_var, backend, n, *tensors):
        ctx.save_for_backward(prior_var, *tensors)
        ctx.backend, ctx.n = backend, n
        return ops.vi_kl(list(tensors[:n]), list(tensors[n:]), prior_var, backend=backend)

    @staticmethod
    def backward(ctx, g):
        prior_var, *tensors = ctx.saved_tensors
        n = ctx.n
        gms, grs = ops.vi_kl_backward(g, tensors[:n], tensors[n:], prior_var, backend=ctx.backend)
        return (None, None, None, *gms, *grs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_kl_backward_is_the_derivative(device, backend):
    """torch.autograd.gradcheck (central finite differences of vi_kl, fp64) with vi_kl_backward as the
    derivative, rho on both sides of both thresholds (+-20; the step 1e-6 crosses neither) and far
    out (-30, 35); and the gradients of torch autograd through the distributions' closed form, times
    a grad of -0.37 (to 1e-8: below rho = -20 the kernels take log sigma = rho, so d log sigma / d rho
    = 1, where the exact softplus' / softplus is 1 - exp(rho) / 2, 6e-10 away at rho = -20.5)."""
    if backend == "native" and not ops.native_op("vi_kl", device):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(9)
    mus, rhos, pv = kl_values([(6, 4), (5,), ()], torch.float64, gen, specials=False)
    rhos[0].view(-1)[:8] = torch.tensor([19.5, 20.5, -19.5, -20.5, -30.0, 35.0, 0.0, -5.0], dtype=torch.float64)
    mus = [m.to(device).requires_grad_() for m in mus]
    rhos = [r.to(device).requires_grad_() for r in rhos]
    pv = pv.to(device)
    n = len(mus)
    assert torch.autograd.gradcheck(lambda *ts: _KLFn.apply(pv, backend, n, *ts), (*mus, *rhos),
                                    eps=1e-6, atol=1e-6, rtol=1e-6)
    kl = _KLFn.apply(pv, backend, n, *mus, *rhos)
    got = torch.autograd.grad(-0.37 * kl, [*mus, *rhos])
    want_kl = sum(torch_kl(Normal(m, F.softplus(r)), Normal(torch.zeros_like(m), v.sqrt().expand_as(m))).sum()
                  for m, r, v in zip(mus, rhos, pv))
    want = torch.autograd.grad(-0.37 * want_kl, [*mus, *rhos])
    torch.testing.assert_close(kl, want_kl.detach(), rtol=1e-12, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert all(t.dtype == torch.float64 for t in got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_kl_stable_at_rho_80_and_minus_80(device, dtype):
    """rho = -80 (sigma = exp(-80) ~ 1.8e-35: softplus's log1p(exp(rho)) is subnormal-free in fp32 but
    sigma^2 underflows; log sigma must be rho itself) and rho = +80 (sigma = rho), every dtype, both
    backends: the KL and its gradients are finite and equal the float64 closed form written by hand,
    log sigma = rho and softplus'(rho) / sigma = 1 at -80 (grad_rho = -grad), 1 / 80 at +80."""
    v = torch.tensor([0.5, 2.0], dtype=torch.float64)
    mu = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    rho = torch.tensor([-80.0, 80.0, -80.0, 80.0], dtype=torch.float64)
    mus = [mu[:2].to(dtype).to(device), mu[2:].to(dtype).to(device)]
    rhos = [rho[:2].to(dtype).to(device), rho[2:].to(dtype).to(device)]
    # by hand: sigma = exp(-80) (its square is 0 next to mu^2) or 80
    want = 0.0
    want_gm, want_gr = [], []
    g = 0.75
    for i in range(4):
        t = i // 2
        vt = float(v[t])
        m = float(mu[i])
        if rho[i] < 0:
            want += 0.5 * math.log(vt) + 80.0 + m * m / (2 * vt) - 0.5
            want_gr.append(-g)
        else:
            want += 0.5 * math.log(vt) - math.log(80.0) + (6400.0 + m * m) / (2 * vt) - 0.5
            want_gr.append(g * (80.0 / vt - 1.0 / 80.0))
        want_gm.append(g * m / vt)
    rd = kl_result_dtype(dtype)
    for backend in backends("vi_kl", device):
        kl = ops.vi_kl(mus, rhos, v.to(device), backend=backend)
        assert bool(torch.isfinite(kl)), backend
        torch.testing.assert_close(kl.double().cpu(), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
        gms, grs = ops.vi_kl_backward(torch.tensor(g, dtype=rd, device=device), mus, rhos, v.to(device),
                                      backend=backend)
        got_gm, got_gr = torch.cat(gms).double().cpu(), torch.cat(grs).double().cpu()
        assert bool(torch.isfinite(got_gm).all() and torch.isfinite(got_gr).all()), backend
        tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else kl_tol(torch.empty(0, dtype=dtype))
        torch.testing.assert_close(got_gm, torch.tensor(want_gm, dtype=torch.float64), **tol)
        torch.testing.assert_close(got_gr, torch.tensor(want_gr, dtype=torch.float64), **tol)
        if backend == "native" and dtype in (torch.float32, torch.float64):
            # the kernels take s'/sigma = 1 below -20, so grad * (sigma s'/v - 1) = -grad exactly; the reference
            # divides torch's sigmoid by its softplus (1 ulp apart on CUDA: within the tolerance above only)
            assert got_gr[0].item() == -g and got_gr[2].item() == -g


@pytest.mark.parametrize("device", DEVICES)
def test_kl_far_below_the_threshold_float32(device):
    """rho from -20 down to -1e4 in float32: log1p(exp(rho)) underflows to 0 below ~-103, yet the KL
    counts -log sigma = -rho and grad_rho = -grad (never 0 / 0 = NaN)."""
    rho = torch.tensor([-20.0, -21.0, -50.0, -90.0, -103.0, -110.0, -200.0, -1e4])
    v = torch.tensor([1.5], dtype=torch.float64)
    for backend in backends("vi_kl", device):
        kl = ops.vi_kl([torch.zeros(8, device=device)], [rho.to(device)], v.to(device), backend=backend)
        want = sum(0.5 * math.log(1.5) - r - 0.5 for r in rho.double().tolist())
        assert abs(kl.item() - want) <= 1e-6 * abs(want), backend
        _, (gr,) = ops.vi_kl_backward(torch.tensor(2.0, device=device), [torch.zeros(8, device=device)],
                                      [rho.to(device)], v.to(device), backend=backend)
        torch.testing.assert_close(gr.cpu(), torch.full((8,), -2.0), rtol=1e-6, atol=0)


def test_kl_float32_sum_is_accurate_and_deterministic():
    """4 M float32 elements: the result equals the float64 reference to 2e-6 relative (one float32
    accumulator over 4 M terms is off by ~1e-2 here: the float32 sums are runs of 64 terms added in
    float64), and it is bit for bit the same for 1, 2 threads and repeated calls (fixed order)."""
    if not ops.native_op("vi_kl", "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(10)
    mus, rhos, pv = kl_values([(3_000_001,), (1_000_003,)], torch.float32, gen)
    want = ops.vi_kl(mus, rhos, pv, backend="reference")
    ref64 = R.vi_kl([m.double() for m in mus], [r.double() for r in rhos], pv)
    got = ops.vi_kl(mus, rhos, pv, backend="native")
    assert abs(got.double().item() - ref64.item()) <= 2e-6 * abs(ref64.item())
    assert abs(got.item() - want.item()) <= 2e-6 * abs(want.item())
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, threads):
            torch.set_num_threads(n)
            results += [ops.vi_kl(mus, rhos, pv, backend="native") for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, got) for r in results)


def test_kl_half_dtypes_compute_in_float32():
    """fp16 / bf16 inputs: vi_kl is the float32 op on the converted inputs, bit for bit (the same
    kernel arithmetic); the gradients are the float32 op's, rounded once."""
    if not ops.native_op("vi_kl", "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float16, torch.bfloat16):
        mus, rhos, pv = kl_values([(777,), (5, 3)], dtype, gen)
        f32 = ([m.float() for m in mus], [r.float() for r in rhos], pv)
        assert torch.equal(ops.vi_kl(mus, rhos, pv), ops.vi_kl(*f32))
        gms, grs = ops.vi_kl_backward(torch.tensor(0.75), mus, rhos, pv)
        wms, wrs = ops.vi_kl_backward(torch.tensor(0.75), *f32)
        for a, b in zip(gms + grs, wms + wrs):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)


def test_kl_grad_of_any_float_dtype_and_nan_propagation():
    """grad in float64 / float32 / float16 / bfloat16 gives the same gradients (its value, converted);
    a NaN mu or rho makes the KL NaN and only its own element's gradients NaN."""
    if not ops.native_op("vi_kl", "cpu"):
        pytest.skip("no native kernel")
    gen = torch.Generator().manual_seed(12)
    mus, rhos, pv = kl_values([(50,), (9,)], torch.float32, gen)
    base = ops.vi_kl_backward(torch.tensor(-1.5), mus, rhos, pv)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        other = ops.vi_kl_backward(torch.tensor(-1.5, dtype=dt), mus, rhos, pv)
        assert all(torch.equal(a, b) for a, b in zip(base[0] + base[1], other[0] + other[1]))
    rhos[1][3] = math.nan
    mus[0][7] = math.nan
    for backend in backends("vi_kl", "cpu"):
        assert ops.vi_kl(mus, rhos, pv, backend=backend).isnan()
        gms, grs = ops.vi_kl_backward(torch.tensor(1.0), mus, rhos, pv, backend=backend)
        assert gms[0].isnan().nonzero().flatten().tolist() == [7] and not grs[0].isnan().any()
        assert grs[1].isnan().nonzero().flatten().tolist() == [3] and not gms[1].isnan().any()


def test_kl_reference_checks_match_the_messages():
    """A few refusals by hand (the reference's RuntimeError is the kernels' text, checks/vi.h)."""
    pv = torch.ones(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=re.escape("vi_kl: rhos[0] has shape [3] but mus[0] has shape [2]")):
        R.vi_kl([torch.zeros(2)], [torch.zeros(3)], pv)
    with pytest.raises(RuntimeError, match=re.escape("vi_kl_backward: grad must be a 0-dim float64, float32, float16 "
                                                     "or bfloat16 tensor on cpu; got Float of shape [1] on cpu")):
        R.vi_kl_backward(torch.ones(1), [torch.zeros(2)], [torch.zeros(2)], pv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_first_input_broadcast_from_one_value(device, dtype):
    """A first input that is one value expanded to the shape (all strides 0, as flipout's zero mean)
    is read as that value, not copied: the same bits as the materialised tensor, for the noisy
    pairs and vi_sample_and_backward, across pieces (n past one kViBuf piece and a task)."""
    gen = torch.Generator().manual_seed(21)
    rho = torch.randn(300, 70, generator=gen).to(dtype=dtype, device=device)
    g = torch.randn(300, 70, generator=gen).to(dtype=dtype, device=device)
    rng = rng_of(17, 3, device)
    for value in (0.0, 0.7):
        bcast = torch.full((), value, dtype=dtype, device=device).expand(rho.shape)
        full = bcast.contiguous()
        for op in (ops.vi_sample, ops.vi_sample_backward, ops.vi_local_noise, ops.vi_local_noise_backward):
            assert torch.equal(op(bcast, rho.abs(), rng, 4), op(full, rho.abs(), rng, 4)), (op.__name__, value)
        got, want = ops.vi_sample_and_backward(bcast, rho, g, rng, 4), ops.vi_sample_and_backward(full, rho, g, rng, 4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), value
    one = torch.full((1, 1), 0.7, dtype=dtype, device=device).expand(1, 2100)  # strides (1, 0): a size-1 dim
    row = rho.reshape(1, -1)[:, :2100]
    assert one.stride() == (1, 0)
    assert torch.equal(ops.vi_sample(one, row, rng, 4), ops.vi_sample(one.contiguous(), row, rng, 4))
    assert rng.tolist() == [17, 3]
