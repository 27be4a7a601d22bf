"""calibration_bins: the CUDA kernel against the CPU kernel over every path of
csrc/cuda/calibration.cu: the register path (C <= 8 G, up to C = 256) and the generic one (C > 256,
scratch only with S > 1), probabilities and logits, S = 1 and S > 1, the top-label per-warp
histograms, the class-wise per-warp copies, the class-wise block copies (one and several class
tiles), the global-atomics fallbacks (huge B, too many tiles), grids whose blocks loop many times,
bad rows (the diag counters) and N = 0. Counts and correct sums must agree exactly, confidence
sums to rtol 1e-10 (the GPU adds in another order; its exp differs from the CPU's in the last bit).
"""
import pytest
import torch

from pyfastbayes import _reference, ops

from _helpers import ALL_DTYPES, needs_cuda, needs_native

pytestmark = [needs_cuda, needs_native]

B = 15


def make(S, N, C, dtype, from_logits, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, C, generator=gen, dtype=torch.float64) * scale
    p = x if from_logits else x.softmax(-1)
    y = torch.randint(0, C, (N,), generator=gen)
    return p.to(dtype), y


def both(p, y, n_bins, from_logits, classwise, sum_tol=0.02):
    """(CUDA result on the CPU, CPU result): both the native kernels (no silent reference)."""
    cpu = ops.calibration_bins(p, y, n_bins, from_logits, classwise, sum_tol, backend="native")
    gpu = ops.calibration_bins(p.cuda(), y.cuda(), n_bins, from_logits, classwise, sum_tol, backend="native")
    assert gpu[0].is_cuda and gpu[1].is_cuda
    return tuple(t.cpu() for t in gpu), cpu


def assert_same(gpu, cpu, atol=0.0):
    (bins, diag), (ref, ref_diag) = gpu, cpu
    assert bins.dtype == torch.float64 and diag.dtype == torch.float64 and bins.shape == ref.shape
    torch.testing.assert_close(diag, ref_diag, rtol=0, atol=0)
    torch.testing.assert_close(bins[..., 0], ref[..., 0], rtol=0, atol=0)  # counts
    torch.testing.assert_close(bins[..., 2], ref[..., 2], rtol=0, atol=0)  # correct sums (integers)
    torch.testing.assert_close(bins[..., 1], ref[..., 1], rtol=1e-10, atol=atol)  # confidence sums


def assert_all_binned(bins, N, C, classwise):
    """Valid input: every row (every class of every row) lands in exactly one bin."""
    assert bins[..., 0].sum().item() == (N * C if classwise else N)


# Top-label: C = 2, 4 / 5, 10, 16 (one row per thread, 4 or 16 classes in registers), 17 and 33 /
# 100 / 200 (a group of 32 lanes per row, 1 / 2 / 4 / 8 classes per lane), 257 / 1000 (generic
# path). Class-wise: C = 2 .. 16 (G < 32, several rows per warp), the rest as top-label; with
# B = 15: per-warp copies for C <= 17, one block copy up to C = 645 (C = 1000: two class tiles) on
# an H100 / H200.
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("C", [2, 4, 5, 10, 16, 17, 33, 100, 200, 257, 1000])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("classwise", [False, True], ids=["top", "classwise"])
def test_cuda_matches_cpu(dtype, C, S, from_logits, classwise):
    N = max(500, min(4000, 600_000 // C))
    p, y = make(S, N, C, dtype, from_logits, seed=C * 10 + S)
    gpu, cpu = both(p, y, B, from_logits, classwise)
    assert_same(gpu, cpu)
    assert_all_binned(gpu[0], N, C, classwise)
    assert not gpu[1].any()


# Class-wise shapes past the per-warp copies: one block copy (C = 300: C * B > 2048), several class
# tiles (C = 5000: 1.8 MB of bins > the opt-in shared memory), more tiles than the kernel makes
# (C = 20000: global atomics), one class per tile (B = 5000), a class's bins above the opt-in limit
# (B = 20000: global atomics); top-label with B in opt-in shared memory (1000) and past it (2000).
@pytest.mark.parametrize("C, n_bins, classwise", [(300, 15, True), (5000, 15, True), (20000, 15, True),
                                                  (3, 5000, True), (2, 20000, True), (17, 15, True),
                                                  (18, 15, True), (10, 1000, False), (10, 2000, False),
                                                  (1000, 2000, False)])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_large_shapes(C, n_bins, classwise, S, from_logits, dtype):
    N = max(64, min(3000, 400_000 // C))
    p, y = make(S, N, C, dtype, from_logits, seed=C + n_bins + S)
    gpu, cpu = both(p, y, n_bins, from_logits, classwise)
    assert_same(gpu, cpu)
    assert_all_binned(gpu[0], N, C, classwise)


# N large against the resident grid: every block loops over many rows (histograms carried over
# iterations, one flush per block at the end).
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("classwise", [False, True], ids=["top", "classwise"])
def test_cuda_matches_cpu_many_rows_per_block(S, from_logits, classwise):
    N, C = 300_000, 10
    p, y = make(S, N, C, torch.float32, from_logits, seed=7 + S)
    gpu, cpu = both(p, y, B, from_logits, classwise)
    assert_same(gpu, cpu)
    assert_all_binned(gpu[0], N, C, classwise)


# A confident model: every top-label confidence in the last bin (and, class-wise, every other
# class in bin 0): the shape that serialised the float64 shared-memory atomics.
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("classwise", [False, True], ids=["top", "classwise"])
def test_cuda_matches_cpu_confident(S, from_logits, classwise):
    N, C = 1 << 20, 10
    gen = torch.Generator().manual_seed(11)
    pred = torch.randint(0, C, (N,), generator=gen)
    onehot = torch.nn.functional.one_hot(pred, C).float().expand(S, N, C)  # the same class in every draw
    p = onehot * 30.0 if from_logits else onehot  # logits: confidence 1 - 9 e^-30; probabilities: exactly 1
    y = torch.where(torch.rand(N, generator=gen) < 0.9, pred, (pred + 1) % C)
    gpu, cpu = both(p, y, B, from_logits, classwise)
    assert_same(gpu, cpu)
    bins = gpu[0]
    if classwise:
        assert bins[:, -1, 0].sum().item() == N and bins[:, 0, 0].sum().item() == N * (C - 1)
    else:
        assert bins[-1, 0].item() == N and bins[-1, 2].item() == (y == pred).sum().item()


def _bad_rows(S, N, C, from_logits, seed):
    """Random rows with every kind of bad row mixed in; returns (probs float32, targets, expected diag)."""
    p, y = make(S, N, C, torch.float64, from_logits, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(N, generator=gen)[:60].tolist()
    kinds = ["nan", "inf", "bad_target", "bad_target_high", "bad_sum", "negative"] if not from_logits else \
        ["nan", "inf", "all_neginf", "bad_target", "bad_target_high", "some_neginf"]
    expect = [0, 0, 0, 0]  # bad sum, negative, bad target, non-finite
    for i, n in enumerate(rows):
        kind, s, c = kinds[i % len(kinds)], i % S, i % C
        if kind == "nan":
            p[s, n, c] = float("nan")
            expect[3] += 1
        elif kind == "inf":
            p[s, n, c] = float("inf")
            expect[3] += 1
        elif kind == "all_neginf":
            p[s, n, :] = float("-inf")
            expect[3] += 1
        elif kind == "bad_target":
            y[n] = -1
            expect[2] += 1
        elif kind == "bad_target_high":
            y[n] = C if i % 2 else 10**12
            expect[2] += 1
        elif kind == "bad_sum":
            p[:, n, :] *= 0.5
            expect[0] += 1
        elif kind == "negative":  # the row still sums to 1
            p[s, n, (c + 1) % C] += p[s, n, c] + 0.25
            p[s, n, c] = -0.25
            expect[1] += 1
        else:  # some_neginf: a valid logit row (that class has probability 0)
            p[s, n, c] = float("-inf")
    return p.float(), y, expect


@pytest.mark.parametrize("C", [2, 33, 257])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("classwise", [False, True], ids=["top", "classwise"])
def test_cuda_matches_cpu_bad_rows(C, S, from_logits, classwise):
    p, y, expect = _bad_rows(S, 3000, C, from_logits, seed=C + S)
    gpu, cpu = both(p, y, B, from_logits, classwise)
    assert_same(gpu, cpu, atol=1e-12)  # negative entries: sums may cancel
    assert gpu[1].tolist() == [float(e) for e in expect]
    torch.testing.assert_close(gpu[1], _reference.calibration_bins(p, y, B, from_logits, classwise, 0.02)[1],
                               rtol=0, atol=0)
    skipped = expect[2] + expect[3]
    assert_all_binned(gpu[0], 3000 - skipped, C, classwise)


@pytest.mark.parametrize("C, n_bins, classwise", [(10, 15, False), (10, 2000, False), (10, 15, True),
                                                  (300, 15, True), (5000, 15, True), (20000, 15, True)])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_cuda_empty_rows(C, n_bins, classwise, from_logits):
    p = torch.empty(2, 0, C, device="cuda")
    y = torch.empty(0, dtype=torch.long, device="cuda")
    bins, diag = ops.calibration_bins(p, y, n_bins, from_logits, classwise, 1e-4, backend="native")
    assert bins.is_cuda and bins.shape == ((C, n_bins, 3) if classwise else (n_bins, 3))
    assert not bins.any() and not diag.any()
