"""RNG ops (philox4x32, philox_normal_): the op contract, Random123's known answers, the normal
stream's statistics, CPU vs CUDA bits."""
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from pyfastbayes import _reference as R
from pyfastbayes import ops

from _helpers import (ALL_DTYPES, DEVICES, Bad, OpContract, OpSpec, expanded_like, needs_cuda, put,
                      self_overlapping, sparse_like)

# Random123 kat_vectors for philox4x32_10: (counter; key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KEYS = [(0, 0), (2**32 - 1, 12345), (0xDEADBEEF, 0x01234567)]
# (seed, stream, step): extremes of each word, a negative seed (its two's complement is the key)
STREAMS = [(0, 0, 0), (2**63 - 1, 7, 3), (-5, 2**31 - 1, 2**32 - 1)]


# ---------------------------------------------------------------------------------------------
# philox4x32
# ---------------------------------------------------------------------------------------------
def _counters(n, device, gen):
    return torch.randint(0, 2**32, (n, 4), generator=gen, dtype=torch.int64).to(device)


def philox_make(kind, device, dtype, gen):
    if kind == "random":  # 4096 random counters (uint32 words) under three keys
        ctr = _counters(4096, device, gen)
        return [dict(counters=ctr, key0=k0, key1=k1) for k0, k1 in KEYS]
    if kind == "empty":
        return [dict(counters=torch.zeros(0, 4, dtype=torch.int64, device=device), key0=1, key1=2)]
    wide = _counters(8, device, gen).t().contiguous().t()  # [8, 4] column-major
    return [dict(counters=wide, key0=3, key1=4), dict(counters=_counters(66, device, gen)[::3], key0=5, key1=6)]


def philox_good(device):
    return dict(counters=_counters(33, device, torch.Generator().manual_seed(7)), key0=3, key1=4)


PHILOX4X32 = OpSpec(
    "philox4x32", grid=[torch.int64], make=philox_make, good=philox_good, seed=1,
    bad=[
        Bad("float", put(counters=lambda a, d: a["counters"].float()), r"philox4x32: counters must be int64 \[N, 4\], got Float \[33, 4\]"),
        Bad("3-columns", put(counters=lambda a, d: a["counters"][:, :3]), r"counters must be int64 \[N, 4\], got Long \[33, 3\]"),
        Bad("1-d", put(counters=lambda a, d: a["counters"].reshape(-1)), r"counters must be int64 \[N, 4\], got Long \[132\]"),
        Bad("int32", put(counters=lambda a, d: a["counters"].int()), r"counters must be int64 \[N, 4\], got Int"),
        Bad("sparse", put(counters=lambda a, d: sparse_like(a["counters"])), r"philox4x32: counters .*(?i:sparse)"),
    ])


class TestPhilox4x32(OpContract):
    spec = PHILOX4X32


@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(impl, device, ctr, key, expected):
    if impl == "native" and not ops.native_op("philox4x32", device):
        pytest.skip("no native kernel")
    out = ops.philox4x32(torch.tensor([ctr], dtype=torch.int64, device=device), *key, backend=impl)
    assert tuple(out[0].tolist()) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_native_bits_match_reference(device):
    """Bit-exact (rtol = atol = 0), for every key of KEYS (also covered by the contract)."""
    if not ops.native_op("philox4x32", device):
        pytest.skip("no native kernel")
    ctr = _counters(4096, device, torch.Generator().manual_seed(1))
    for k0, k1 in KEYS:
        torch.testing.assert_close(ops.philox4x32(ctr, k0, k1), R.philox4x32(ctr, k0, k1), rtol=0, atol=0)


def test_reference_refuses_bad_counters_like_the_kernel():
    """The reference raises what TORCH_CHECK raises (RuntimeError), not ValueError."""
    with pytest.raises(RuntimeError, match="counters must be int64"):
        ops.philox4x32(torch.zeros(3, 3, dtype=torch.int64), 0, 0)
    with pytest.raises(RuntimeError, match="counters must be int64"):
        R.philox4x32(torch.zeros(3, 4), 0, 0)


# ---------------------------------------------------------------------------------------------
# philox_normal_
# ---------------------------------------------------------------------------------------------
NORMAL_SIZES = [1, 3, 4, 5, 1027, 100_003]


def normal_make(kind, device, dtype, gen):
    if kind == "random":  # every size x every (seed, stream, step)
        return [dict(out=torch.empty(n, dtype=dtype, device=device), seed=s, stream=st, step=sp)
                for n in NORMAL_SIZES for s, st, sp in STREAMS]
    if kind == "empty":
        return [dict(out=torch.empty(0, dtype=dtype, device=device), seed=s, stream=st, step=sp) for s, st, sp in STREAMS]
    return [dict(out=torch.zeros(40, 30, dtype=dtype, device=device).t(), seed=11, stream=2, step=9),
            dict(out=torch.zeros(7, 9, dtype=dtype, device=device)[:, 1:6], seed=-3, stream=5, step=1)]


def normal_tol(t):
    # the native Box-Muller uses fp32 polynomials (csrc/common/fastmath.h): a few ulp of |z| <= 5.8
    return {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}.get(
        t.dtype, dict(rtol=2e-6, atol=2e-6))


PHILOX_NORMAL = OpSpec(
    "philox_normal_", grid=ALL_DTYPES, make=normal_make, tol=normal_tol, seed=2,
    good=lambda device: dict(out=torch.empty(37, device=device), seed=5, stream=1, step=2),
    bad=[
        Bad("int-out", put(out=lambda a, d: torch.zeros(5, dtype=torch.int64, device=d)),
            r"philox_normal_: out must be floating point, got Long"),
        Bad("bool-out", put(out=lambda a, d: torch.zeros(5, dtype=torch.bool, device=d)),
            r"philox_normal_: out must be floating point, got Bool"),
        Bad("expanded-out", put(out=lambda a, d: expanded_like(torch.empty(6, device=d))),
            r"philox_normal_: out has internal overlap"),
        Bad("as-strided-out", put(out=lambda a, d: self_overlapping(device=d)), r"philox_normal_: out has internal overlap"),
        Bad("sparse-out", put(out=lambda a, d: sparse_like(torch.ones(6, device=d))), r"philox_normal_: out .*(?i:sparse)"),
    ])


class TestPhiloxNormal(OpContract):
    spec = PHILOX_NORMAL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0] + NORMAL_SIZES)
@pytest.mark.parametrize("seed,stream,step", STREAMS)
def test_normal_stream_matches_reference(device, n, seed, stream, step):
    """The op (native where built, else the reference) equals the reference stream function."""
    out = torch.empty(n, device=device)
    ops.philox_normal_(out, seed, stream, step)
    ref = R.philox_normal(n, seed, stream, step, device)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_normal_stream_other_dtypes_and_views(dtype):
    base = torch.zeros(40, 30, dtype=dtype)
    view = base.t()  # non-contiguous
    ops.philox_normal_(view, 11, 2, 9)
    ref = R.philox_normal(view.numel(), 11, 2, 9).view(30, 40).to(dtype)
    torch.testing.assert_close(view, ref, rtol=1e-2 if dtype != torch.float64 else 1e-6, atol=1e-2)


def test_philox_normal_range_is_a_window_of_the_stream():
    full = R.philox_normal(40, 5, 7, 1)
    for start in (0, 3, 4, 13):
        torch.testing.assert_close(R.philox_normal_range(start, 20, 5, 7, 1), full[start:start + 20])


@pytest.mark.skipif(not ops.native_op("philox_normal_", "cpu"), reason="needs the compiled extension")
def test_normal_statistics():
    n = 2_000_000
    z = torch.empty(n)
    ops.philox_normal_(z, 42, 0, 0)
    zd = z.double()
    se = 1 / math.sqrt(n)
    assert abs(zd.mean().item()) < 5 * se
    assert abs(zd.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((zd**3).mean().item()) < 5 * math.sqrt(15) * se  # skewness, Var(z^3) = 15
    assert abs((zd**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis, Var(z^4) = 96
    # tail mass beyond 2 sigma: binomial standard error
    p = 2 * 0.5 * math.erfc(2 / math.sqrt(2))
    frac = (zd.abs() > 2).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # neighbouring lanes, streams and steps are uncorrelated
    other = torch.empty(n)
    for stream, step in [(1, 0), (0, 1)]:
        ops.philox_normal_(other, 42, stream, step)
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5 * se
    lanes = z.view(-1, 4).double()
    c = torch.corrcoef(lanes.t())
    assert (c - torch.eye(4, dtype=c.dtype)).abs().max() < 5 * 2 * se


# The CPU draws Philox blocks in bulk by one of three versions (csrc/cpu/philox_tile.cpp: AVX-512F,
# AVX2 intrinsics, the portable loop), picked once per process; PYFASTBAYES_PHILOX_ISA caps it.
_ISA_N = 100_003  # several 64-block tiles and tasks, and a partial last block
# block counters whose high word is not 0, that cross 2^32 inside a tile, and that wrap past 2^64 - 1
_ISA_TILES = [(0x123456789ABCDEF0, 9, 0xFFFFFFFF, 2**32 - 5, 64), (2**64 - 1, 0, 7, 2**64 - 40, 64),
              (5, 2**31, 3, 2**63 - 3, 37), (0, 0, 0, 7 * 2**32, 1), (2**63, 1, 2, 2**33 - 1, 9)]
_ISA_SCRIPT = f"""
import sys, torch
from pyfastbayes import _C, ops
signs = torch.empty({_ISA_N})
ops.vi_rademacher_(signs, torch.tensor([-5, 2**32 - 1], dtype=torch.int64), 7)  # all 128 bits of a block
z = torch.empty({_ISA_N})
ops.philox_normal_(z, 2**63 - 1, 7, 3)
tiles = [_C.philox_tile_bits(*t) for t in {_ISA_TILES!r}]
torch.save(dict(isa=_C.philox_tile_isa(), signs=signs, z=z, tiles=tiles), sys.argv[1])
"""


def _run_with_isa(isa, *args):
    env = dict(os.environ, PYFASTBAYES_PHILOX_ISA=isa)
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def _tile_reference(seed, stream, step, first, n):
    """[4][n] words of R.philox4x32 for blocks first.. (mod 2^64): counter (lo, hi, stream, step)."""
    blocks = [(first + b) % 2**64 for b in range(n)]
    ctr = torch.tensor([[blk & 0xFFFFFFFF, blk >> 32, stream, step] for blk in blocks], dtype=torch.int64)
    words = R.philox4x32(ctr, seed & 0xFFFFFFFF, seed >> 32)
    return [[int(v) for v in words[:, w]] for w in range(4)]


@pytest.mark.skipif(not ops.native_op("philox_normal_", "cpu"), reason="needs the compiled extension")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_cpu_philox_version_draws_the_reference_bits(isa, tmp_path):
    """Each version (the requested one where the CPU runs it, else the next narrower: the process
    says which ran) gives the reference's words at block counters past 2^32 and across 2^64, the
    reference's sign stream bit for bit, and the normals of the reference stream."""
    proc = _run_with_isa(isa, str(tmp_path / "out.pt"))
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out.pt")
    runs = {"avx512": "avx512f", "avx2": "avx2"}
    order = ["avx512", "avx2", "scalar"]
    expected = next(v for v in order[order.index(isa):] if v == "scalar" or runs[v] in _cpu_flags())
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert got["isa"] == expected
    for t, bits in zip(_ISA_TILES, got["tiles"]):
        assert bits == _tile_reference(*t), t
    assert torch.equal(got["signs"], R.vi.rademacher(_ISA_N, -5, 7, 2**32 - 1))
    torch.testing.assert_close(got["z"], R.philox_normal(_ISA_N, 2**63 - 1, 7, 3), rtol=2e-6, atol=2e-6)
    z = torch.empty(_ISA_N)  # and the very normals of this process's version (the same Box-Muller code)
    ops.philox_normal_(z, 2**63 - 1, 7, 3)
    assert torch.equal(got["z"], z)


@pytest.mark.skipif(not ops.native_op("philox_normal_", "cpu"), reason="needs the compiled extension")
def test_philox_tile_bits_refuses_more_than_a_tile():
    from pyfastbayes import _C

    with pytest.raises(ValueError, match=r"nblocks must be in \[0, 64\], got 65"):
        _C.philox_tile_bits(1, 2, 3, 0, 65)
    assert _C.philox_tile_bits(1, 2, 3, 0, 0) == [[], [], [], []]


@pytest.mark.skipif(not ops.native_op("philox_normal_", "cpu"), reason="needs the compiled extension")
def test_unknown_philox_isa_is_named_and_ignored(tmp_path):
    """The knob is read on the first draw (maybe in a worker thread, where throwing would abort the
    process): a wrong value is said on stderr and the widest version runs."""
    proc = _run_with_isa("sse2", str(tmp_path / "out.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "PYFASTBAYES_PHILOX_ISA must be scalar, avx2 or avx512, got 'sse2': ignored" in proc.stderr
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["signs"], R.vi.rademacher(_ISA_N, -5, 7, 2**32 - 1))


@needs_cuda
def test_cuda_noise_equals_cpu_noise():
    a = torch.empty(100_001)
    b = torch.empty(100_001, device="cuda")
    ops.philox_normal_(a, 99, 3, 17)
    ops.philox_normal_(b, 99, 3, 17)
    # same bits, same fp32 polynomial code; only FMA contraction may differ by an ulp
    torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rng_snapshot_is_a_copy_everywhere(device):
    """ops.rng_snapshot: a fresh copy of the position (eager: a clone; compiled: the opaque op
    pyfastbayes_py::rng_snapshot, which torch.library.opcheck checks here)."""
    pos = torch.tensor([123456789, 7], dtype=torch.int64, device=device)
    snap = ops.rng_snapshot(pos)
    assert torch.equal(snap, pos) and snap.data_ptr() != pos.data_ptr()
    op = torch.ops.pyfastbayes_py.rng_snapshot.default
    torch.library.opcheck(op, (pos,))
    out = op(pos)
    pos.add_(1)
    assert int(out[1]) == 7  # not a view of the position
    compiled = torch.compile(lambda p: (ops.rng_snapshot(p), p.add_(1))[0], fullgraph=True)
    before = pos.clone()
    torch.testing.assert_close(compiled(pos), before)
