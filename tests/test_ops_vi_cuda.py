"""The vi family's CUDA kernels (csrc/cuda/vi.cu) against the CPU op on the same inputs: the four
two-input noisy ops, vi_rademacher_, vi_rademacher_mul and the sigma^2 ops (section 3), every dtype, one element to past one grid-stride round,
partial last Philox blocks, device views (transposed, strided, unaligned base pointers, which take
the element-by-element path), out as a device view with sentinels, a side stream, and a CUDA graph
replayed after the RNG step changed in place (the kernels read rng on the device).
Section 2 (vi_kl, vi_kl_backward): against the CPU op and the float64 reference, every dtype, one
element to 3 M (183 chunks), chunk edges, empty and 0-dim tensors, 600 tensors (two launches of
the multi-tensor launcher: the partials of the second land after the first's), 512 + 1 tensors,
inputs one element past an aligned allocation (the ChunkSplit head) and strided (stand-ins); the
result is bit for bit the same on every call (fixed summation order); a bad prior_var (not checked
on CUDA) gives NaN; a CUDA graph replayed after prior_var and grad changed in place.
Section 4 (vi_weight_kl, vi_weight_kl_backward_): against the CPU op, every dtype and kind, through
device views.

Tolerances. Both devices draw the same Philox bits; the fp32 Box-Muller code is the same, but nvcc
contracts a * b + c into FMAs and CUDA's expf / log1pf round differently from glibc's, so the
normals agree to ~1e-6 (the philox_normal_ tests' bound) and a result to ~1e-6 * |its noise term|
(noise scales here below ~25, |eps| below ~6): rtol = 1e-5, atol = 2e-5 for fp32 and fp64; fp16 /
bf16 round the same fp32 value and may land an ulp apart. The signs of vi_rademacher_ are integer
code: equal to the bit, and so are vi_rademacher_mul's products (x or -x).
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("views", VIEWS)
def test_sigma_sq_cuda_matches_cpu(dtype, n, views):
    """vi_sigma_sq, vi_sigma_sq_backward_ and vi_sigma_sq_and_backward_ (section 3: no noise) on the
    device against the CPU ops: rho and grad as device views (grad written in place through them,
    nothing outside it touched), the combined op equal to the two single ones."""
    require_cuda_kernel("vi_sigma_sq_and_backward_")
    if n == SIZES[-1] and views[1] == "strided":
        pytest.skip("the largest size once per pointer alignment is enough")
    gen = torch.Generator().manual_seed(n + 17)
    grad, rho = pair_values("rho", n, dtype, gen)
    s2_cpu = ops.vi_sigma_sq(rho, backend="native")
    g_cpu = ops.vi_sigma_sq_backward_(grad.clone(), rho, backend="native")
    r_dev = device_view(rho, views[0])
    for single in (False, True):
        g_dev = device_view(grad, views[1])
        base = g_dev._base if g_dev._base is not None else g_dev
        before = base.clone()
        if single:
            s2 = ops.vi_sigma_sq(r_dev, backend="native")
            assert ops.vi_sigma_sq_backward_(g_dev, r_dev, backend="native") is g_dev
        else:
            s2 = ops.vi_sigma_sq_and_backward_(g_dev, r_dev, backend="native")
        assert s2.is_cuda and s2.is_contiguous() and s2.dtype == dtype and s2.shape == (n,)
        torch.testing.assert_close(s2.cpu(), s2_cpu, **tol(dtype), equal_nan=True)
        torch.testing.assert_close(g_dev.cpu(), g_cpu, **tol(dtype), equal_nan=True)
        torch.testing.assert_close(r_dev.cpu(), rho, rtol=0, atol=0, equal_nan=True)  # rho read only
        if views[1] == "strided":  # the other half of the buffer untouched
            torch.testing.assert_close(base[0::2], before[0::2], rtol=0, atol=0, equal_nan=True)
        elif views[1] == "offset":
            assert sentinels_intact(g_dev, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_weight_kl_cuda_matches_cpu(dtype, n, kind):
    """vi_weight_kl and vi_weight_kl_backward_ (section 4) on the device against the CPU ops: w, the KL
    (float64 block partials vs the CPU's float32 runs: 1e-5 relative), grad_rho / grad_mu in place
    through device views (strided grad_mu: its other half untouched), w or the empty [0]; the KL
    bit for bit the same on a second call (fixed order); kl_grad read on the device."""
    require_cuda_kernel("vi_weight_kl_backward_")
    gen = torch.Generator().manual_seed(n + 29)
    grad_rho, rho = pair_values("rho", n, dtype, gen)
    mu = (0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    grad_mu = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    rng = torch.tensor([5, 2**32 + 3])
    g = torch.tensor(0.37)
    w_cpu, kl_cpu = ops.vi_weight_kl(mu, rho, rng, 4, 0.5, kind, backend="native")
    gr_cpu, gm_cpu = grad_rho.clone(), grad_mu.clone()
    ww_cpu = ops.vi_weight_kl_backward_(gr_cpu, gm_cpu, mu, rho, rng, 4, g, 0.5, kind, True, backend="native")
    d = lambda t, how="plain": device_view(t, how)  # noqa: E731
    mu_d, rho_d, rng_d = d(mu, "offset"), d(rho), rng.cuda()
    w, kl = ops.vi_weight_kl(mu_d, rho_d, rng_d, 4, 0.5, kind, backend="native")
    torch.testing.assert_close(w.cpu(), w_cpu, **tol(dtype), equal_nan=True)
    torch.testing.assert_close(kl.cpu(), kl_cpu, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(ops.vi_weight_kl(mu_d, rho_d, rng_d, 4, 0.5, kind, backend="native")[1], kl)
    gr_d, gm_d = d(grad_rho), d(grad_mu, "strided")
    before = gm_d._base.clone()
    for want_w in (True, False):
        gr, gm = gr_d.clone(), gm_d if want_w else gm_d.clone()
        ww = ops.vi_weight_kl_backward_(gr, gm, mu_d, rho_d, rng_d, 4, g.cuda(), 0.5, kind, want_w, backend="native")
        torch.testing.assert_close(gr.cpu(), gr_cpu, **tol(dtype), equal_nan=True)
        torch.testing.assert_close(gm.cpu(), gm_cpu, **tol(dtype), equal_nan=True)
        if want_w:
            torch.testing.assert_close(ww.cpu(), ww_cpu, **tol(dtype), equal_nan=True)
            torch.testing.assert_close(gm_d._base[0::2], before[0::2], rtol=0, atol=0, equal_nan=True)
        else:
            assert ww.shape == (0,) and ww.is_cuda


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_rademacher_mul_cuda_equals_cpu(dtype, n, offset):
    """Bit for bit (x or -x): x a device view at `offset` elements past an aligned allocation (the
    scalar path), and a transposed x (its contiguous stand-in)."""
    require_cuda_kernel("vi_rademacher_mul")
    gen = torch.Generator().manual_seed(n + offset)
    for seed, stream, step in POSITIONS[:1] if n > 300_000 else POSITIONS:
        x = torch.randn(n + offset, generator=gen).to(dtype)
        cpu = ops.vi_rademacher_mul(x[offset:], rng_of(seed, step, "cpu"), stream, backend="native")
        gpu = ops.vi_rademacher_mul(x.cuda()[offset:], rng_of(seed, step, "cuda"), stream, backend="native")
        assert torch.equal(gpu.cpu(), cpu), (dtype, n, offset, seed, stream, step)
    xt = torch.randn(30, 40, generator=gen).to(dtype)
    cpu = ops.vi_rademacher_mul(xt.t(), rng_of(4, 4, "cpu"), 6, backend="native")
    gpu = ops.vi_rademacher_mul(xt.cuda().t(), rng_of(4, 4, "cuda"), 6, backend="native")
    assert torch.equal(gpu.cpu(), cpu)


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
        flipped = ops.vi_rademacher_mul(mu.cuda(), rng, 6, backend="native")
    side.synchronize()
    torch.testing.assert_close(got.cpu(), want, **tol(torch.float32), equal_nan=True)
    assert torch.equal(out.cpu(), signs)
    assert torch.equal(flipped.cpu(), mu * signs)


def test_cuda_graph_replay_reads_the_step_on_the_device():
    """A captured forward/backward pair (vi_sample, vi_sample_backward, vi_local_noise,
    vi_rademacher_, vi_rademacher_mul) replayed after rng's step was changed in place gives the new
    step's results (the kernels read rng from device memory, not a value baked in at capture)."""
    for op in ("vi_sample", "vi_sample_backward", "vi_local_noise", "vi_rademacher_", "vi_rademacher_mul"):
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
        return w, g, y, ops.vi_rademacher_mul(mu, rng, 4, backend="native")

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



# ======================= Section 2: vi_kl, vi_kl_backward ========================================
KL_RHO_EDGES = [-80.0, 80.0, -20.0, 20.0, 20.5, -20.5, -25.0, 0.0]  # as tests/test_ops_vi.py
# one element, a partial vector step, a chunk (16 384) and its neighbours, 3 M elements, empty and
# 0-dim tensors among others, 600 tensors (512 + 88: two launches), 512 small tensors + a large one
KL_LISTS = {
    "1": [(1,)], "3": [(3,)], "chunk": [(16_384,)], "chunk-edges": [(16_385,), (16_383,)], "3M": [(3_000_001,)],
    "mixed": [(7,), (0,), (3, 0), (40_003,), ()], "600": [((i * 37) % 101 + 1,) for i in range(600)],
    "513": [(5,)] * 512 + [(20_001,)],
}


def kl_values(shapes, dtype, gen):
    """(mus, rhos, prior_var) on the CPU as tests/test_ops_vi.py makes them: mu ~ N(0, 1), rho ~
    3 N(0, 1) - 2 with KL_RHO_EDGES first, prior variances in [0.05, 4]."""
    mus, rhos = [], []
    for shape in shapes:
        mu = torch.randn(shape, generator=gen, dtype=torch.float64)
        rho = 3 * torch.randn(shape, generator=gen, dtype=torch.float64) - 2
        if rho.numel() >= 8:
            rho.view(-1)[:8] = torch.tensor(KL_RHO_EDGES, dtype=torch.float64)
        mus.append(mu.to(dtype))
        rhos.append(rho.to(dtype))
    return mus, rhos, 0.05 + 3.95 * torch.rand(len(shapes), generator=gen, dtype=torch.float64)


def kl_tol(dtype):
    """CUDA vs CPU: float32 terms summed in another order, CUDA's logf / expf / log1pf an ulp from
    glibc's (relative ~1e-6 for these positive terms); float64: the same float64 formulas;
    fp16 / bf16 gradients: the float32 value rounded, an ulp apart at most."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    return TOL[dtype]


def kl_result_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(KL_LISTS))
@pytest.mark.parametrize("views", [("plain", "plain"), ("offset", "plain"), ("plain", "offset"), ("strided", "offset")])
def test_kl_cuda_matches_cpu(dtype, case, views):
    """vi_kl and vi_kl_backward on the device = the CPU op (and the float64 reference) on the same
    inputs; the gradients are new contiguous tensors of the inputs' shapes and dtype."""
    require_cuda_kernel("vi_kl")
    require_cuda_kernel("vi_kl_backward")
    if case in ("3M", "600", "513") and views[0] == "strided":
        pytest.skip("the large lists once per pointer alignment are enough")
    gen = torch.Generator().manual_seed(len(case) + 10 * DTYPES.index(dtype))
    mus, rhos, pv = kl_values(KL_LISTS[case], dtype, gen)
    dev = lambda ts, how: [device_view(t.reshape(-1), how).reshape(t.shape) for t in ts]  # noqa: E731
    gmus, grhos, gpv = dev(mus, views[0]), dev(rhos, views[1]), pv.cuda()
    cpu = ops.vi_kl(mus, rhos, pv, backend="native")
    gpu = ops.vi_kl(gmus, grhos, gpv, backend="native")
    assert gpu.is_cuda and gpu.dim() == 0 and gpu.dtype == kl_result_dtype(dtype)
    torch.testing.assert_close(gpu.cpu(), cpu, **kl_tol(cpu.dtype), msg=lambda m: f"vi_kl {case} {views}: {m}")
    # the float64 reference: float32 terms to ~1e-6; in float64 the kernels' log sigma = rho below -20
    # is exp(rho) / 2 < 1e-9 from the reference's log(softplus(rho))
    ref = ops.vi_kl(gmus, grhos, gpv, backend="reference")
    torch.testing.assert_close(gpu, ref, **(dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else
                                            dict(rtol=1e-5, atol=1e-5)))
    for gdtype in (kl_result_dtype(dtype), torch.float16):
        g_cpu = torch.tensor(-1.25, dtype=gdtype)
        cg = ops.vi_kl_backward(g_cpu, mus, rhos, pv, backend="native")
        gg = ops.vi_kl_backward(g_cpu.cuda(), gmus, grhos, gpv, backend="native")
        for want, got, m in zip(cg[0] + cg[1], gg[0] + gg[1], mus + mus):
            assert got.is_cuda and got.is_contiguous() and got.dtype == dtype and got.shape == m.shape
            torch.testing.assert_close(got.cpu(), want, **kl_tol(dtype), equal_nan=True,
                                       msg=lambda msg: f"vi_kl_backward {case} {views} grad {gdtype}: {msg}")


def test_kl_cuda_views_and_zero_dim():
    """Transposed, channels_last, stride-0 (expanded) and 0-dim inputs made on the device, and a
    strided prior_var: the CPU op's results."""
    require_cuda_kernel("vi_kl")
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        (m1, m2, m3), (r1, r2, r3), pv = kl_values([(30, 40), (2, 3, 10, 20), ()], dtype, gen)
        r4 = kl_values([(5, 6)], dtype, gen)[1][0]
        cpu_args = ([m1.t().contiguous(), m2, m3, torch.ones(5, 6, dtype=dtype)],
                    [r1.t().contiguous(), r2, r3, r4], torch.cat([pv, torch.tensor([0.3], dtype=torch.float64)]))
        cl = lambda t: t.cuda().contiguous(memory_format=torch.channels_last)  # noqa: E731
        gpu_pv = torch.stack([cpu_args[2], cpu_args[2]], 1).reshape(-1).cuda()[::2]
        gpu_args = ([m1.cuda().t(), cl(m2), m3.cuda(), torch.ones((), dtype=dtype, device="cuda").expand(5, 6)],
                    [r1.t().contiguous().cuda(), cl(r2), r3.cuda(), r4.cuda()], gpu_pv)
        assert not gpu_pv.is_contiguous()
        cpu = ops.vi_kl(*cpu_args, backend="native")
        gpu = ops.vi_kl(*gpu_args, backend="native")
        torch.testing.assert_close(gpu.cpu(), cpu, **kl_tol(cpu.dtype))
        g = torch.tensor(0.5, dtype=kl_result_dtype(dtype))
        cg = ops.vi_kl_backward(g, *cpu_args, backend="native")
        gg = ops.vi_kl_backward(g.cuda(), *gpu_args, backend="native")
        for want, got in zip(cg[0] + cg[1], gg[0] + gg[1]):
            assert got.is_contiguous() and got.shape == want.shape
            torch.testing.assert_close(got.cpu(), want, **kl_tol(dtype))


def test_kl_cuda_is_deterministic():
    """The same call gives the same bits every time (per-block float64 partials and one final
    fixed-order reduction: no atomics), for float32 and float64 over 600 tensors and 3 M elements."""
    require_cuda_kernel("vi_kl")
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        mus, rhos, pv = kl_values(KL_LISTS["600"] + [(3_000_001,)], dtype, gen)
        mus, rhos, pv = [m.cuda() for m in mus], [r.cuda() for r in rhos], pv.cuda()
        first = ops.vi_kl(mus, rhos, pv, backend="native")
        for _ in range(5):
            assert torch.equal(ops.vi_kl(mus, rhos, pv, backend="native"), first)


def test_kl_cuda_unchecked_prior_var_gives_nan():
    """On CUDA prior_var's values are not read on the host (no sync): a value that is not finite and
    > 0 makes the KL NaN and that tensor's gradients NaN (native and reference alike); the other
    tensors' gradients are the CPU op's."""
    require_cuda_kernel("vi_kl")
    gen = torch.Generator().manual_seed(6)
    mus, rhos, _ = kl_values([(9,)] * 6, torch.float32, gen)
    pv = torch.tensor([1.0, -1.0, 0.0, math.nan, math.inf, 2.0], dtype=torch.float64)
    gmus, grhos, gpv = [m.cuda() for m in mus], [r.cuda() for r in rhos], pv.cuda()
    for backend in ("native", "reference"):
        assert ops.vi_kl(gmus, grhos, gpv, backend=backend).isnan().item(), backend
        gms, grs = ops.vi_kl_backward(torch.tensor(1.0, device="cuda"), gmus, grhos, gpv, backend=backend)
        for t in range(6):
            bad = t in (1, 2, 3, 4)
            assert bool(gms[t].isnan().all()) == bad and bool(grs[t].isnan().all()) == bad, (backend, t)
            assert bad or not (gms[t].isnan().any() or grs[t].isnan().any()), (backend, t)
    ok = [0, 5]
    cpu = ops.vi_kl_backward(torch.tensor(1.0), [mus[t] for t in ok], [rhos[t] for t in ok], pv[ok], backend="native")
    gpu = ops.vi_kl_backward(torch.tensor(1.0, device="cuda"), gmus, grhos, gpv, backend="native")
    for k, t in enumerate(ok):
        torch.testing.assert_close(gpu[0][t].cpu(), cpu[0][k], **kl_tol(torch.float32))
        torch.testing.assert_close(gpu[1][t].cpu(), cpu[1][k], **kl_tol(torch.float32))


def test_kl_cuda_graph_reads_prior_var_and_grad_on_the_device():
    """vi_kl and vi_kl_backward captured in a CUDA graph (possible only without host syncs) and
    replayed after prior_var and grad changed in place give the eager results of the new values."""
    require_cuda_kernel("vi_kl")
    require_cuda_kernel("vi_kl_backward")
    gen = torch.Generator().manual_seed(7)
    mus, rhos, pv = kl_values([(1000,), (40_003,), (3,)], torch.float32, gen)
    mus, rhos, pv = [m.cuda() for m in mus], [r.cuda() for r in rhos], pv.cuda()
    grad = torch.tensor(1.0, device="cuda")

    def body():
        kl = ops.vi_kl(mus, rhos, pv, backend="native")
        gms, grs = ops.vi_kl_backward(grad, mus, rhos, pv, backend="native")
        return [kl] + gms + grs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    before = [t.clone() for t in outs]
    for new_pv, new_grad in (([0.3, 2.5, 1.0], -0.5), ([4.0, 0.01, 0.7], 3.0)):
        pv.copy_(torch.tensor(new_pv, dtype=torch.float64))
        grad.fill_(new_grad)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in outs]
        want = body()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{new_pv} {new_grad}: {m}")
        assert not torch.equal(got[0], before[0])
