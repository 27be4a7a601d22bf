"""swag_sample's CUDA kernel (csrc/cuda/swag_sample.cu) against the CPU kernel and against the
formula evaluated on the CUDA noise streams, on shapes that cross the kernel's tiles.

The kernel gives a CUDA block 64 columns and walks rounds of R draws (R = 64 for float32 state,
32 for float64) in register tiles of 16 / 8 draws per thread; z2 is staged 32 k-rows at a time;
D goes through shared memory whole (K <= Kc: 158 rows of float32 D, 79 of float64, 316 of
float16 / bfloat16) or in chunks reloaded every round (K > Kc); below 512 column blocks the
rounds are split over blockIdx.y. The shapes here cross each of these: K in {2, 20, 33, 70, 330},
S in {1, 5, 32, 33, 100, 150}, P in {1, 3, 1023, 4097, 32771} (P % 4 != 0, 32771 > 512 x 64).

Two references:
- the CPU op (the same Philox streams): the noise itself may differ by an ulp of float32 between
  CPU and CUDA (FMA contraction in the shared polynomial code, see test_ops_random.py), so both
  state dtypes compare at rtol 1e-5 / atol 1e-6;
- the formula mean + sqrt(scale) sigma z1 + sqrt(scale / (K - 1)) z2 @ D in float64 on the noise
  that philox_normal_ draws on the same CUDA device (the same device function philox_normal4 as
  the sampler's, so the same bits): float64 state compares at 1e-12, float32 state at rtol 1e-5 /
  atol 1e-6. K = 1 is refused by both kernels (the covariance divides by K - 1).
"""
import math

import pytest
import torch

from _helpers import needs_cuda, needs_native
from pyfastbayes.ops.layouts import SWAG

pytestmark = [needs_cuda, needs_native]

STATE_DTYPES = [torch.float32, torch.float64]
D_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-4
PAD = 5  # D is a view D = big[1:K + 1, :P] of big [K + 2, P + PAD]: row stride P + 5, storage offset
# (scale, seed, step, offset): both covariance scales, a nonzero offset (multiple of 4: the aligned
# path; unaligned offsets in test_unaligned_offsets), a seed with bits in both 32-bit halves
CALLS = [(0.5, 0x7EADBEEF12345678, 3, 1028), (1.0, 42, 0, 0)]

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
FP64_TOL = dict(rtol=1e-12, atol=1e-12)


def _posterior(P, K, state, d_dtype, seed, ring=True):
    """mean, sq_mean [P] in ``state`` on the CPU and ``make_D(device)`` -> the same D [K, P] on
    either device (None for K = 0): a ring-buffer-like view (row stride P + PAD) or contiguous.

    mean is a multiple of 2^-8 (|mean| < 8) and sigma^2 = sq_mean - mean^2 one of 2^-16 in
    [0.01, 0.25] (exactly 0, so clamped to EPS, on every 7th column): sq_mean - mean^2 is then exact
    in float32 with or without an FMA (the CUDA kernel contracts it, the CPU may not), which would
    otherwise move a float32 draw by ~ulp(mean^2) / sigma. D ~ N(0, 0.3^2) like deviations."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.round(0.5 * torch.randn(P, generator=gen, dtype=torch.float64) * 256) / 256
    var = torch.round((0.01 + 0.24 * torch.rand(P, generator=gen, dtype=torch.float64)) * 65536) / 65536
    sq = mean * mean + var
    sq[::7] = mean[::7] * mean[::7]
    mean, sq = mean.to(state), sq.to(state)
    exact = mean.double() ** 2 + torch.where(torch.arange(P) % 7 == 0, 0.0, var)
    assert torch.equal(sq.double(), exact)  # nothing was rounded in the state dtype
    if K == 0:
        return mean, sq, lambda device: None
    big = (0.3 * torch.randn(K + 2, P + PAD, generator=gen, dtype=torch.float64)).to(d_dtype)

    def make_D(device):
        b = big.to(device)
        D = b[1:K + 1, :P] if ring else b[1:K + 1, :P].contiguous()
        assert D.shape == (K, P) and D.stride(0) == (P + PAD if ring else P)
        return D

    return mean, sq, make_D


def _op(mean, sq, D, S, scale, seed, step, offset):
    return torch.ops.pyfastbayes.swag_sample(mean, sq, D, S, scale, EPS, seed, step, offset)


def _cuda_noise(n, stream, seed, step):
    z = torch.empty(n, device="cuda")
    torch.ops.pyfastbayes.philox_normal_(z, seed, stream, step)
    return z


def _formula_on_cuda_noise(mean, sq, D, S, scale, seed, step, offset):
    """The draw in float64 from the noise streams drawn on the CUDA device (the CUDA inputs)."""
    P = mean.numel()
    m, q = mean.double(), sq.double()
    var = q - m * m
    sigma = torch.sqrt(torch.where(var > EPS, var, torch.full_like(var, EPS)))
    # z1 of draw s: the stream SWAG.diag_stream + s at global indices offset .. offset + P - 1
    z1 = torch.stack([_cuda_noise(offset + P, SWAG.diag_stream + s, seed, step)[offset:] for s in range(S)])
    out = m + math.sqrt(scale) * sigma * z1.double()
    if D is not None:
        K = D.shape[0]
        z2 = _cuda_noise(S * K, SWAG.lowrank_stream, seed, step).view(S, K).double()
        out = out + math.sqrt(scale / (K - 1)) * (z2 @ D.double())
    return out


def _check(mean, sq, make_D, S, calls=CALLS):
    """CUDA op vs CPU op and vs the formula on the CUDA noise, for each (scale, seed, step, offset);
    the CUDA op is also run twice and must give the same bits."""
    tol = FP32_TOL if mean.dtype == torch.float32 else FP64_TOL
    D_cpu, D_cuda = make_D("cpu"), make_D("cuda")
    mc, qc = mean.cuda(), sq.cuda()
    for scale, seed, step, offset in calls:
        what = f"scale={scale} seed={seed} step={step} offset={offset}"
        got = _op(mc, qc, D_cuda, S, scale, seed, step, offset)
        assert got.shape == (S, mean.numel()) and got.dtype == mean.dtype and got.is_cuda
        assert torch.equal(got, _op(mc, qc, D_cuda, S, scale, seed, step, offset)), f"not deterministic, {what}"
        cpu = _op(mean, sq, D_cpu, S, scale, seed, step, offset)
        torch.testing.assert_close(got.cpu(), cpu, **FP32_TOL, msg=lambda m: f"CUDA vs CPU, {what}: {m}")
        if offset + mean.numel() <= 1 << 24:
            ref = _formula_on_cuda_noise(mc, qc, D_cuda, S, scale, seed, step, offset)
            torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m: f"CUDA vs formula, {what}: {m}")


def _grid():
    """(K, S, P, state dtype, D dtype): every K x S x P, with D's dtype only where there is a D."""
    out = []
    for K in (0, 2, 20, 33, 70):
        for S in (1, 5, 32, 33, 100):
            for P in (1, 3, 1023, 4097):
                for state in STATE_DTYPES:
                    for d in ([None] if K == 0 else D_DTYPES):
                        out.append(pytest.param(K, S, P, state, d, id=f"K{K}-S{S}-P{P}-{str(state)[6:]}-"
                                                f"{'none' if d is None else str(d)[6:]}"))
    return out


@pytest.mark.parametrize("K,S,P,state,d_dtype", _grid())
def test_cuda_matches_cpu_and_formula(K, S, P, state, d_dtype):
    """K > 32 crosses a z2 stage, S > 16 / 8 a thread's draw tile and S > 64 / 32 a round; P not a
    multiple of 4 leaves a partial column quad; D is a view with row stride P + 5."""
    mean, sq, make_D = _posterior(P, K, state, d_dtype, seed=K * 1_000_003 + S * 1009 + P)
    _check(mean, sq, make_D, S)


@pytest.mark.parametrize("state", STATE_DTYPES)
@pytest.mark.parametrize("d_dtype", D_DTYPES)
def test_many_column_blocks_reuse_resident_D_over_rounds(state, d_dtype):
    """P = 32771: 513 column blocks, so gridDim.y = 1 and each block runs every round (S = 150: 3
    rounds for float32 state, 5 for float64) on the slice of D it loaded once; D contiguous."""
    mean, sq, make_D = _posterior(32771, 20, state, d_dtype, seed=5, ring=False)
    _check(mean, sq, make_D, 150, calls=CALLS[:1])


@pytest.mark.parametrize("P", [1023, 32771])
@pytest.mark.parametrize("state", STATE_DTYPES)
@pytest.mark.parametrize("d_dtype", D_DTYPES)
def test_D_larger_than_shared_memory_goes_in_chunks(P, state, d_dtype):
    """K = 330 rows exceed the shared-memory slice for every D dtype (at most 316 rows), so D goes
    through shared memory in chunks, reloaded each round: the k order of the sum must survive."""
    mean, sq, make_D = _posterior(P, 330, state, d_dtype, seed=7)
    _check(mean, sq, make_D, 70, calls=CALLS[:1])


@pytest.mark.parametrize("K", [0, 20])
@pytest.mark.parametrize("state", STATE_DTYPES)
def test_offset_beyond_32_bit_counter(K, state):
    """offset = 2**34 + 4: the Philox block index (offset + j) / 4 needs the counter's high word."""
    mean, sq, make_D = _posterior(1023, K, state, torch.float32, seed=11)
    _check(mean, sq, make_D, 33, calls=[(0.5, 9, 1, 2**34 + 4)])


UNALIGNED = [(0.5, 0x7EADBEEF12345678, 3, off) for off in (1, 2, 3, 1029, 2**34 + 7)]


@pytest.mark.parametrize("K", [0, 20])
@pytest.mark.parametrize("S", [5, 33])
@pytest.mark.parametrize("state", STATE_DTYPES)
def test_unaligned_offsets(K, S, state):
    """offset % 4 != 0 (an FSDP2 local shard starts anywhere): the kernel's per-column Philox path
    (a column quad straddles two Philox blocks) against the CPU op and the formula on the CUDA
    noise, for every residue mod 4 and a block index beyond 32 bits; P = 1023 leaves a partial
    quad and 16 column blocks, S = 33 more than one draw tile."""
    mean, sq, make_D = _posterior(1023, K, state, torch.bfloat16, seed=13 + K + S)
    _check(mean, sq, make_D, S, calls=UNALIGNED)


@pytest.mark.parametrize("state", STATE_DTYPES)
def test_unaligned_pieces_are_columns_of_the_whole_draw(state):
    """On CUDA, columns [a, b) drawn with offset=a equal columns a:b of the whole draw to the bit
    for unaligned a (the aligned fast path and the per-column path draw the same normals)."""
    mean, sq, make_D = _posterior(1023, 20, state, torch.float32, seed=17)
    D = make_D("cuda")
    mc, qc = mean.cuda(), sq.cuda()
    full = _op(mc, qc, D, 33, 0.5, 5, 2, 0)
    for a, b in [(1, 2), (3, 70), (65, 1023), (130, 515), (1022, 1023)]:
        got = _op(mc[a:b].contiguous(), qc[a:b].contiguous(), D[:, a:b], 33, 0.5, 5, 2, a)
        assert torch.equal(got, full[:, a:b]), (a, b)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_deviation_row_is_refused(device):
    """K = 1 has no sample covariance (K - 1 = 0): both kernels refuse it with the same message."""
    mean, sq, make_D = _posterior(10, 2, torch.float32, torch.float32, seed=1)
    D = make_D(device)[:1]
    with pytest.raises(RuntimeError, match="the low-rank part needs K >= 2 deviation rows, got 1"):
        _op(mean.to(device), sq.to(device), D, 3, 0.5, 1, 0, 0)
