"""The kfac op (kfac_factor_): the op contract against the reference (which builds the augmented
matrix [x, 1] explicitly), the closed form F0 + scale [x, 1]^T [x, 1], accumulation over batches,
exact symmetry, the math in factor's dtype, the converted row chunks, M = 0, and every refusal.
CUDA against the CPU op: tests/test_ops_kfac_cuda.py."""
import pytest
import torch

from pyfastbayes import ops

from _helpers import DEVICES, Bad, OpContract, OpSpec, expanded_like, placement, put

OP = "kfac_factor_"
# (x dtype, factor dtype): every pair the op takes (x not more precise than factor)
PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
         (torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float64),
         (torch.bfloat16, torch.float64)]
# (M, d, bias): one row and one column, a tail tile (D = 71 > 64, the CPU tile), many rows, and
# the CPU's gram in lower column blocks (d >= 128: 2 blocks, edges inside a tile; 4 blocks)
SHAPES = [(1, 1, True), (1, 1, False), (37, 5, True), (200, 16, False), (65, 70, True), (3, 2, False),
          (130, 128, False), (40, 301, True), (9, 520, False)]
CHUNK_BYTES = 64 << 20  # kKfacChunkBytes (csrc/common/kfac.h)


def sym(D, gen, dtype=torch.float64):
    """An exactly symmetric [D, D] matrix (a starting factor)."""
    B = torch.randn(D, D, generator=gen, dtype=torch.float64)
    return (0.5 * (B + B.t())).to(dtype)


def augmented(x, bias):
    """[x, 1] (bias) or x, in float64."""
    A = x.double()
    return torch.cat([A, torch.ones(A.shape[0], 1, dtype=torch.float64)], 1) if bias else A


def kf_make(kind, device, g, gen):
    xd, fd = g

    def call(factor, x, scale, bias):
        return dict(factor=factor, x=x, scale=scale, bias=bias)

    calls = []
    if kind == "random":  # two batches into one factor per shape (the second sees the first's writes)
        for M, d, bias in SHAPES:
            f = sym(d + bias, gen, fd).to(device)
            for scale in (0.5, 2.0):
                calls.append(call(f, torch.randn(M, d, generator=gen).to(dtype=xd, device=device), scale, bias))
        return calls
    if kind == "empty":  # M = 0: nothing changes
        for d, bias in ((3, True), (4, False)):
            calls.append(call(sym(d + bias, gen, fd).to(device), torch.zeros(0, d, dtype=xd, device=device), 1.0, bias))
        return calls
    # x as views: transposed, every other row, a column slice; factor contiguous
    base = torch.randn(9, 40, generator=gen).to(dtype=xd, device=device)
    wide = torch.randn(30, 12, generator=gen).to(dtype=xd, device=device)
    tall = torch.randn(260, 20, generator=gen).to(dtype=xd, device=device)  # its transpose: 2 column blocks
    return [call(sym(10, gen, fd).to(device), base.t(), 0.25, True),
            call(sym(261, gen, fd).to(device), tall.t(), 0.5, True),
            call(sym(12, gen, fd).to(device), wide[::2], 1.0, False),
            call(sym(6, gen, fd).to(device), wide[:, 3:8], 3.0, True)]


def kf_post(kind, calls, outs, after):
    """The wrapper returns factor itself, x is unchanged, factor stays exactly symmetric."""
    for a, out, b in zip(calls, outs, after):
        assert out is b["factor"]
        assert torch.equal(a["x"], b["x"])
        assert torch.equal(b["factor"], b["factor"].t()), "factor lost its exact symmetry"


def kf_tol(t):
    # sums of up to 200 products of N(0, 1) values (entries up to ~400): the GEMMs add in other orders
    return dict(rtol=1e-12, atol=1e-11) if t.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)


def kf_good(device, xd=torch.float32, fd=torch.float32, bias=True, M=3):
    gen = torch.Generator().manual_seed(4)
    return dict(factor=sym(5 if bias else 4, gen, fd).to(device),
                x=torch.randn(M, 4, generator=gen).to(dtype=xd, device=device), scale=0.5, bias=bias)


def _opcheck_args(xd, fd, bias=True, M=3):
    return lambda device: kf_good(device, xd, fd, bias, M)


def _view_of_factor(dense):
    """Bad.edit: x [3, 4] made of factor's memory (a dense run of it, or a block of rows / columns)."""
    def edit(a, d):
        f = a["factor"]
        return dict(a, x=f.view(-1)[:12].view(3, 4) if dense else f[:3, :4])
    return edit


_DEVICE_MIX = rf"^{OP}: (factor is on cpu, expected CUDA|x is on cpu but factor is on cuda:0)$"

KFAC_FACTOR = OpSpec(
    OP, grid=PAIRS, make=kf_make, good=kf_good, post=kf_post, seed=31, tol=kf_tol,
    opcheck=[_opcheck_args(torch.float16, torch.float64, bias=False), _opcheck_args(torch.bfloat16, torch.float32),
             _opcheck_args(torch.float64, torch.float64, M=0)],
    bad=[
        Bad("factor-int", put(factor=lambda a, d: a["factor"].long()),
            rf"^{OP}: factor must be float32 or float64, got Long$"),
        Bad("factor-half", put(factor=lambda a, d: a["factor"].half(), x=lambda a, d: a["x"].half()),
            rf"^{OP}: factor must be float32 or float64, got Half$"),
        Bad("x-int", put(x=lambda a, d: a["x"].long()),
            rf"^{OP}: x must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("x-bool", put(x=lambda a, d: a["x"] > 0),
            rf"^{OP}: x must be float64, float32, float16 or bfloat16, got Bool$"),
        Bad("x-more-precise", put(x=lambda a, d: a["x"].double()),
            rf"^{OP}: x \(Double\) is more precise than factor \(Float\); accumulate into a float64 factor "
            rf"or pass x as float32$"),
        Bad("x-1d", put(x=lambda a, d: a["x"][0]), rf"^{OP}: x must be a 2-D \[M, d\] tensor, got shape \[4\]$"),
        Bad("x-3d", put(x=lambda a, d: a["x"][None]),
            rf"^{OP}: x must be a 2-D \[M, d\] tensor, got shape \[1, 3, 4\]$"),
        Bad("x-d0", put(x=lambda a, d: a["x"][:, :0], factor=lambda a, d: torch.zeros(1, 1, device=d)),
            rf"^{OP}: x must have d >= 1 columns, got shape \[3, 0\]$"),
        Bad("factor-without-bias", put(bias=False),
            rf"^{OP}: factor must be \[D, D\] = \[4, 4\] \(d = 4 columns of x, no bias\), got shape \[5, 5\]$"),
        Bad("factor-bias-missing", put(factor=lambda a, d: torch.zeros(4, 4, device=d)),
            rf"^{OP}: factor must be \[D, D\] = \[5, 5\] \(d = 4 columns of x, \+ 1 for the bias\), "
            rf"got shape \[4, 4\]$"),
        Bad("factor-1d", put(factor=lambda a, d: torch.zeros(25, device=d)),
            rf"^{OP}: factor must be \[D, D\] = \[5, 5\] .*, got shape \[25\]$"),
        Bad("factor-rectangular", put(factor=lambda a, d: torch.zeros(5, 4, device=d)),
            rf"^{OP}: factor must be \[D, D\] = \[5, 5\] .*, got shape \[5, 4\]$"),
        Bad("factor-transposed", put(factor=lambda a, d: torch.zeros(5, 5, device=d).t()),
            rf"^{OP}: factor must be contiguous \(it is written in place\), got strides \[1, 5\]$"),
        Bad("factor-strided", put(factor=lambda a, d: torch.zeros(5, 10, device=d)[:, ::2]),
            rf"^{OP}: factor must be contiguous \(it is written in place\), got strides \[10, 2\]$"),
        Bad("factor-expanded", put(factor=lambda a, d: expanded_like(a["factor"])),
            rf"^{OP}: factor must be contiguous \(it is written in place\), got strides \[0, 0\]$"),
        Bad("scale-negative", put(scale=-1.0), rf"^{OP}: scale must be finite and >= 0, got -1$"),
        Bad("scale-tiny-negative", put(scale=-1e-300), rf"^{OP}: scale must be finite and >= 0, got -1e-300$"),
        Bad("scale-nan", put(scale=float("nan")), rf"^{OP}: scale must be finite and >= 0, got nan$"),
        Bad("scale-inf", put(scale=float("inf")), rf"^{OP}: scale must be finite and >= 0, got inf$"),
        Bad("x-in-factor", _view_of_factor(dense=True),
            rf"^{OP}: x overlaps factor \(the same memory twice in one call\); pass each tensor once$"),
        Bad("x-block-of-factor", _view_of_factor(dense=False), rf"^{OP}: x overlaps factor "),
    ] + placement(OP, "factor", "x", device=_DEVICE_MIX)
    + placement(OP, "x", "factor", device=_DEVICE_MIX))


class TestKfacFactor(OpContract):
    spec = KFAC_FACTOR


# ---- closed forms ------------------------------------------------------------------------------
def _backends(device):
    return ["reference"] + (["native"] if ops.native_op(OP, device) else [])


_EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _assert_close_to(got, want, bound, fd, M, what):
    """|got - want| <= 4 (M + 2) eps * bound elementwise (bound: the sum of the magnitudes of the
    terms of each entry; M + 2 roundings at most: the dot products, the scaling and the final add)."""
    err = (got.cpu().double() - want).abs()
    lim = 4 * (M + 2) * _EPS[fd] * bound
    assert bool((err <= lim).all()), (what, float((err - lim).max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xd,fd", PAIRS, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("M,d,bias", SHAPES + [(500, 3, True), (4, 130, False)])
def test_closed_form(device, xd, fd, M, d, bias):
    """factor == F0 + scale [x, 1]^T [x, 1] (computed in float64 from the rounded x)."""
    gen = torch.Generator().manual_seed(M + 7 * d + bias)
    x = torch.randn(M, d, generator=gen).to(xd)
    F0 = sym(d + bias, gen, fd)
    scale = 0.75
    A = augmented(x, bias)
    want = F0.double() + scale * (A.t() @ A)
    bound = F0.double().abs() + scale * (A.abs().t() @ A.abs())
    for backend in _backends(device):
        f = F0.clone().to(device)
        got = ops.kfac_factor_(f, x.to(device), scale, bias, backend=backend)
        assert got is f and f.dtype == fd and f.shape == (d + bias, d + bias)
        _assert_close_to(f, want, bound, fd, M, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fd", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_integer_inputs_are_exact(device, fd, bias):
    """Small integer activations: every product and sum is exact in float32, so both backends give
    the closed form to the bit: the block x^T x, the bias row and column (colsum) and the corner
    (M), each in its place."""
    gen = torch.Generator().manual_seed(3)
    M, d, scale = 50, 7, 2.0
    x = torch.randint(-4, 5, (M, d), generator=gen).to(fd)
    F0 = torch.randint(-9, 10, (d + bias, d + bias), generator=gen).to(fd)
    F0 = F0 + F0.t()
    A = augmented(x, bias)
    want = (F0.double() + scale * (A.t() @ A)).to(fd)
    for backend in _backends(device):
        f = F0.clone().to(device)
        ops.kfac_factor_(f, x.to(device), scale, bias, backend=backend)
        assert torch.equal(f.cpu(), want), backend
        if bias:
            assert f[d, d].item() == F0[d, d].item() + scale * M, backend
            assert torch.equal(f[d, :d].cpu(), F0[d, :d] + scale * x.sum(0)), backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xd,fd", [(torch.float32, torch.float32), (torch.float16, torch.float64),
                                   (torch.float64, torch.float64)], ids=str)
def test_batches_accumulate(device, xd, fd):
    """Batch after batch (scale 1 / N each) equals one call on all the rows (scale 1 / N), up to
    the order of the sums; from zero, the result is the mean factor of the N rows."""
    gen = torch.Generator().manual_seed(11)
    sizes, d = [17, 1, 64, 0, 30], 9
    xs = [torch.randn(m, d, generator=gen).to(xd).to(device) for m in sizes]
    N = sum(sizes)
    for backend in _backends(device):
        acc = torch.zeros(d + 1, d + 1, dtype=fd, device=device)
        for x in xs:
            ops.kfac_factor_(acc, x, 1.0 / N, True, backend=backend)
        once = torch.zeros_like(acc)
        ops.kfac_factor_(once, torch.cat(xs), 1.0 / N, True, backend=backend)
        torch.testing.assert_close(acc, once, **kf_tol(acc))
        assert torch.equal(acc, acc.t()) and torch.equal(once, once.t()), backend
        assert abs(acc[d, d].item() - 1.0) < 1e-6, backend  # the corner: N / N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fd", [torch.float32, torch.float64], ids=str)
def test_exactly_symmetric(device, fd):
    """Inputs of very different magnitudes, many rows, many calls: a symmetric factor stays equal
    to its transpose bit for bit (the GEMM's x^T x alone need not be)."""
    gen = torch.Generator().manual_seed(5)
    d = 33
    f = {b: sym(d + 1, gen, fd).to(device) for b in _backends(device)}
    for k in range(4):
        x = (torch.randn(301, d, generator=gen) * torch.logspace(-3, 3, d)).to(fd).to(device)
        for backend, F in f.items():
            ops.kfac_factor_(F, x, 0.1 * (k + 1), True, backend=backend)
            assert torch.equal(F, F.t()), (backend, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fd", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", [128, 300, 1030])
def test_blocked_gram_is_exact_and_symmetric(device, fd, d):
    """From 128 columns the CPU kernel computes x^T x in lower column blocks only (2, 2 and 8
    blocks here) and mirrors them: small integer activations give the closed form to the bit
    (every block in its place, none of the skipped upper ones read), onto a symmetric start and
    with the bias; random rows of mixed magnitudes keep the factor equal to its transpose."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randint(-4, 5, (23, d), generator=gen).to(fd)
    F0 = torch.randint(-9, 10, (d + 1, d + 1), generator=gen).to(fd)
    F0 = F0 + F0.t()
    want = (F0.double() + 0.5 * (augmented(x, True).t() @ augmented(x, True))).to(fd)
    for backend in _backends(device):
        f = F0.clone().to(device)
        ops.kfac_factor_(f, x.to(device), 0.5, True, backend=backend)
        assert torch.equal(f.cpu(), want), backend
        g = torch.zeros(d, d, dtype=fd, device=device)
        for k in range(3):
            xr = (torch.randn(50, d, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, d, dtype=torch.float64))
            ops.kfac_factor_(g, xr.to(fd).to(device), 1.0 + k, False, backend=backend)
            assert torch.equal(g, g.t()), (backend, k)


@pytest.mark.parametrize("device", DEVICES)
def test_math_in_factor_dtype(device):
    """float32 x into a float64 factor: the products are formed in float64. x = 1 + 2^-20: its
    square 1 + 2^-19 + 2^-40 needs 41 bits (float32 would lose the 2^-40)."""
    x = torch.full((3, 2), 1.0 + 2.0 ** -20, dtype=torch.float32, device=device)
    exact = 3 * (1.0 + 2.0 ** -20) ** 2  # exact in float64
    for backend in _backends(device):
        f = torch.zeros(2, 2, dtype=torch.float64, device=device)
        ops.kfac_factor_(f, x, 1.0, False, backend=backend)
        assert bool((f == exact).all()), (backend, f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xd", [torch.float16, torch.bfloat16], ids=str)
def test_converted_in_chunks(device, xd):
    """A half x larger than one conversion chunk (64 MiB of float32 rows: 2 chunks here) gives
    the factor of float32 x with the same values (converted whole: one GEMM, no chunks)."""
    d = 64
    rows = CHUNK_BYTES // (d * 4)
    M = rows + 1000
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(M, d, generator=gen).to(xd).to(device)
    for backend in _backends(device):
        f = sym(d + 1, gen, torch.float32).to(device)
        g = f.clone()
        ops.kfac_factor_(f, x, 1.0 / M, True, backend=backend)
        ops.kfac_factor_(g, x.float(), 1.0 / M, True, backend=backend)
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
        assert torch.equal(f, f.t())


@pytest.mark.parametrize("device", DEVICES)
def test_no_rows_change_nothing(device):
    """M = 0: factor keeps every bit (NaN, -0.0, inf included), whatever scale."""
    f0 = torch.tensor([[float("nan"), -0.0, 1.0], [-0.0, float("inf"), 2.0], [1.0, 2.0, -3.5]], device=device)
    for backend in _backends(device):
        for scale in (0.0, 1.0, 1e300):
            f = f0.clone()
            ops.kfac_factor_(f, torch.zeros(0, 2, device=device), scale, True, backend=backend)
            assert torch.equal(f.view(torch.int32), f0.view(torch.int32)), (backend, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_refused_call_leaves_factor_unchanged(device):
    """The checks come before any write: a bad scale after valid tensors changes nothing."""
    gen = torch.Generator().manual_seed(2)
    f0 = sym(4, gen, torch.float32).to(device)
    x = torch.randn(5, 3, generator=gen).to(device)
    for backend in _backends(device):
        f = f0.clone()
        with pytest.raises(RuntimeError, match="scale must be finite"):
            ops.kfac_factor_(f, x, float("nan"), True, backend=backend)
        assert torch.equal(f, f0), backend
