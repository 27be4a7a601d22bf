"""kfac_factor_: the CUDA kernel (cuBLAS GEMM + the elementwise update of csrc/cuda/kfac.cu)
against the CPU op (MKL / OpenBLAS GEMM + the same update) on the same inputs: every (x, factor)
dtype pair, with and without the bias, one element up to D * D past one grid-stride round, x as
device views (transposed, strided, unaligned), factor a device view with sentinels around it, two
batches into one factor, the converted row chunks, a side stream, M = 0.

Tolerance: the GEMMs add the M products of an entry in other orders, so |gpu - cpu| <=
4 (M + 2) eps * bound, bound = |F0| + scale |A|^T |A| (A = [x, 1]), eps of factor's dtype: the
worst-case rounding of both sides (in practice far below). Exact: the symmetry of both results,
and every bit of factor when M = 0.
"""
import pytest
import torch

from pyfastbayes import ops

from _helpers import needs_cuda, needs_native, placed, require_cuda_kernel, sentinels_intact

pytestmark = [needs_cuda, needs_native]

OP = "kfac_factor_"
PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
         (torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float64),
         (torch.bfloat16, torch.float64)]
_EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
CHUNK_BYTES = 64 << 20  # kKfacChunkBytes (csrc/common/kfac.h)


def sym(D, gen, dtype):
    B = torch.randn(D, D, generator=gen, dtype=torch.float64)
    return (0.5 * (B + B.t())).to(dtype)


def augmented_abs(x, bias):
    A = x.double().abs()
    return torch.cat([A, torch.ones(A.shape[0], 1, dtype=torch.float64)], 1) if bias else A


def assert_close_bound(gpu, cpu, F0, xs, scales, bias, fd):
    bound = F0.double().abs()
    M = 0
    for x, s in zip(xs, scales):
        A = augmented_abs(x, bias)
        bound = bound + s * (A.t() @ A)
        M = max(M, x.shape[0])
    err = (gpu.cpu().double() - cpu.double()).abs()
    lim = 4 * (M + 2) * _EPS[fd] * bound
    assert bool((err <= lim).all()), float((err - lim).max())


def device_view(x, how):
    """x (CPU) as a view made on the device: 'T' transposed, 'rows' every other row, 'offset'
    one element past an aligned allocation (unaligned base), 'plain' contiguous."""
    if how == "T":
        return x.t().contiguous().cuda().t()
    if how == "rows":
        return torch.stack([x, x], 1).reshape(2 * x.shape[0], x.shape[1]).cuda()[1::2]
    if how == "offset":
        return placed(x, offset=1)[0]
    return x.cuda()


# (M, d, bias, x view): one element, tails, D = 1025 (D * D > one grid-stride round of 132 * 8
# blocks of 256 threads), many rows, a wide bias column
SHAPES = [(1, 1, True, "plain"), (1, 1, False, "offset"), (257, 3, True, "T"), (1000, 64, False, "rows"),
          (70, 200, True, "offset"), (300, 1024, True, "T"), (5000, 31, False, "plain")]


@pytest.mark.parametrize("xd,fd", PAIRS, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("M,d,bias,view", SHAPES)
def test_cuda_matches_cpu(xd, fd, M, d, bias, view):
    require_cuda_kernel(OP)
    gen = torch.Generator().manual_seed(M + 3 * d + bias)
    F0 = sym(d + bias, gen, fd)
    xs = [torch.randn(M, d, generator=gen).to(xd), torch.randn(M // 2 + 1, d, generator=gen).to(xd)]
    scales = [0.5, 3.0]
    cpu = F0.clone()
    gpu, buf = placed(F0, offset=3)
    for x, s in zip(xs, scales):
        ops.kfac_factor_(cpu, x, s, bias, backend="native")
        xg = device_view(x, view)
        assert xg.is_cuda and torch.equal(xg.cpu(), x)
        ops.kfac_factor_(gpu, xg, s, bias, backend="native")
    assert torch.equal(gpu, gpu.t()), "CUDA result not exactly symmetric"
    assert torch.equal(cpu, cpu.t())
    assert sentinels_intact(gpu, buf)
    assert_close_bound(gpu, cpu, F0, xs, scales, bias, fd)


@pytest.mark.parametrize("xd", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_chunked_conversion(xd):
    """x converted to float64 in two row chunks (64 MiB of float64 rows each) on the device."""
    require_cuda_kernel(OP)
    d = 64
    M = CHUNK_BYTES // (d * 8) + 777
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, d, generator=gen).to(xd)
    F0 = sym(d + 1, gen, torch.float64)
    cpu, gpu = F0.clone(), F0.clone().cuda()
    ops.kfac_factor_(cpu, x, 1.0 / M, True, backend="native")
    ops.kfac_factor_(gpu, x.cuda(), 1.0 / M, True, backend="native")
    assert torch.equal(gpu, gpu.t())
    assert_close_bound(gpu, cpu, F0, [x], [1.0 / M], True, torch.float64)


def test_cuda_side_stream():
    """The GEMM and the update run on the current stream (a side stream here): the result, read
    after that stream's work, equals the CPU op's."""
    require_cuda_kernel(OP)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 128, generator=gen)
    F0 = sym(129, gen, torch.float32)
    cpu = F0.clone()
    ops.kfac_factor_(cpu, x, 0.25, True, backend="native")
    xg, gpu = x.cuda(), F0.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.kfac_factor_(gpu, xg, 0.25, True, backend="native")
        out = gpu.clone()  # ordered after the op on the side stream
    side.synchronize()
    assert_close_bound(out, cpu, F0, [x], [0.25], True, torch.float32)


def test_cuda_no_rows_change_nothing():
    require_cuda_kernel(OP)
    f0 = torch.tensor([[float("nan"), -0.0], [-0.0, float("inf")]], dtype=torch.float64)
    f = f0.cuda()
    ops.kfac_factor_(f, torch.zeros(0, 1, dtype=torch.float16, device="cuda"), 2.0, True, backend="native")
    assert torch.equal(f.cpu().view(torch.int64), f0.view(torch.int64))
