"""SWA / SWAG ops (swag_collect_, swag_sample): the op contract, the running moments against their
closed form, column blocks of a draw. The SWAG objects are tested in test_swag.py."""
import pytest
import torch

from _helpers import DEVICES, Bad, OpContract, OpSpec, expanded_like, needs_cuda, needs_native, placement, put

DEV_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
STATE_DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def swag_tol(t):
    return dict(rtol=_tol(t.dtype), atol=_tol(t.dtype))


# ---------------------------------------------------------------------------------------------
# swag_collect_
# ---------------------------------------------------------------------------------------------
def _mixed_params(device, gen):
    """Mixed parameter dtypes, a non-contiguous tensor, an empty tensor, sizes not multiples of 4."""
    shapes = [((3, 5), torch.float32), ((6,), torch.float64), ((0,), torch.float32), ((4, 9), torch.bfloat16),
              ((17,), torch.float16)]
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(d).to(device) for s, d in shapes]
    ps[3] = torch.randn(9, 4, generator=gen).to(device).to(torch.bfloat16).t()  # non-contiguous [4, 9]
    return ps


def collect_make(kind, device, g, gen):
    state_dtype, dev_dtype = g
    if kind == "random":  # five collects of a moving trajectory: the moments carry over
        ps = _mixed_params(device, gen)
    elif kind == "empty":
        ps = [torch.zeros(0, device=device), torch.zeros(2, 0, dtype=torch.float64, device=device)]
    else:  # every parameter a view
        ps = [torch.randn(7, 5, generator=gen).to(device).t(), torch.randn(30, generator=gen, dtype=torch.float64).to(device)[::4],
              torch.randn(3, 4, 2, generator=gen).to(device).to(torch.bfloat16).permute(2, 0, 1)]
    P = sum(p.numel() for p in ps)
    mean, sq = (torch.zeros(P, dtype=state_dtype, device=device) for _ in range(2))
    dev = torch.zeros(P, dtype=dev_dtype, device=device)
    calls = []
    for n in range(5 if kind == "random" else 2):
        ps = [_like_view(p, p + 0.5 * torch.randn(p.shape, generator=gen).to(p)) for p in ps]
        calls.append(dict(params=ps, mean=mean, sq_mean=sq, deviation=dev, n=n))
    if kind == "random":  # and SWA (mean only) on fresh state
        m = torch.zeros(P, dtype=state_dtype, device=device)
        calls += [dict(params=[torch.randn(p.shape, generator=gen).to(p) for p in ps], mean=m, sq_mean=None,
                       deviation=None, n=n) for n in range(3)]
    return calls


def _like_view(p, values):
    """values laid out with p's strides (a non-contiguous tensor like p)."""
    out = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
    return out.copy_(values)


def collect_good(device):
    ps = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    return dict(params=ps, mean=torch.zeros(17, device=device), sq_mean=torch.zeros(17, device=device),
                deviation=torch.zeros(17, dtype=torch.bfloat16, device=device), n=2)


OP = "swag_collect_"
COLLECT_GRID = [(s, d) for s in STATE_DTYPES for d in DEV_DTYPES]
SWAG_COLLECT = OpSpec(
    OP, grid=COLLECT_GRID, make=collect_make, good=collect_good, tol=swag_tol, seed=6,
    opcheck=[lambda d: dict(collect_good(d), sq_mean=None, deviation=None, n=0)],
    bad=[
        Bad("mean-size", put(mean=lambda a, d: torch.zeros(18, device=d)), f"{OP}: mean has 18 elements but the params have 17"),
        Bad("deviation-int", put(deviation=lambda a, d: torch.zeros(17, dtype=torch.int32, device=d)),
            f"{OP}: deviation must be float64/32/16 or bfloat16, got Int"),
        Bad("deviation-without-sq_mean", put(sq_mean=None), rf"{OP}: a deviation row needs sq_mean \(SWAG\)"),
        Bad("n-negative", put(n=-1), rf"{OP}: n \(models averaged so far\) must be >= 0, got -1"),
        Bad("n-huge", put(n=2**53 + 1), rf"{OP}: n \(models averaged so far\) must be < 2\*\*53"),
        Bad("mean-int", put(mean=lambda a, d: a["mean"].int()), f"{OP}: mean must be float32 or float64, got Int"),
        Bad("mean-half", put(mean=lambda a, d: a["mean"].half()), f"{OP}: mean must be float32 or float64, got Half"),
        Bad("mean-2d", put(mean=lambda a, d: a["mean"][None]), rf"{OP}: mean must be a contiguous 1-D tensor, got shape \[1, 17\]"),
        Bad("mean-strided", put(mean=lambda a, d: torch.zeros(34, device=d)[::2]), f"{OP}: mean must be a contiguous 1-D"),
        Bad("sq_mean-dtype", put(sq_mean=lambda a, d: a["sq_mean"].double()),
            rf"{OP}: sq_mean must be a contiguous Float \[17\] on (cpu|cuda:0) like mean"),
        Bad("sq_mean-size", put(sq_mean=lambda a, d: torch.zeros(16, device=d)), rf"{OP}: sq_mean must be a contiguous Float \[17\]"),
        Bad("deviation-size", put(deviation=lambda a, d: torch.zeros(16, device=d)),
            rf"{OP}: deviation must be a contiguous \[17\] row, got shape \[16\]"),
        Bad("param-int", put(params=lambda a, d: [a["params"][0], a["params"][1].long()]),
            rf"{OP}: params\[1\] must be float64/32/16 or bfloat16, got Long"),
        Bad("sq_mean-is-mean", put(sq_mean=lambda a, d: a["mean"]), rf"{OP}: sq_mean overlaps mean"),
        Bad("mean-is-param", lambda a, d: dict(a, params=[a["mean"][:12].view(3, 4), a["params"][1]]),
            rf"{OP}: mean overlaps params\[0\]"),
        Bad("deviation-in-mean", lambda a, d: dict(a, deviation=a["mean"]), rf"{OP}: deviation overlaps mean"),
        Bad("expanded-mean", put(mean=lambda a, d: expanded_like(a["mean"])), rf"{OP}: mean must be a contiguous 1-D tensor, got shape \[17\]"),
    ] + placement(OP, "params", "params[0]", index=1,
                  device=rf"{OP}: (params\[1\] is on cpu but mean is on cuda:0|mean is on cpu, expected CUDA)")
    + placement(OP, "sq_mean", "params[0]", sparse=False))


class TestSwagCollect(OpContract):
    spec = SWAG_COLLECT


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_collect_mean_is_the_trajectory_mean(device, state_dtype):
    """Independent closed form: the SWA mean of four collects is the float64 mean of the trajectory."""
    gen = torch.Generator().manual_seed(21)
    ps = _mixed_params(device, gen)
    P = sum(p.numel() for p in ps)
    m = torch.zeros(P, dtype=state_dtype, device=device)
    traj = []
    for n in range(4):
        ps = [torch.randn(p.shape, generator=gen).to(p) for p in ps]
        traj.append(torch.cat([p.reshape(-1).double() for p in ps]))
        torch.ops.pyfastbayes.swag_collect_(ps, m, None, None, n)
    torch.testing.assert_close(m.double(), torch.stack(traj).mean(0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# swag_sample
# ---------------------------------------------------------------------------------------------
def _posterior(P, state_dtype, dev_dtype, device, gen, K=5):
    mean = torch.randn(P, generator=gen, dtype=state_dtype).to(device)
    sq = mean * mean + torch.rand(P, generator=gen, dtype=state_dtype).to(device)
    sq[:3] = mean[:3] ** 2 - 1  # negative variance -> clamped to eps
    D = None if dev_dtype is None else torch.randn(K, P, generator=gen).to(device).to(dev_dtype)
    return mean, sq, D


def sample_make(kind, device, g, gen):
    state_dtype, dev_dtype = g
    if kind == "random":  # P and S not multiples of 4; S > one CUDA draw tile (32); offsets of every residue mod 4
        mean, sq, D = _posterior(203, state_dtype, dev_dtype, device, gen)
        return [dict(mean=mean, sq_mean=sq, D=D, n_draws=37, scale=0.7, eps=1e-4, seed=-12345, step=3, offset=off)
                for off in (0, 8, 1, 6, 1027)]
    if kind == "empty":
        mean, sq, D = _posterior(10, state_dtype, dev_dtype, device, gen)
        e = torch.zeros(0, dtype=state_dtype, device=device)
        return [dict(mean=mean, sq_mean=sq, D=D, n_draws=0, scale=0.5, eps=0.0, seed=1, step=0, offset=0),
                dict(mean=e, sq_mean=e.clone(), D=None if D is None else D[:, :0], n_draws=3, scale=0.5, eps=0.0,
                     seed=1, step=0, offset=0)]
    # D: a column block of a wider matrix (rows contiguous, row stride > P), as store_device='cpu' reads it
    mean, sq, _ = _posterior(64, state_dtype, dev_dtype, device, gen)
    wide = torch.randn(4, 100, generator=gen).to(device).to(dev_dtype or state_dtype)
    return [dict(mean=mean, sq_mean=sq, D=wide[:, 20:84], n_draws=9, scale=0.3, eps=1e-6, seed=77, step=1, offset=off)
            for off in (20, 23)]


def sample_good(device, D=True):
    gen = torch.Generator().manual_seed(8)
    mean = torch.randn(10, generator=gen, dtype=torch.float64).to(device)
    sq = mean * mean + 1
    return dict(mean=mean, sq_mean=sq, D=torch.randn(4, 10, generator=gen, dtype=torch.float64).to(device) if D else None,
                n_draws=6, scale=0.5, eps=1e-30, seed=7, step=0, offset=4)


def sample_post(kind, calls, outs, after):
    for a, out in zip(calls, outs):
        assert out.shape == (a["n_draws"], a["mean"].numel()) and out.dtype == a["mean"].dtype


SOP = "swag_sample"
SAMPLE_GRID = [(s, d) for s in STATE_DTYPES for d in [None] + DEV_DTYPES]
SWAG_SAMPLE = OpSpec(
    SOP, grid=SAMPLE_GRID, make=sample_make, good=sample_good, post=sample_post, seed=7,
    tol=lambda t: dict(rtol=1e-5, atol=2e-5),
    opcheck=[lambda d: dict(sample_good(d, D=False), offset=0)],
    bad=[
        Bad("scale-0", put(scale=0.0), f"{SOP}: scale must be a finite number > 0, got 0"),
        Bad("scale-negative", put(scale=-1.0), f"{SOP}: scale must be a finite number > 0, got -1"),
        Bad("scale-nan", put(scale=float("nan")), f"{SOP}: scale must be a finite number > 0, got nan"),
        Bad("scale-inf", put(scale=float("inf")), f"{SOP}: scale must be a finite number > 0, got inf"),
        Bad("eps-negative", put(eps=-1e-5), f"{SOP}: eps must be finite and >= 0, got -1e-05"),
        Bad("eps-nan", put(eps=float("nan")), f"{SOP}: eps must be finite and >= 0, got nan"),
        Bad("K-1", put(D=lambda a, d: a["D"][:1]), f"{SOP}: the low-rank part needs K >= 2 deviation rows, got 1"),
        Bad("offset-negative", put(offset=-4), f"{SOP}: offset must be >= 0, got -4"),
        Bad("offset-negative-odd", put(offset=-1), f"{SOP}: offset must be >= 0, got -1"),
        Bad("D-columns", put(D=lambda a, d: torch.zeros(3, 7, dtype=torch.float64, device=d)), rf"{SOP}: D must be \[K, 10\], got \[3, 7\]"),
        Bad("D-1d", put(D=lambda a, d: a["D"][0]), rf"{SOP}: D must be \[K, 10\], got \[10\]"),
        Bad("D-int", put(D=lambda a, d: a["D"].int()), f"{SOP}: D must be float64/32/16 or bfloat16, got Int"),
        Bad("D-column-major", put(D=lambda a, d: a["D"].t().contiguous().t()), rf"{SOP}: D's rows must be contiguous \(stride\(1\) == 1\)"),
        Bad("n_draws-negative", put(n_draws=-1), rf"{SOP}: n_draws must be in \[0, 65535\], got -1"),
        Bad("n_draws-too-many", put(n_draws=65536), rf"{SOP}: n_draws must be in \[0, 65535\], got 65536"),
        Bad("mean-int", put(mean=lambda a, d: a["mean"].long()), f"{SOP}: mean must be float32 or float64, got Long"),
        Bad("mean-strided", put(mean=lambda a, d: a["mean"].repeat(2)[::2]), f"{SOP}: mean must be a contiguous 1-D tensor"),
        Bad("sq_mean-dtype", put(sq_mean=lambda a, d: a["sq_mean"].float()),
            f"{SOP}: sq_mean must be a contiguous Double tensor shaped like mean"),
        Bad("sq_mean-size", put(sq_mean=lambda a, d: a["sq_mean"][:9]), f"{SOP}: sq_mean must be a contiguous Double"),
    ] + placement(SOP, "D", "mean", device=rf"{SOP}: (D is on cpu but mean is on cuda:0|mean is on cpu, expected CUDA)")
    + placement(SOP, "sq_mean", "mean", sparse=False))


class TestSwagSample(OpContract):
    spec = SWAG_SAMPLE


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("dev_dtype", [None] + DEV_DTYPES)
def test_sample_column_blocks_reproduce_the_full_draw(device, state_dtype, dev_dtype):
    """Column blocks with the global offset reproduce the full draw (what store_device='cpu' uses),
    and the draws have the requested shape and mean's dtype."""
    mean, sq, D = _posterior(203, state_dtype, dev_dtype, device, torch.Generator().manual_seed(9))
    S = 37
    full = torch.ops.pyfastbayes.swag_sample(mean, sq, D, S, 0.7, 1e-4, 99, 0, 0)
    assert full.shape == (S, 203) and full.dtype == state_dtype
    c = 64
    blocks = [torch.ops.pyfastbayes.swag_sample(mean[c0:c0 + c], sq[c0:c0 + c],
                                                None if D is None else D[:, c0:c0 + c], S, 0.7, 1e-4, 99, 0, c0)
              for c0 in range(0, 203, c)]
    torch.testing.assert_close(torch.cat(blocks, 1), full, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("dev_dtype", [None, torch.float32, torch.bfloat16])
def test_sample_unaligned_pieces_reproduce_the_full_draw(device, state_dtype, dev_dtype):
    """Columns [a, b) drawn with offset=a are columns a:b of the whole draw for every start residue
    mod 4 (the noise of global index j whatever the piece), with pieces shorter than a Philox
    block, straddling the CPU kernel's 256-column blocks and longer than one block; the pieces of
    a partition of [0, P) give the whole draw. Bit-equal: every column is computed by the same
    per-element formula from the same noise (fp64 and fp32 alike)."""
    P, S = 777, 37
    mean, sq, D = _posterior(P, state_dtype, dev_dtype, device, torch.Generator().manual_seed(19))
    full = torch.ops.pyfastbayes.swag_sample(mean, sq, D, S, 0.7, 1e-4, 99, 2, 0)
    bounds = [(1, 2), (3, 6), (5, 262), (255, 513), (2, 777), (770, 777), (6, 6)]
    cuts = [0, 1, 7, 10, 258, 259, 511, 600, 777]  # a partition: pieces of every length residue
    bounds += list(zip(cuts[:-1], cuts[1:]))
    for a, b in bounds:
        got = torch.ops.pyfastbayes.swag_sample(mean[a:b], sq[a:b], None if D is None else D[:, a:b], S, 0.7, 1e-4,
                                                99, 2, a)
        assert torch.equal(got, full[:, a:b]), (a, b)
    # offset shifts the diagonal noise only: an unaligned offset changes every column's z1
    shifted = torch.ops.pyfastbayes.swag_sample(mean, sq, D, S, 0.7, 1e-4, 99, 2, 1)
    assert not torch.equal(shifted, full)


@needs_native
def test_ops_empty_shapes():
    mean = torch.randn(10, dtype=torch.float64)
    sq = mean * mean + 1
    assert torch.ops.pyfastbayes.swag_sample(mean, sq, None, 0, 0.5, 0.0, 1).shape == (0, 10)
    e = torch.zeros(0, dtype=torch.float64)
    assert torch.ops.pyfastbayes.swag_sample(e, e, None, 3, 0.5, 0.0, 1).shape == (3, 0)
    torch.ops.pyfastbayes.swag_collect_([], torch.zeros(0), None, None, 0)


@needs_cuda
@needs_native
def test_cuda_matches_cpu_streams():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1001, generator=gen, dtype=torch.float64)
    sq = mean * mean + torch.rand(1001, generator=gen, dtype=torch.float64)
    D = torch.randn(6, 1001, generator=gen).bfloat16()
    a = torch.ops.pyfastbayes.swag_sample(mean, sq, D, 40, 0.5, 1e-30, 42, 1, 0)
    b = torch.ops.pyfastbayes.swag_sample(mean.cuda(), sq.cuda(), D.cuda(), 40, 0.5, 1e-30, 42, 1, 0)
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


@needs_native
def test_swag_collect_refuses_params_whose_element_count_overflows():
    """Expanded params of 2^62 elements each: their int64 sum wrapped to 5 (= mean's size), and the
    call failed later in a storage-size error; refused by the size check now, nothing written."""
    mean = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"swag_collect_: the params hold more than 2\^63 - 1 elements"):
        torch.ops.pyfastbayes.swag_collect_([torch.ones(1).expand(2**62)] * 4 + [torch.ones(5)], mean, None, None, 0)
    assert torch.equal(mean, torch.zeros(5))
