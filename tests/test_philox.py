"""Philox4x32-10 and the normal stream: known answers, native vs reference, statistics."""
import math

import pytest
import torch

from pyfastbayes import _reference as R
from pyfastbayes import ops

from conftest import DEVICES, needs_cuda, needs_native

# Random123 kat_vectors for philox4x32_10: (counter; key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(impl, device, ctr, key, expected):
    if impl == "native" and not ops.native_op("philox4x32", device):
        pytest.skip("no native kernel")
    fn = ops.philox4x32 if impl == "native" else R.philox4x32
    out = fn(torch.tensor([ctr], dtype=torch.int64, device=device), *key)
    assert tuple(out[0].tolist()) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_native_bits_match_reference(device):
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 2**32, (4096, 4), generator=g, dtype=torch.int64).to(device)
    for k0, k1 in [(0, 0), (2**32 - 1, 12345), (0xDEADBEEF, 0x01234567)]:
        torch.testing.assert_close(ops.philox4x32(ctr, k0, k1), R.philox4x32(ctr, k0, k1), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1027, 100_003])
@pytest.mark.parametrize("seed,stream,step", [(0, 0, 0), (2**63 - 1, 7, 3), (-5, 2**31 - 1, 2**32 - 1)])
def test_normal_stream_matches_reference(device, n, seed, stream, step):
    out = torch.empty(n, device=device)
    ops.philox_normal_(out, seed, stream, step)
    ref = R.philox_normal(n, seed, stream, step, device)
    # the native Box-Muller uses fp32 polynomials (csrc/common/fastmath.h): a few ulp of |z| <= 5.8
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_normal_stream_other_dtypes_and_views(dtype):
    base = torch.zeros(40, 30, dtype=dtype)
    view = base.t()  # non-contiguous
    ops.philox_normal_(view, 11, 2, 9)
    ref = R.philox_normal(view.numel(), 11, 2, 9).view(30, 40).to(dtype)
    torch.testing.assert_close(view, ref, rtol=1e-2 if dtype != torch.float64 else 1e-6, atol=1e-2)


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


@needs_native
def test_opcheck_random_ops():
    ctr = torch.randint(0, 2**32, (33, 4), dtype=torch.int64)
    torch.library.opcheck(torch.ops.pyfastbayes.philox4x32.default, (ctr, 3, 4))
    torch.library.opcheck(torch.ops.pyfastbayes.philox_normal_.default, (torch.empty(37), 5, 1, 2))


@needs_native
def test_bad_counters():
    with pytest.raises(RuntimeError, match="counters must be int64"):
        ops.philox4x32(torch.zeros(3, 3, dtype=torch.int64), 0, 0)
    with pytest.raises(ValueError, match="counters must be int64"):
        R.philox4x32(torch.zeros(3, 4), 0, 0)


@needs_cuda
def test_cuda_noise_equals_cpu_noise():
    a = torch.empty(100_001)
    b = torch.empty(100_001, device="cuda")
    ops.philox_normal_(a, 99, 3, 17)
    ops.philox_normal_(b, 99, 3, 17)
    # same bits, same fp32 polynomial code; only FMA contraction may differ by an ulp
    torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)
