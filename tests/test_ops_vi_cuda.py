"""The vi family's CUDA kernels (csrc/cuda/vi.cu) against the CPU op on the same inputs: the four
two-input noisy ops and vi_rademacher_, every dtype, one element to past one grid-stride round,
partial last Philox blocks, device views (transposed, strided, unaligned base pointers, which take
the element-by-element path), out as a device view with sentinels, a side stream, and a CUDA graph
replayed after the RNG step changed in place (the kernels read rng on the device).

Tolerances. Both devices draw the same Philox bits; the fp32 Box-Muller code is the same, but nvcc
contracts a * b + c into FMAs and CUDA's expf / log1pf round differently from glibc's, so the
normals agree to ~1e-6 (the philox_normal_ tests' bound) and a result to ~1e-6 * |its noise term|
(noise scales here below ~25, |eps| below ~6): rtol = 1e-5, atol = 2e-5 for fp32 and fp64; fp16 /
bf16 round the same fp32 value and may land an ulp apart. The signs of vi_rademacher_ are integer
code: equal to the bit.
"""
import math

import pytest
import torch

from pyfastbayes import ops

from _helpers import TOL, needs_cuda, needs_native, placed, require_cuda_kernel, sentinels_intact

pytestmark = [needs_cuda, needs_native]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PAIR_OPS = {
    "vi_sample": ("mu", "rho", "rho"),
    "vi_sample_backward": ("grad_w", "rho", "rho"),
    "vi_local_noise": ("mean", "var", "var"),
    "vi_local_noise_backward": ("grad_out", "var", "var"),
}
# 1 element, partial blocks (3, 5), whole blocks, a few CUDA blocks, and past one grid-stride round
# (132 SMs x 8 blocks x 256 threads x 4 elements = 1 081 344 on an H100 / H200)
SIZES = [1, 3, 4, 5, 1027, 262_147, 3_000_001]
POSITIONS = [(0, 0, 0), (-5, 2**32 - 1, 2**32 - 1), (2**63 - 1, 7, 2**32 + 3)]


def tol(dtype):
    return dict(rtol=1e-5, atol=2e-5) if dtype in (torch.float32, torch.float64) else TOL[dtype]


def rng_of(seed, step, device):
    return torch.tensor([seed, step], dtype=torch.int64, device=device)


def pair_values(kind, n, dtype, gen):
    """(a, b) on the CPU, with the edge values of tests/test_ops_vi.py in the first 8 elements."""
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "rho":
        b = 3 * torch.randn(n, generator=gen, dtype=torch.float64)
        edge = [25.0, -30.0, 20.0, 21.0, -math.inf, math.inf, math.nan, 0.5]
    else:
        b = 2 * torch.rand(n, generator=gen, dtype=torch.float64)
        edge = [0.0, -1e-7, math.nan, math.inf, 1e-30, 0.0, 1.0, 0.5]
    if n >= 8:
        b[:8] = torch.tensor(edge, dtype=torch.float64)
        a[:6] = 0.0
        a[7] = math.nan
    return a.to(dtype), b.to(dtype)


def device_view(x, how):
    """x (CPU, 1-D) on the device as: 'plain' contiguous, 'offset' one element past an aligned
    allocation (contiguous, base not 16-byte aligned: the scalar path), 'strided' every other
    element of a buffer (a non-contiguous view: the op's contiguous stand-in)."""
    if how == "plain":
        return x.cuda()
    if how == "offset":
        return placed(x, offset=1)[0]
    return torch.stack([x, x], 1).reshape(-1).cuda()[1::2]


VIEWS = [("plain", "plain"), ("offset", "plain"), ("plain", "strided"), ("strided", "offset")]


@pytest.mark.parametrize("op", list(PAIR_OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("views", VIEWS)
def test_pair_cuda_matches_cpu(op, dtype, n, views):
    require_cuda_kernel(op)
    if n == SIZES[-1] and views[1] == "strided":
        pytest.skip("the largest size once per pointer alignment is enough")
    an, bn, kind = PAIR_OPS[op]
    gen = torch.Generator().manual_seed(n + len(op))
    a, b = pair_values(kind, n, dtype, gen)
    f = getattr(ops, op)
    for seed, stream, step in POSITIONS[:1] if n > 300_000 else POSITIONS:
        cpu = f(a, b, rng_of(seed, step, "cpu"), stream, backend="native")
        gpu = f(device_view(a, views[0]), device_view(b, views[1]), rng_of(seed, step, "cuda"), stream,
                backend="native")
        assert gpu.is_cuda and gpu.is_contiguous() and gpu.dtype == dtype and gpu.shape == (n,)
        torch.testing.assert_close(gpu.cpu(), cpu, **tol(dtype), equal_nan=True,
                                   msg=lambda m: f"{op} {dtype} n={n} {views} {(seed, stream, step)}: {m}")


@pytest.mark.parametrize("op", list(PAIR_OPS))
def test_pair_2d_views_and_zero_dim(op):
    """Transposed and channels_last inputs made on the device, a stride-0 first input, a 0-dim pair
    and empty tensors: the CPU op's results."""
    require_cuda_kernel(op)
    an, bn, kind = PAIR_OPS[op]
    f = getattr(ops, op)
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        a, b = pair_values(kind, 1200, dtype, gen)
        a, b = a.view(30, 40), b.view(30, 40)
        rng_c, rng_g = rng_of(9, 4, "cpu"), rng_of(9, 4, "cuda")
        cases = [(a.t().contiguous(), b.t().contiguous(), a.cuda().t(), b.t().contiguous().cuda()),
                 (torch.zeros((), dtype=dtype).expand(30, 40), b,
                  torch.zeros((), dtype=dtype, device="cuda").expand(30, 40), b.cuda()),
                 (a[:1, :1].reshape(()), b[1:2, 1:2].reshape(()), a[:1, :1].reshape(()).cuda(),
                  b[1:2, 1:2].reshape(()).cuda()),
                 (a.view(2, 3, 10, 20), b.view(2, 3, 10, 20),
                  a.view(2, 3, 10, 20).cuda().contiguous(memory_format=torch.channels_last),
                  b.view(2, 3, 10, 20).cuda().contiguous(memory_format=torch.channels_last)),
                 (a[:0], b[:0], a[:0].cuda(), b[:0].cuda())]
        for ac, bc, ag, bg in cases:
            cpu = f(ac, bc, rng_c, 11, backend="native")
            gpu = f(ag, bg, rng_g, 11, backend="native")
            assert gpu.is_contiguous() and gpu.shape == cpu.shape
            torch.testing.assert_close(gpu.cpu(), cpu, **tol(dtype), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_rademacher_cuda_equals_cpu(dtype, n, offset):
    """Bit for bit: out a device view at `offset` elements past an aligned allocation, SENTINEL
    around it untouched (float8: through the float32 temporary)."""
    require_cuda_kernel("vi_rademacher_")
    for seed, stream, step in POSITIONS[:1] if n > 300_000 else POSITIONS:
        cpu = torch.zeros(n, dtype=dtype)
        ops.vi_rademacher_(cpu, rng_of(seed, step, "cpu"), stream, backend="native")
        if dtype == torch.float8_e4m3fn:
            gpu, buf = torch.zeros(n, dtype=dtype, device="cuda"), None
        else:
            gpu, buf = placed(torch.zeros(n, dtype=dtype), offset=offset)
        ops.vi_rademacher_(gpu, rng_of(seed, step, "cuda"), stream, backend="native")
        assert torch.equal(gpu.cpu().float(), cpu.float()), (dtype, n, offset, seed, stream, step)
        if buf is not None:
            assert sentinels_intact(gpu, buf)


def test_rademacher_noncontiguous_out_on_the_device():
    """A transposed and a strided out (written through the contiguous temporary): the CPU op's signs
    in logical order, the gaps of the strided view untouched."""
    require_cuda_kernel("vi_rademacher_")
    for dtype in DTYPES:
        want = torch.zeros(40, 30, dtype=dtype).t()
        ops.vi_rademacher_(want, rng_of(4, 4, "cpu"), 6, backend="native")
        got = torch.zeros(40, 30, dtype=dtype, device="cuda").t()
        ops.vi_rademacher_(got, rng_of(4, 4, "cuda"), 6, backend="native")
        assert torch.equal(got.cpu(), want)
        base = torch.full((2 * 999,), -96.0, dtype=dtype, device="cuda")
        view = base[::2]
        ops.vi_rademacher_(view, rng_of(4, 4, "cuda"), 6, backend="native")
        flat = torch.zeros(999, dtype=dtype)
        ops.vi_rademacher_(flat, rng_of(4, 4, "cpu"), 6, backend="native")
        assert torch.equal(view.cpu(), flat) and bool((base[1::2] == -96).all())


def test_sample_noise_is_philox_normal_on_cuda():
    """vi_sample(0, rho = 32) / 32 is the CUDA philox_normal_ stream (to ~1e-6; the two kernels
    compile the same Box-Muller code, so in practice to the bit), and the CPU's to ~1e-6."""
    require_cuda_kernel("vi_sample")
    n, seed, stream, step = 100_003, 99, 3, 17
    rng = rng_of(seed, step, "cuda")
    z = torch.empty(n, device="cuda")
    ops.philox_normal_(z, seed, stream, step)
    w = ops.vi_sample(torch.zeros(n, device="cuda"), torch.full((n,), 32.0, device="cuda"), rng, stream)
    torch.testing.assert_close(w / 32, z, rtol=1e-6, atol=1e-6)
    cpu = ops.vi_sample(torch.zeros(n), torch.full((n,), 32.0), rng.cpu(), stream)
    torch.testing.assert_close((w / 32).cpu(), cpu / 32, rtol=1e-6, atol=2e-6)


def test_side_stream():
    """Launches go to the current stream: inputs made and the op called on a side stream."""
    require_cuda_kernel("vi_sample")
    gen = torch.Generator().manual_seed(8)
    mu, rho = pair_values("rho", 50_001, torch.float32, gen)
    want = ops.vi_sample(mu, rho, rng_of(1, 2, "cpu"), 5, backend="native")
    signs = torch.empty(50_001)
    ops.vi_rademacher_(signs, rng_of(1, 2, "cpu"), 6, backend="native")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        rng = rng_of(1, 2, "cuda")
        got = ops.vi_sample(mu.cuda(), rho.cuda(), rng, 5, backend="native")
        out = torch.empty(50_001, device="cuda")
        ops.vi_rademacher_(out, rng, 6, backend="native")
    side.synchronize()
    torch.testing.assert_close(got.cpu(), want, **tol(torch.float32), equal_nan=True)
    assert torch.equal(out.cpu(), signs)


def test_cuda_graph_replay_reads_the_step_on_the_device():
    """A captured forward/backward pair (vi_sample, vi_sample_backward, vi_local_noise,
    vi_rademacher_) replayed after rng's step was changed in place gives the new step's results
    (the kernels read rng from device memory, not a value baked in at capture)."""
    for op in ("vi_sample", "vi_sample_backward", "vi_local_noise", "vi_rademacher_"):
        require_cuda_kernel(op)
    gen = torch.Generator().manual_seed(9)
    mu, rho = (t.cuda() for t in pair_values("rho", 4099, torch.float32, gen))
    var = torch.rand(4099, generator=gen).cuda()
    rng = rng_of(77, 0, "cuda")
    signs = torch.empty(4099, device="cuda")

    def body():
        w = ops.vi_sample(mu, rho, rng, 1, backend="native")
        g = ops.vi_sample_backward(w, rho, rng, 1, backend="native")
        y = ops.vi_local_noise(mu, var, rng, 2, backend="native")
        ops.vi_rademacher_(signs, rng, 3, backend="native")
        return w, g, y

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    for step in (5, 2**32 + 6):
        rng[1].fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in outs] + [signs.clone()]
        want = list(body()) + [signs.clone()]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"step {step}: {m}")
        other = ops.vi_sample(mu, rho, rng_of(77, 0, "cuda"), 1, backend="native")
        assert (other != got[0]).float().mean() > 0.9
