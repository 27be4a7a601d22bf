"""The calibration binning op (calibration_bins): the op contract, exact bin counts, row
diagnostics. The metrics built on it are tested in test_calibration.py."""
import pytest
import torch

from pyfastbayes import _reference, ops

from _helpers import ALL_DTYPES, DEVICES, Bad, OpContract, OpSpec, placement, put

N, C = 777, 7


def rand_probs(*shape, scale=2.0, dtype=torch.float32, device="cpu", gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).softmax(-1).to(dtype=dtype, device=device)


def bins_make(kind, device, dtype, gen):
    if kind == "random":  # S in {1, 3} x probabilities / logits x top-label / class-wise
        calls = []
        for S in (1, 3):
            for from_logits in (False, True):
                x = torch.randn(S, N, C, dtype=torch.float64, generator=gen) * 2
                p = (x if from_logits else x.softmax(-1)).to(dtype=dtype, device=device)
                y = torch.randint(0, C, (N,), generator=gen).to(device)
                calls += [dict(probs=p, targets=y, n_bins=15, from_logits=from_logits, classwise=cw, sum_tol=0.02)
                          for cw in (False, True)]
        return calls
    if kind == "empty":  # N = 0: zero bins of the right shape
        e = torch.empty(1, 0, 5, dtype=dtype, device=device)
        t = torch.empty(0, dtype=torch.long, device=device)
        return [dict(probs=e, targets=t, n_bins=15, from_logits=False, classwise=cw, sum_tol=1e-4) for cw in (False, True)]
    # [50, 2, 6] viewed as [S=50, N=2, C=6]; strided targets; a column slice of wider logits
    p = rand_probs(2, 50, 6, dtype=dtype, device=device, gen=gen).transpose(0, 1)
    y = torch.tensor([1, 4, 0, 3], device=device)[::2]
    wide = torch.randn(2, 40, 9, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)[:, :, 2:7]
    y2 = torch.randint(0, 5, (80,), generator=gen).to(device)[1::2]
    return [dict(probs=p, targets=y, n_bins=10, from_logits=False, classwise=False, sum_tol=1e-4),
            dict(probs=wide, targets=y2, n_bins=7, from_logits=True, classwise=True, sum_tol=1e-4)]


def bins_post(kind, calls, outs, after):
    """Bin counts are integers that must agree exactly; every row (every class) lands in one bin."""
    for a, (bins, diag) in zip(calls, outs):
        ref, ref_diag = _reference.calibration_bins(**a)
        assert bins.dtype == torch.float64 and diag.dtype == torch.float64
        n, c = a["probs"].shape[1], a["probs"].shape[2]
        assert bins.shape == ((c, a["n_bins"], 3) if a["classwise"] else (a["n_bins"], 3))
        torch.testing.assert_close(bins[..., 0], ref[..., 0], rtol=0, atol=0)  # same bins, exactly
        torch.testing.assert_close(diag, ref_diag, rtol=0, atol=0)
        assert bins[..., 0].sum() == (n * c if a["classwise"] else n)


def bins_good(device, dtype=torch.float32):
    p = rand_probs(2, 40, 5, dtype=dtype, device=device, gen=torch.Generator().manual_seed(3))
    y = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(4)).to(device)
    return dict(probs=p, targets=y, n_bins=15, from_logits=False, classwise=False, sum_tol=1e-4)


def _opcheck_logits(device, dtype):
    a = bins_good(device, dtype)
    return dict(a, probs=a["probs"].log(), n_bins=7, from_logits=True, classwise=True)


def _opcheck_empty(device, dtype):
    a = bins_good(device, dtype)
    return dict(a, probs=a["probs"][:, :0], targets=a["targets"][:0], n_bins=3)


OP = "calibration_bins"
CALIBRATION_BINS = OpSpec(
    OP, grid=ALL_DTYPES, make=bins_make, good=bins_good, post=bins_post, seed=5,
    tol=lambda t: dict(rtol=1e-12, atol=1e-9),
    opcheck=[lambda d: bins_good(d, torch.float64)]
    + [lambda d, dt=dt: _opcheck_logits(d, dt) for dt in (torch.float32, torch.float64)]
    + [lambda d, dt=dt: _opcheck_empty(d, dt) for dt in (torch.float32, torch.float64)],
    bad=[
        Bad("probs-2d", put(probs=lambda a, d: a["probs"][0]), rf"{OP}: probs must be \[S, N, C\], got shape \[40, 5\]"),
        Bad("probs-int", put(probs=lambda a, d: a["probs"].long()), f"{OP}: probs must be floating point, got Long"),
        Bad("targets-int32", put(targets=lambda a, d: a["targets"].int()), f"{OP}: targets must be int64, got Int"),
        Bad("targets-float", put(targets=lambda a, d: a["targets"].double()), f"{OP}: targets must be int64, got Double"),
        Bad("targets-n", put(targets=lambda a, d: a["targets"][:39]),
            rf"{OP}: targets must be \[N\] with N = 40 \(probs.size\(1\)\), got shape \[39\]"),
        Bad("targets-2d", put(targets=lambda a, d: a["targets"][None]), r"targets must be \[N\] with N = 40"),
        Bad("n_bins-0", put(n_bins=0), rf"{OP}: n_bins must be in \[1, 2\^53\), got 0"),
        Bad("n_bins-negative", put(n_bins=-3), rf"{OP}: n_bins must be in \[1, 2\^53\), got -3"),
        Bad("n_bins-2^53", put(n_bins=2**53), rf"{OP}: n_bins must be in \[1, 2\^53\), got {2**53}"),
        Bad("S-0", put(probs=lambda a, d: a["probs"][:0]), f"{OP}: probs needs S >= 1 draws, got S = 0"),
        Bad("C-0", put(probs=lambda a, d: a["probs"][..., :0]), f"{OP}: probs needs C >= 1 classes, got C = 0"),
        Bad("sum_tol-negative", put(sum_tol=-1e-5), f"{OP}: sum_tol must be >= 0, got -1e-05"),
    ] + placement(OP, "targets", "probs", device=rf"{OP}: (targets on cpu but probs on cuda:0|probs must be on CUDA here, got cpu)")
    + placement(OP, "probs", "targets", sparse=False))


class TestCalibrationBins(OpContract):
    spec = CALIBRATION_BINS


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_op_diagnostics_count_bad_rows(backend):
    if backend == "native" and not ops.native_op(OP, "cpu"):
        pytest.skip("needs the compiled extension")
    p = torch.tensor([[[0.2, 0.8], [0.7, 0.7], [-0.1, 1.1], [float("nan"), 0.5], [0.5, 0.5]]])
    y = torch.tensor([1, 0, 1, 0, 2])
    bins, diag = ops.calibration_bins(p, y, 4, False, False, 1e-4, backend=backend)
    assert diag.tolist() == [1.0, 1.0, 1.0, 1.0]  # bad sum, negative, bad target, NaN
    assert bins[:, 0].sum() == 3  # bad target and NaN rows are skipped
    torch.testing.assert_close(diag, _reference.calibration_bins(p, y, 4, False, False, 1e-4)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_zero_bins(device):
    bins, diag = ops.calibration_bins(torch.empty(1, 0, 5, device=device), torch.empty(0, dtype=torch.long, device=device),
                                      15, False, True, 1e-4)
    assert bins.shape == (5, 15, 3) and not bins.any() and not diag.any()


def test_wrapper_falls_back_to_the_reference_without_a_kernel(monkeypatch):
    from pyfastbayes import _native

    a = bins_good("cpu", torch.float64)
    expected = _reference.calibration_bins(**a)
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    assert ops.native_op(OP, "cpu") is None
    torch.testing.assert_close(ops.calibration_bins(**a), expected, rtol=0, atol=0)


def test_uniform_bin_is_exact_for_many_bins():
    """The reference's edge rule (Dekker's product) is exact for any n_bins, as the kernel's fma."""
    n_bins = 3 * 2**27 + 1  # > 2**26: the split of n_bins matters
    k = torch.tensor([1, 5, 2**20, n_bins - 1], dtype=torch.float64)
    edges = k / n_bins  # rounded: a hair above or below the exact edge k / n_bins
    got = _reference.uniform_bin(edges, n_bins)
    from fractions import Fraction
    want = [int(Fraction(float(x)) * n_bins) for x in edges]
    assert got.tolist() == want
