"""CUDA kernel of swag_collect_ against the CPU kernel, on the inputs that exercise the CUDA
launcher (csrc/cuda/multi_tensor.cuh, csrc/cuda/swag_collect.cu): ring rows of D when P % 4 != 0
(every row starts at a different 16-byte misalignment), odd-sized tensors before aligned ones
(their flat offsets into mean / sq_mean / D are odd), parameter views made on the device, a
misaligned mean, fp16 / bf16 deviations and parameters, more than 512 tensors, channels_last.

Tolerances: both sides run common/swag.h's update, but nvcc contracts a + w (b - a) into an FMA
and the host compiler does not, so fp32 state agrees to a few ulp (1e-5 below), fp64 to ~1e-12;
fp16 / bf16 deviation rows are rounded once from the state type and can land on neighbouring
values (1 ulp: ~1e-3 / ~8e-3 relative).
"""
import pytest
import torch

from pyfastbayes import ops

from _helpers import needs_cuda, placed, require_cuda_kernel, sentinels_intact

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DEV_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STATE_DTYPES = [torch.float32, torch.float64]
CHUNK = 1 << 14  # elements per CUDA block (kChunk)


@pytest.fixture(autouse=True)
def _cuda_kernels():
    require_cuda_kernel("swag_collect_")


# odd-sized tensors before aligned ones: the flat offsets 3, 38, 39, 103, 1130, 17521, 21617 are not
# multiples of 4 (P = 21623)
SHAPES = [(3,), (5, 7), (1,), (64,), (1027,), (CHUNK + 7,), (4096,), (2, 3)]


def trajectory(shapes, dtypes, n_steps, gen):
    """n_steps lists of CPU parameter values (a moving trajectory), tensor i of dtype dtypes[i % len]."""
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    out = []
    for _ in range(n_steps):
        base = [b + 0.3 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in base]
        out.append([b.to(dtypes[i % len(dtypes)]) for i, b in enumerate(base)])
    return out


def run_both(steps, state_dtype, dev_dtype, K, param_offsets=(0,), mean_offset=0, swa=False):
    """The collects of `steps` on the CPU (contiguous params) and on the device (params placed at
    param_offsets[i % len], mean / sq_mean at mean_offset, D [K, P] written row n % K);
    returns ((mean, sq, D) on the CPU, the same on the device, the device views and buffers)."""
    P = sum(t.numel() for t in steps[0])
    mean, sq = torch.zeros(P, dtype=state_dtype), torch.zeros(P, dtype=state_dtype)
    D = torch.zeros(K, P, dtype=dev_dtype)
    mean_c, mbuf = placed(mean, mean_offset)
    sq_c, sbuf = placed(sq, mean_offset)
    D_c = D.cuda()
    views = [(mean_c, mbuf), (sq_c, sbuf)]
    for n, ps in enumerate(steps):
        pc = []
        for i, p in enumerate(ps):
            view, buf = placed(p, param_offsets[i % len(param_offsets)])
            views.append((view, buf))
            pc.append(view)
        if swa:
            ops.swag_collect_(ps, mean, None, None, n)
            ops.swag_collect_(pc, mean_c, None, None, n, backend="native")
        else:
            ops.swag_collect_(ps, mean, sq, D[n % K], n)
            ops.swag_collect_(pc, mean_c, sq_c, D_c[n % K], n, backend="native")
        assert all(torch.equal(a.cpu(), b) for a, b in zip(pc, ps))  # params are only read
    return (mean, sq, D), (mean_c, sq_c, D_c), views


def assert_match(cpu, dev, views):
    for a, e in zip(dev, cpu):
        torch.testing.assert_close(a.cpu(), e, **TOL[e.dtype])
    assert all(sentinels_intact(v, b) for v, b in views)


@needs_cuda
@pytest.mark.parametrize("dev_dtype", DEV_DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_collect_ring_rows_with_p_not_a_multiple_of_4(state_dtype, dev_dtype):
    """P = 21623 (P % 4 = 3): row k of D starts (3k mod 4) elements past a 16-byte boundary; the odd-sized
    tensors first put every later tensor at an odd flat offset; six collects fill the K = 4 rows
    and wrap to rows 0 and 1."""
    gen = torch.Generator().manual_seed(1 + DEV_DTYPES.index(dev_dtype) + 10 * STATE_DTYPES.index(state_dtype))
    steps = trajectory(SHAPES, [torch.float32], 6, gen)
    assert sum(t.numel() for t in steps[0]) % 4 == 3
    cpu, dev, views = run_both(steps, state_dtype, dev_dtype, K=4)
    assert any(row.data_ptr() % 16 for row in dev[2])
    assert_match(cpu, dev, views)


@needs_cuda
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("param_dtypes", [[torch.float16], [torch.bfloat16], [torch.float64],
                                          [torch.float32, torch.float16, torch.bfloat16, torch.float64]])
def test_collect_unaligned_device_views_and_mixed_param_dtypes(state_dtype, param_dtypes):
    """Parameters as [1:], [3:], [2:] views made on the device (misaligned against mean by
    different amounts), a mean that is itself misaligned, half / double parameters (one launch per
    parameter dtype), fp16 and bf16 deviation rows."""
    gen = torch.Generator().manual_seed(20 + len(param_dtypes))
    steps = trajectory(SHAPES, param_dtypes, 5, gen)
    for dev_dtype, mean_offset in ((torch.float16, 1), (torch.bfloat16, 3), (torch.float32, 0)):
        cpu, dev, views = run_both(steps, state_dtype, dev_dtype, K=3, param_offsets=(1, 3, 0, 2),
                                   mean_offset=mean_offset)
        assert_match(cpu, dev, views)


@needs_cuda
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_collect_swa_only(state_dtype):
    gen = torch.Generator().manual_seed(30)
    steps = trajectory(SHAPES, [torch.float32, torch.bfloat16], 4, gen)
    cpu, dev, views = run_both(steps, state_dtype, torch.float32, K=2, param_offsets=(1, 0), mean_offset=1,
                               swa=True)
    assert_match(cpu[:1], dev[:1], views)


@needs_cuda
@pytest.mark.parametrize("count", [1, 7, 60, 530, 1030])
def test_collect_launch_capacities_and_splits(count):
    """1 / 7 / 60 tensors: tables of 1 / 8 / 64 slots; 530: 512 + 18; 1030: three launches
    (empty tensors in between)."""
    gen = torch.Generator().manual_seed(40 + count)
    shapes = [(0,) if i % 101 == 5 else ((i * 3) % 13 + 1,) for i in range(count)]
    if count == 1:
        shapes = [(2 * CHUNK + 5,)]
    steps = trajectory(shapes, [torch.float32], 3, gen)
    cpu, dev, views = run_both(steps, torch.float32, torch.bfloat16, K=2, param_offsets=(0, 1, 2, 3))
    assert_match(cpu, dev, views)


@needs_cuda
def test_collect_channels_last_and_strided_params():
    """Non-contiguous parameters (channels_last, transposed, strided) are taken in logical order."""
    gen = torch.Generator().manual_seed(50)
    P = 3 * 10 * 7 * 5 + 9 * 7 + 5 * 10
    mean, sq, D = torch.zeros(P), torch.zeros(P), torch.zeros(2, P, dtype=torch.float16)
    mean_c, sq_c, D_c = mean.cuda(), sq.cuda(), D.cuda()
    for n in range(3):
        vals = [torch.randn(3, 10, 7, 5, generator=gen), torch.randn(7, 9, generator=gen),
                torch.randn(10, 10, generator=gen)]
        ps = [vals[0].contiguous(memory_format=torch.channels_last), vals[1].t(), vals[2][::2]]
        pc = [vals[0].cuda().contiguous(memory_format=torch.channels_last), vals[1].cuda().t(),
              vals[2].cuda()[::2]]
        ops.swag_collect_(ps, mean, sq, D[n % 2], n)
        ops.swag_collect_(pc, mean_c, sq_c, D_c[n % 2], n, backend="native")
        if n == 0:  # the first collect copies theta: mean is the params flattened in logical order
            torch.testing.assert_close(mean_c.cpu(), torch.cat([p.reshape(-1) for p in ps]), rtol=0, atol=0)
    for a, e in zip((mean_c, sq_c, D_c), (mean, sq, D)):
        torch.testing.assert_close(a.cpu(), e, **TOL[e.dtype])
