"""CUDA kernels of the fused SG-MCMC steps and of any_nonfinite against the CPU kernels, on the
inputs that exercise the CUDA launcher (csrc/cuda/multi_tensor.cuh, csrc/cuda/sgmcmc.cu):
views whose data pointers are not 16-byte aligned (made on the device), pointers misaligned by
different amounts, chunk boundaries (16384 elements per CUDA block), tails, more than 512 tensors
(several launches, table capacities 1/8/64/512), skip, a non-default stream, channels_last.

Tolerances: CPU and CUDA run the same rule (csrc/common/sgmcmc_rules.h) on the same Philox
normals, but not bit for bit: nvcc contracts a * b + c into FMAs, the host compiler only where it
targets FMA hardware (the AVX2/AVX-512 clones of the noise filler), so fp32 results agree to
~1e-6 relative (1e-5 below). fp16/bf16 compute in fp32 and round once: the two sides can land on
neighbouring values (1 ulp, ~1e-3 / ~8e-3 relative, a step later 2). fp64 computes in fp64, but
the normals are fp32 on both sides and differ at ~1e-7 relative, times the noise scale.
"""
import pytest
import torch

from pyfastbayes import _reference as R
from pyfastbayes import ops

from _helpers import needs_cuda, placed, require_cuda_kernel, sentinels_intact

OPS = {"sgld": (ops.sgld_step_, None), "sghmc": (ops.sghmc_step_, "momenta"), "psgld": (ops.psgld_step_, "square_avg")}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-6, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
CHUNK = 1 << 14  # elements per CUDA block (kChunk)
@pytest.fixture(autouse=True)
def _cuda_kernels():
    require_cuda_kernel("sgld_step_")


def rnd(gen, dtype, *shape, positive=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (x.abs() if positive else x).to(dtype)


def hyper_for(kind, device):
    extra = {"sgld": [0.0, 0.0], "sghmc": [0.1, 0.0], "psgld": [0.9, 1e-3]}[kind]
    return torch.tensor([1e-3, 0.7, 500.0, 2.0] + extra, dtype=torch.float64, device=device)


def call(kind, params, grads, bufs, hyper, rng, skip=None, backend=None, offsets=None):
    fn, state = OPS[kind]
    fn(params=params, grads=grads, **({state: bufs} if state else {}), hyper=hyper, rng=rng, skip=skip,
       offsets=offsets, backend=backend)


def device_lists(kind, dtype, sizes, offsets, gen):
    """CPU lists (contiguous) and device lists of the same values; tensor i of the device lists is
    a view at offsets[i % len(offsets)] = (params, grads, state) elements into its buffer."""
    cpu = ([], [], [])
    dev = ([], [], [])
    bufs = []
    for i, n in enumerate(sizes):
        values = (rnd(gen, dtype, n), rnd(gen, dtype, n), rnd(gen, dtype, n, positive=True))  # state >= 0 (pSGLD)
        for lst, dlst, v, off in zip(cpu, dev, values, offsets[i % len(offsets)]):
            lst.append(v.clone())
            view, buf = placed(v, off)
            dlst.append(view)
            bufs.append((view, buf))
    return cpu, dev, bufs


def compare(kind, dtype, cpu, dev, bufs):
    p, _, b = cpu
    pc, _, bc = dev
    for a, e in zip(pc, p):
        torch.testing.assert_close(a.cpu(), e, **TOL[dtype])
    if OPS[kind][1]:
        for a, e in zip(bc, b):
            torch.testing.assert_close(a.cpu(), e, **TOL[dtype])
    assert all(sentinels_intact(v, buf) for v, buf in bufs)


# sizes: odd, aligned, one element, crossing a CUDA chunk (each chunk has its own head and tail)
SIZES = [0, 1, 3, 4, 5, 17, 64, 1027, CHUNK + 5, 2 * CHUNK + 11]
# (params, grads, state) element offsets: aligned, one misalignment shared by all (the head is
# peeled), different misalignments (the odd pointers go element by element), 2 (fp64: aligned)
OFFSETS = [(0, 0, 0), (1, 1, 1), (3, 3, 3), (1, 3, 2), (0, 1, 0), (2, 2, 2), (5, 5, 5), (7, 0, 7)]


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(OPS))
def test_step_cuda_matches_cpu_on_unaligned_device_views(kind, dtype):
    gen = torch.Generator().manual_seed(100 + DTYPES.index(dtype) * 10 + list(OPS).index(kind))
    cpu, dev, bufs = device_lists(kind, dtype, SIZES, OFFSETS, gen)
    assert any(t.data_ptr() % 16 for t in dev[0]), "the device views must include unaligned ones"
    rng, rng_c = torch.tensor([987654321, 3]), torch.tensor([987654321, 3], device="cuda")
    for _ in range(3):  # the state carries over; each step draws fresh noise
        call(kind, *cpu, hyper_for(kind, "cpu"), rng)
        call(kind, *dev, hyper_for(kind, "cuda"), rng_c, backend="native")
    assert rng_c.tolist() == rng.tolist() == [987654321, 6]
    compare(kind, dtype, cpu, dev, bufs)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(OPS))
def test_step_with_offsets_cuda_matches_cpu(kind, dtype):
    """offsets (the Philox index of each tensor's element 0) on CUDA as on the CPU: every residue
    mod 4 (the vector steps then straddle Philox blocks whatever the head), one past 2^32 blocks,
    on unaligned device views across chunk boundaries."""
    gen = torch.Generator().manual_seed(300 + DTYPES.index(dtype) * 10 + list(OPS).index(kind))
    cpu, dev, bufs = device_lists(kind, dtype, SIZES, OFFSETS, gen)
    offsets = [(7 * i + 1) * 5 + (i % 4) for i in range(len(SIZES))]
    offsets[3] = 2**34 + 3
    rng, rng_c = torch.tensor([123, 3]), torch.tensor([123, 3], device="cuda")
    for step in range(3):  # None, then the offsets, then others: the state carries over
        off = None if step == 0 else offsets if step == 1 else [o + 2 for o in offsets]
        call(kind, *cpu, hyper_for(kind, "cpu"), rng, offsets=off)
        call(kind, *dev, hyper_for(kind, "cuda"), rng_c, backend="native", offsets=off)
    assert rng_c.tolist() == rng.tolist() == [123, 6]
    compare(kind, dtype, cpu, dev, bufs)


@needs_cuda
@pytest.mark.parametrize("kind", list(OPS))
def test_pieces_with_offsets_equal_the_whole_on_cuda(kind):
    """A tensor split at k (odd k, k across a 16384-element chunk) and its pieces stepped with
    offsets (0, k) on the same stream, as unaligned device views: equals the whole stepped on
    CUDA and the whole stepped on the CPU (the FSDP2 rule: a rank's shard gets the noise of its
    elements in the full tensor)."""
    n = 2 * CHUNK + 37
    gen = torch.Generator().manual_seed(61)
    x, g, b = (rnd(gen, torch.float32, n, positive=(k == 2)) for k in range(3))
    hyper_c, hyper = hyper_for(kind, "cuda"), hyper_for(kind, "cpu")
    whole = [[x.cuda()], [g.cuda()], [b.cuda()]]
    call(kind, *whole, hyper_c, torch.tensor([4, 1], device="cuda"), backend="native")
    cpu = [[x.clone()], [g.clone()], [b.clone()]]
    call(kind, *cpu, hyper, torch.tensor([4, 1]))
    for k in (1, 3, 6, CHUNK - 1, CHUNK + 5, n - 2):
        got, views = ([], []), []
        for lo, hi, at in ((0, k, 1), (k, n, 3)):  # each piece: its own call, stream 0 like the whole
            piece = []
            for v in (x, g, b):
                view, buf = placed(v[lo:hi].clone(), at)  # unaligned device views
                piece.append([view])
                views.append((view, buf))
            call(kind, *piece, hyper_c, torch.tensor([4, 1], device="cuda"), backend="native", offsets=[lo])
            got[0].append(piece[0][0])
            got[1].append(piece[2][0])
        p = torch.cat(got[0])
        torch.testing.assert_close(p, whole[0][0], rtol=1e-6, atol=1e-6, msg=lambda m: f"split at {k}: {m}")
        torch.testing.assert_close(p.cpu(), cpu[0][0], **TOL[torch.float32])
        if OPS[kind][1]:
            torch.testing.assert_close(torch.cat(got[1]), whole[2][0], rtol=1e-6, atol=1e-6)
        assert all(sentinels_intact(v, buf) for v, buf in views)


@needs_cuda
@pytest.mark.parametrize("count", [1, 5, 40, 552, 1100])
@pytest.mark.parametrize("kind", list(OPS))
def test_step_launch_capacities_and_splits(kind, count):
    """1, 5, 40 tensors: tables of 1, 8, 64 slots; 552: 512 + 40 (a second launch of 64 slots);
    1100: three launches. Empty tensors in between: the stream id stays the list index."""
    gen = torch.Generator().manual_seed(7 + count)
    sizes = [0 if i % 97 == 50 else (i * 7) % 23 + 1 for i in range(count)]
    if count == 1:
        sizes = [3 * CHUNK + 3]
    cpu, dev, bufs = device_lists(kind, torch.float32, sizes, OFFSETS[1:5], gen)
    rng, rng_c = torch.tensor([5, 0]), torch.tensor([5, 0], device="cuda")
    call(kind, *cpu, hyper_for(kind, "cpu"), rng)
    call(kind, *dev, hyper_for(kind, "cuda"), rng_c, backend="native")
    compare(kind, torch.float32, cpu, dev, bufs)


@needs_cuda
def test_step_streams_follow_the_list_index():
    """Equal inputs in different list positions get different noise (stream = index), on CUDA as
    on the CPU, also across a launch split (index 600 is in the second launch)."""
    n, count = 37, 601
    p = [torch.zeros(n, device="cuda") for _ in range(count)]
    g = [torch.zeros(n, device="cuda") for _ in range(count)]
    hyper = torch.tensor([1e-2, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device="cuda")
    ops.sgld_step_(p, g, hyper, torch.tensor([3, 0], device="cuda"), backend="native")
    pc, gc = [torch.zeros(n) for _ in range(count)], [torch.zeros(n) for _ in range(count)]
    ops.sgld_step_(pc, gc, hyper.cpu(), torch.tensor([3, 0]))
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[599], p[600])
    for i in (0, 1, 511, 512, 600):
        torch.testing.assert_close(p[i].cpu(), pc[i], **TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("kind", list(OPS))
def test_skip_true_changes_nothing_skip_false_steps(kind):
    gen = torch.Generator().manual_seed(31)
    cpu, dev, bufs = device_lists(kind, torch.float32, SIZES, OFFSETS, gen)
    before = [t.clone() for lst in dev for t in lst]
    rng_c = torch.tensor([9, 4], device="cuda")
    call(kind, *dev, hyper_for(kind, "cuda"), rng_c, torch.tensor(True, device="cuda"), backend="native")
    assert rng_c.tolist() == [9, 4]
    assert all(torch.equal(a, e) for a, e in zip([t for lst in dev for t in lst], before))
    call(kind, *dev, hyper_for(kind, "cuda"), rng_c, torch.tensor(False, device="cuda"), backend="native")
    rng = torch.tensor([9, 4])
    call(kind, *cpu, hyper_for(kind, "cpu"), rng, torch.tensor(False))
    assert rng_c.tolist() == rng.tolist() == [9, 5]
    compare(kind, torch.float32, cpu, dev, bufs)
    assert not torch.equal(dev[0][-1], before[len(SIZES) - 1])  # it did step


@needs_cuda
@pytest.mark.parametrize("kind", list(OPS))
def test_step_on_a_non_default_stream(kind):
    """The kernels, the copies of non-contiguous tensors and their write-back all run on the
    current stream: inputs written on the default stream, three steps on a side stream, then
    the default stream waits for it."""
    gen = torch.Generator().manual_seed(41)
    cpu, dev, bufs = device_lists(kind, torch.float32, [5, CHUNK + 3, 1027], OFFSETS[1:4], gen)
    for lists in (cpu, dev):  # a non-contiguous member (computed on a copy and written back)
        for lst, seed in zip(lists, (1, 2, 3)):
            lst.append(torch.randn(33, 21, generator=torch.Generator().manual_seed(seed)).abs()
                       .to(lists[0][0].device).t())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    rng_c = torch.tensor([77, 0], device="cuda")
    hyper_c = hyper_for(kind, "cuda")
    with torch.cuda.stream(side):
        for _ in range(3):
            call(kind, *dev, hyper_c, rng_c, backend="native")
        flag = ops.any_nonfinite(dev[0], backend="native")
    torch.cuda.current_stream().wait_stream(side)
    rng = torch.tensor([77, 0])
    for _ in range(3):
        call(kind, *cpu, hyper_for(kind, "cpu"), rng)
    assert rng_c.tolist() == rng.tolist() and not flag.item()
    compare(kind, torch.float32, cpu, dev, bufs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", list(OPS))
def test_channels_last_parameter(kind, dtype):
    """A channels_last 4-D parameter (with channels_last gradient and state, as the optimizers
    allocate them) is updated in place in its memory format, with the noise of its logical
    (row-major) element order: CUDA = CPU = the reference."""
    gen = torch.Generator().manual_seed(51)
    shape = (3, 10, 7, 5)
    vals = [rnd(gen, dtype, *shape, positive=(k == 2)) for k in range(3)]
    cl = [v.to(memory_format=torch.channels_last) for v in vals]
    dev = [[v.cuda().to(memory_format=torch.channels_last)] for v in vals]
    cpu = [[v.clone(memory_format=torch.channels_last)] for v in cl]
    ref = [[v.clone(memory_format=torch.channels_last)] for v in cl]
    ptr = dev[0][0].data_ptr()
    rng_c, rng, rng_r = (torch.tensor([8, 2], device=d) for d in ("cuda", "cpu", "cpu"))
    for _ in range(2):
        call(kind, *dev, hyper_for(kind, "cuda"), rng_c, backend="native")
        call(kind, *cpu, hyper_for(kind, "cpu"), rng)
        call(kind, *ref, hyper_for(kind, "cpu"), rng_r, backend="reference")
    p = dev[0][0]
    assert p.data_ptr() == ptr and p.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p.cpu(), cpu[0][0], **TOL[dtype])
    torch.testing.assert_close(p.cpu(), ref[0][0], **TOL[dtype])
    if OPS[kind][1]:
        torch.testing.assert_close(dev[2][0].cpu(), cpu[2][0], **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# any_nonfinite
# ---------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_nonfinite_cuda_on_unaligned_device_views(dtype, offset):
    """Clean views are False; one NaN / +inf / -inf anywhere -- the peeled head, a vector, a
    chunk's head, the tail element -- is True; a NaN just outside the view is not seen."""
    gen = torch.Generator().manual_seed(61 + offset)
    for n in [1, 2, 7, 8, 9, 33, CHUNK + 9, 2 * CHUNK + 3]:
        view, buf = placed(rnd(gen, dtype, n), offset)
        buf[:offset] = float("nan")  # just outside the view, both sides
        buf[offset + n:] = float("nan")
        assert not ops.any_nonfinite([view], backend="native").item()
        assert not ops.any_nonfinite([view.cpu()]).item()
        positions = {0, 1, 2, 3, n // 2, n - 2, n - 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 2}
        for pos in sorted(q for q in positions if 0 <= q < n):
            keep = view[pos].clone()
            for bad in (float("nan"), float("inf"), -float("inf")):
                view[pos] = bad
                got = ops.any_nonfinite([view], backend="native")
                assert got.device == view.device
                assert got.item(), (n, pos, bad)
                assert ops.any_nonfinite([view.cpu()]).item()
            view[pos] = keep
        assert not ops.any_nonfinite([view], backend="native").item()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_nonfinite_cuda_many_tensors_and_layouts(dtype):
    """More than 512 tensors (a second launch), mixed dtypes, and the layouts: dense permuted
    ones (channels_last, transposed) are read in place in memory order, strided ones from copies
    (a NaN in a skipped element is not part of the tensor)."""
    gen = torch.Generator().manual_seed(71)
    ts = [placed(rnd(gen, dtype, (i * 5) % 19 + 1), i % 4)[0] for i in range(600)]
    ts.append(torch.zeros(3, dtype=torch.float64, device="cuda"))
    assert not ops.any_nonfinite(ts, backend="native").item()
    for i in (0, 511, 512, 599):
        ts[i][-1] = float("nan")
        assert ops.any_nonfinite(ts, backend="native").item(), i
        ts[i][-1] = 0
    cl = rnd(gen, dtype, 2, 6, 5, 3).cuda().to(memory_format=torch.channels_last)
    tr = rnd(gen, dtype, 9, 7).cuda().t()
    base = rnd(gen, dtype, 10, 10).cuda()
    strided = base[::2]
    base[1, 3] = float("inf")  # a row the view skips
    assert not ops.any_nonfinite([cl, tr, strided], backend="native").item()
    for t, idx in ((cl, (1, 4, 2, 0)), (tr, (6, 8)), (strided, (4, 9))):
        t[idx] = float("nan")
        assert ops.any_nonfinite([cl, tr, strided], backend="native").item(), idx
        assert ops.any_nonfinite([t.cpu()]).item() and R.any_nonfinite([t]).item()
        t[idx] = 0
