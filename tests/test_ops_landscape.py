"""The landscape ops. landscape_points_: the op contract (bit-exact against the reference), the
closed form theta0 + coords @ directions, the fixed accumulation order and math type, n = 0,
P = 0, m = 1..8, overlap refusals, and the CUDA kernel against the CPU op bit for bit. The grid
engine's fused passes landscape_combine and landscape_bias_act_: the op contract (bit-exact), the
closed forms act(sum_j mix_j parts_j) and act(x + bias), the ReLU's NaN / signed-zero rule, and the
CUDA kernels against the CPU ops bit for bit."""
import pytest
import torch

from pyfastbayes import ops

from _helpers import (ALL_DTYPES, DEVICES, Bad, OpContract, OpSpec, expanded_like, needs_cuda, placed, placement, put,
                      require_cuda_kernel, sentinels_intact)

OP = "landscape_points_"
SHAPES = [(37, 1, 5), (300, 2, 9), (1030, 8, 3), (5, 3, 40)]  # (P, m, n): a line, a plane, m = 8, many points


def _inputs(P, m, n, gen):
    return (torch.randn(P, generator=gen, dtype=torch.float64), torch.randn(m, P, generator=gen, dtype=torch.float64),
            torch.randn(n, m, generator=gen, dtype=torch.float64))


def ls_make(kind, device, dtype, gen):
    def call(th, D, c, coord_dtype):
        n, P = c.shape[0], th.shape[0]
        return dict(theta0=th.to(dtype=dtype, device=device), directions=D.to(dtype=dtype, device=device),
                    coords=c.to(dtype=coord_dtype, device=device),
                    out=torch.full((n, P), -7.0, dtype=dtype, device=device))

    calls = []
    if kind == "random":  # every shape with float64 coords and with coords of the tensors' dtype
        for P, m, n in SHAPES:
            th, D, c = _inputs(P, m, n, gen)
            calls += [call(th, D, c, torch.float64), call(th, D, c, dtype)]
        return calls
    if kind == "empty":  # n = 0 points, P = 0 parameters
        for P, m, n in [(6, 2, 0), (0, 2, 4), (0, 1, 0)]:
            calls.append(call(*_inputs(P, m, n, gen), torch.float64))
        return calls
    # strided theta0 (every other element), transposed directions and coords
    th = torch.randn(2 * 50, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)[::2]
    D = torch.randn(50, 3, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).t()
    c = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(device=device).t()
    calls.append(dict(theta0=th, directions=D, coords=c, out=torch.zeros(7, 50, dtype=dtype, device=device)))
    return calls


def ls_post(kind, calls, outs, after):
    """The wrapper returns out itself (written in place) and no input changes."""
    for a, out, b in zip(calls, outs, after):
        assert out is b["out"]
        for name in ("theta0", "directions", "coords"):
            assert torch.equal(a[name], b[name]), name


def ls_good(device, dtype=torch.float32, n=3):
    gen = torch.Generator().manual_seed(4)
    th, D, c = _inputs(5, 2, n, gen)
    return dict(theta0=th.to(dtype=dtype, device=device), directions=D.to(dtype=dtype, device=device),
                coords=c.to(device), out=torch.zeros(n, 5, dtype=dtype, device=device))


def _opcheck_args(dtype, coord_dtype=torch.float64, n=3):
    def f(device):
        a = ls_good(device, dtype, n)
        return dict(a, coords=a["coords"].to(coord_dtype))
    return f


def _rows(k):
    """Bad.edit: directions with k rows and coords with k columns."""
    def edit(a, d):
        gen = torch.Generator().manual_seed(1)
        return dict(a, directions=torch.randn(k, 5, generator=gen).to(d),
                    coords=torch.randn(3, k, generator=gen, dtype=torch.float64).to(d))
    return edit


def _sharing(name):
    """Bad.edit: the input `name` is a view of out's memory."""
    def edit(a, d):
        out = a["out"]
        view = {"theta0": lambda: out[1], "directions": lambda: out[:2],
                "coords": lambda: out.view(-1)[4:10].view(3, 2)}
        return dict(a, **{name: view[name]()})
    return edit


_DEVICE_MIX = rf"^{OP}: (theta0 is on cpu, expected CUDA|{{}} is on cpu but theta0 is on cuda:0)$"

LANDSCAPE_POINTS = OpSpec(
    OP, grid=ALL_DTYPES, make=ls_make, good=ls_good, post=ls_post, seed=21,
    tol=lambda t: dict(rtol=0, atol=0),  # every operation rounded on its own: bit for bit
    opcheck=[_opcheck_args(torch.float64), _opcheck_args(torch.float16, torch.float16),
             _opcheck_args(torch.bfloat16), _opcheck_args(torch.float32, n=0)],
    bad=[
        Bad("theta0-int", put(theta0=lambda a, d: a["theta0"].long(), directions=lambda a, d: a["directions"].long(),
                              out=lambda a, d: a["out"].long()),
            rf"^{OP}: theta0 must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("theta0-2d", put(theta0=lambda a, d: a["theta0"][None]),
            rf"^{OP}: theta0 must be a 1-D \[P\] tensor, got shape \[1, 5\]$"),
        Bad("directions-dtype", put(directions=lambda a, d: a["directions"].double()),
            rf"^{OP}: directions must have the dtype of theta0 \(Float\), got Double$"),
        Bad("directions-1d", put(directions=lambda a, d: a["directions"][0]),
            rf"^{OP}: directions must be \[m, P\] with P = 5 \(theta0's length\), got shape \[5\]$"),
        Bad("directions-P", put(directions=lambda a, d: a["directions"][:, :4]),
            rf"^{OP}: directions must be \[m, P\] with P = 5 \(theta0's length\), got shape \[2, 4\]$"),
        Bad("m-0", put(directions=lambda a, d: a["directions"][:0], coords=lambda a, d: a["coords"][:, :0]),
            rf"^{OP}: directions must have 1 to 8 rows \(m directions\), got m = 0$"),
        Bad("m-9", _rows(9), rf"^{OP}: directions must have 1 to 8 rows \(m directions\), got m = 9$"),
        Bad("coords-half", put(coords=lambda a, d: a["coords"].half()),
            rf"^{OP}: coords must be float64 or the dtype of theta0 \(Float\), got Half$"),
        Bad("coords-int", put(coords=lambda a, d: a["coords"].long()),
            rf"^{OP}: coords must be float64 or the dtype of theta0 \(Float\), got Long$"),
        Bad("coords-m", put(coords=lambda a, d: a["coords"][:, :1]),
            rf"^{OP}: coords must be \[n, m\] with m = 2 \(directions' rows\), got shape \[3, 1\]$"),
        Bad("coords-1d", put(coords=lambda a, d: a["coords"][0]),
            rf"^{OP}: coords must be \[n, m\] with m = 2 \(directions' rows\), got shape \[2\]$"),
        Bad("out-dtype", put(out=lambda a, d: a["out"].double()),
            rf"^{OP}: out must have the dtype of theta0 \(Float\), got Double$"),
        Bad("out-n", put(out=lambda a, d: a["out"][:2]),
            rf"^{OP}: out must be \[n, P\] = \[3, 5\], got shape \[2, 5\]$"),
        Bad("out-P", put(out=lambda a, d: torch.zeros(3, 6, device=d)),
            rf"^{OP}: out must be \[n, P\] = \[3, 5\], got shape \[3, 6\]$"),
        Bad("out-transposed", put(out=lambda a, d: torch.zeros(5, 3, device=d).t()),
            rf"^{OP}: out must be contiguous \(it is written in place\), got strides \[1, 3\]$"),
        Bad("out-expanded", put(out=lambda a, d: expanded_like(a["out"])),
            rf"^{OP}: out must be contiguous \(it is written in place\), got strides \[0, 0\]$"),
        Bad("theta0-in-out", _sharing("theta0"), rf"^{OP}: out overlaps theta0 \(the same memory twice in one call\)"),
        Bad("directions-in-out", _sharing("directions"), rf"^{OP}: out overlaps directions "),
        Bad("coords-in-out", _sharing("coords"), rf"^{OP}: out overlaps coords "),  # float32 coords: out's dtype
    ] + placement(OP, "theta0", "directions")
    + placement(OP, "directions", "theta0", device=_DEVICE_MIX.format("directions"))
    + placement(OP, "coords", "theta0", device=_DEVICE_MIX.format("coords"))
    + placement(OP, "out", "theta0", device=_DEVICE_MIX.format("out")))


class TestLandscapePoints(OpContract):
    spec = LANDSCAPE_POINTS


# ---- closed forms ------------------------------------------------------------------------------
def _backends(device):
    return ["reference"] + (["native"] if ops.native_op(OP, device) else [])


# float64: a few ulp of the terms; float32 math: m + 1 roundings of terms ~ 3; the half dtypes
# round the inputs and the result (bf16: 8 bits)
_CLOSE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("P,m,n", SHAPES + [(0, 2, 4), (7, 3, 0), (4, 8, 1)])
def test_closed_form(device, dtype, P, m, n):
    """out == theta0 + coords @ directions computed in float64 (from the rounded inputs)."""
    th, D, c = _inputs(P, m, n, torch.Generator().manual_seed(P + 10 * m + 100 * n))
    th, D = th.to(dtype), D.to(dtype)
    want = th.double() + c @ D.double()
    scale = th.double().abs() + c.abs() @ D.double().abs()  # the size of the terms
    for backend in _backends(device):
        out = torch.full((n, P), float("nan"), dtype=dtype, device=device)
        got = ops.landscape_points_(th.to(device), D.to(device), c.to(device), out, backend=backend)
        assert got is out and out.shape == (n, P)
        err = (out.cpu().double() - want).abs()
        assert bool((err <= _CLOSE[dtype] * (scale + 1e-3)).all()), (backend, err.max())


@pytest.mark.parametrize("device", DEVICES)
def test_float64_offsets_are_exact(device):
    """float64 coords: the offset 0.05 is applied as the float64 0.05 (float64 tensors) or rounded
    once to float32 (float32 tensors): out equals theta0 + 0.05 * d in the tensors' own arithmetic."""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float64, torch.float32):
        th = torch.randn(100, generator=gen, dtype=torch.float64).to(dtype)
        D = torch.randn(1, 100, generator=gen, dtype=torch.float64).to(dtype)
        c = torch.tensor([[0.05], [-0.05], [0.0]], dtype=torch.float64)
        step = torch.tensor(0.05, dtype=dtype) * D[0]  # 0.05 rounded once to dtype, one product
        want = torch.stack([th + step, th + (-step), th])
        for backend in _backends(device):
            out = torch.empty(3, 100, dtype=dtype, device=device)
            ops.landscape_points_(th.to(device), D.to(device), c.to(device), out, backend=backend)
            assert torch.equal(out.cpu(), want), (dtype, backend)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_order_and_math_type(device):
    """The sum starts from theta0 and adds j = 0, 1, ... one rounding at a time in the math type:
    float32: 1 + 1e8 rounds to 1e8, minus 1e8 gives 0 (float64 or another order: 1); float16
    tensors with float32 math: 1 + 2048 = 2049 is exact, minus 2048 gives 1 (float16 math: 0)."""
    for dtype, big, want in ((torch.float32, 1e8, 0.0), (torch.float16, 2048.0, 1.0), (torch.float64, 1e8, 1.0)):
        th = torch.ones(3, dtype=dtype, device=device)
        D = torch.ones(2, 3, dtype=dtype, device=device)
        c = torch.tensor([[big, -big], [-big, big]], dtype=torch.float64, device=device)
        for backend in _backends(device):
            out = torch.empty(2, 3, dtype=dtype, device=device)
            ops.landscape_points_(th, D, c, out, backend=backend)
            assert out.eq(want).all(), (dtype, backend, out)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_may_share_memory(device):
    """Only out must be alone: read-only inputs may share memory (theta0 a row of directions)."""
    gen = torch.Generator().manual_seed(8)
    D = torch.randn(3, 20, generator=gen, dtype=torch.float64).to(device)
    c = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)
    want = D[0].cpu() + c.cpu() @ D.cpu()
    for backend in _backends(device):
        out = torch.empty(4, 20, dtype=torch.float64, device=device)
        ops.landscape_points_(D[0], D, c, out, backend=backend)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


# ---- CUDA vs CPU -------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_matches_cpu_bitwise(dtype):
    """Bit for bit: shapes across the kernel's paths (one parameter, P not a multiple of the block,
    several grid-stride rounds, m = 1..8, few points on a long vector, many points on a short one:
    the grid's y split and several coords tiles), coords float64 and of the tensors' dtype, inputs
    as strided device views, out a device view with sentinels around it (no write outside)."""
    require_cuda_kernel(OP)
    gen = torch.Generator().manual_seed(6)
    # (300_001, 2, 70): on a 132-SM GPU gridDim.y = 1, two grid-stride rounds over P and three coords
    # tiles of one block row (32 + 32 + 6 points)
    shapes = [(1, 1, 1), (257, 2, 33), (300_001, 3, 2), (300_001, 2, 70), (1000, 8, 65), (19, 5, 3000), (64, 7, 1)]
    for P, m, n in shapes:
        th, D, c = _inputs(P, m, n, gen)
        th, D = th.to(dtype), D.to(dtype)
        for coords in (c, c.to(dtype)):
            cpu = torch.empty(n, P, dtype=dtype)
            ops.landscape_points_(th, D, coords, cpu, backend="native")
            out, buf = placed(torch.zeros(n, P, dtype=dtype), offset=3)
            th_g = torch.stack([th, th]).t().contiguous().cuda()[:, 1]  # stride 2 on the device
            D_g = D.t().contiguous().cuda().t()  # transposed on the device
            ops.landscape_points_(th_g, D_g, coords.cuda(), out, backend="native")
            assert torch.equal(out.cpu(), cpu), (P, m, n, dtype, coords.dtype)
            assert sentinels_intact(out, buf), (P, m, n, dtype)


# ---- landscape_combine and landscape_bias_act_: the grid engine's fused passes -----------------
def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


COMBINE_SHAPES = [(7, 3, 5, 4), (33, 2, 130, 3), (5, 9, 17, 2), (64, 1, 8, 6), (3, 4, 1100, 2)]  # (R, k, F, c)


def cb_make(kind, device, dtype, gen):
    def call(parts, mix, act):
        return dict(parts=parts.to(dtype=dtype, device=device), mix=mix.to(dtype=dtype, device=device), act=act)

    if kind == "random":  # k = 3 (a plane) and 2 (a line) take their own loops on the CPU, the others the general one
        return [call(_rand(gen, R, k, F), _rand(gen, c, k), act) for R, k, F, c in COMBINE_SHAPES
                for act in ("none", "relu")]
    if kind == "empty":
        return [call(_rand(gen, R, k, F), _rand(gen, c, k), "relu") for R, k, F, c in
                [(0, 3, 5, 2), (4, 2, 0, 3), (4, 3, 5, 0)]]
    # strided: parts a permuted view, mix transposed
    parts = _rand(gen, 6, 11, 3).to(dtype=dtype, device=device).permute(1, 2, 0)  # [11, 3, 6]
    mix = _rand(gen, 3, 4).to(dtype=dtype, device=device).t()
    return [dict(parts=parts, mix=mix, act="relu")]


def cb_post(kind, calls, outs, after):
    for a, out, b in zip(calls, outs, after):
        assert out.is_contiguous() and out.shape == (a["mix"].shape[0], a["parts"].shape[0], a["parts"].shape[2])
        assert torch.equal(a["parts"], b["parts"]) and torch.equal(a["mix"], b["mix"])


def cb_good(device, dtype=torch.float32, act="relu"):
    gen = torch.Generator().manual_seed(5)
    return dict(parts=_rand(gen, 4, 3, 6).to(dtype=dtype, device=device),
                mix=_rand(gen, 2, 3).to(dtype=dtype, device=device), act=act)


LANDSCAPE_COMBINE = OpSpec(
    "landscape_combine", grid=ALL_DTYPES, make=cb_make, good=cb_good, post=cb_post, seed=23,
    tol=lambda t: dict(rtol=0, atol=0),  # every operation rounded on its own: bit for bit
    opcheck=[lambda d: cb_good(d, torch.float64, "none"), lambda d: cb_good(d, torch.bfloat16),
             lambda d: cb_good(d, torch.float16, "none")],
    bad=[
        Bad("parts-int", put(parts=lambda a, d: a["parts"].long(), mix=lambda a, d: a["mix"].long()),
            r"^landscape_combine: parts must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("parts-2d", put(parts=lambda a, d: a["parts"][0]),
            r"^landscape_combine: parts must be a 3-D \[R, k, F\] tensor, got shape \[3, 6\]$"),
        Bad("k-0", put(parts=lambda a, d: a["parts"][:, :0], mix=lambda a, d: a["mix"][:, :0]),
            r"^landscape_combine: parts must have 1 to 9 parts \(dimension 1\), got k = 0$"),
        Bad("k-10", put(parts=lambda a, d: torch.zeros(4, 10, 6, device=d),
                        mix=lambda a, d: torch.zeros(2, 10, device=d)),
            r"^landscape_combine: parts must have 1 to 9 parts \(dimension 1\), got k = 10$"),
        Bad("mix-dtype", put(mix=lambda a, d: a["mix"].double()),
            r"^landscape_combine: mix must have the dtype of parts \(Float\), got Double$"),
        Bad("mix-k", put(mix=lambda a, d: a["mix"][:, :2]),
            r"^landscape_combine: mix must be \[c, k\] with k = 3 \(parts' dimension 1\), got shape \[2, 2\]$"),
        Bad("mix-1d", put(mix=lambda a, d: a["mix"][0]),
            r"^landscape_combine: mix must be \[c, k\] with k = 3 \(parts' dimension 1\), got shape \[3\]$"),
        Bad("act", put(act="gelu"), r"^landscape_combine: act must be 'none' or 'relu', got 'gelu'$"),
    ] + placement("landscape_combine", "parts", "mix")
    + placement("landscape_combine", "mix", "parts",
                device=r"^landscape_combine: (parts is on cpu, expected CUDA|mix is on cpu but parts is on cuda:0)$"))


class TestLandscapeCombine(OpContract):
    spec = LANDSCAPE_COMBINE


BIAS_SHAPES = [(3, 7, 5), (2, 33, 130), (4, 1, 1100), (1, 5, 3)]  # (c, R, F)


def ba_make(kind, device, dtype, gen):
    def call(x, bias, act):
        return dict(x=x.to(dtype=dtype, device=device), act=act,
                    bias=None if bias is None else bias.to(dtype=dtype, device=device))

    if kind == "random":  # with and without a bias, both activations; x written twice (state carries over)
        calls = []
        for c, R, F in BIAS_SHAPES:
            x = _rand(gen, c, R, F)
            calls += [call(x, _rand(gen, c, F), "relu"), call(x, None, "relu"), call(x, _rand(gen, c, F), "none"),
                      call(x, None, "none")]
        return calls
    if kind == "empty":
        return [call(_rand(gen, c, R, F), _rand(gen, c, F), "relu") for c, R, F in [(0, 3, 4), (2, 0, 4), (2, 3, 0)]]
    bias = _rand(gen, 9, 2).to(dtype=dtype, device=device).t()  # [2, 9], strided
    return [dict(x=_rand(gen, 2, 5, 9).to(dtype=dtype, device=device), bias=bias, act="relu")]


def ba_post(kind, calls, outs, after):
    for a, out, b in zip(calls, outs, after):
        assert out is b["x"]
        if a["bias"] is not None:
            assert torch.equal(a["bias"], b["bias"])


def ba_good(device, dtype=torch.float32, bias=True, act="relu"):
    gen = torch.Generator().manual_seed(6)
    return dict(x=_rand(gen, 2, 3, 4).to(dtype=dtype, device=device),
                bias=_rand(gen, 2, 4).to(dtype=dtype, device=device) if bias else None, act=act)


def _bias_of_x(a, d):
    return a["x"][:, 0]  # a view of x: [c, F]


LANDSCAPE_BIAS_ACT = OpSpec(
    "landscape_bias_act_", grid=ALL_DTYPES, make=ba_make, good=ba_good, post=ba_post, seed=24,
    tol=lambda t: dict(rtol=0, atol=0),
    opcheck=[lambda d: ba_good(d, torch.float64, act="none"), lambda d: ba_good(d, torch.bfloat16, bias=False),
             lambda d: ba_good(d, torch.float16)],
    bad=[
        Bad("x-int", put(x=lambda a, d: a["x"].long(), bias=lambda a, d: a["bias"].long()),
            r"^landscape_bias_act_: x must be float64, float32, float16 or bfloat16, got Long$"),
        Bad("x-2d", put(x=lambda a, d: a["x"][0].contiguous()),
            r"^landscape_bias_act_: x must be a 3-D \[c, R, F\] tensor, got shape \[3, 4\]$"),
        Bad("x-strided", put(x=lambda a, d: a["x"].transpose(1, 2).contiguous().transpose(1, 2)),
            r"^landscape_bias_act_: x must be contiguous \(it is written in place\), got strides \[12, 1, 3\]$"),
        Bad("bias-dtype", put(bias=lambda a, d: a["bias"].double()),
            r"^landscape_bias_act_: bias must have the dtype of x \(Float\), got Double$"),
        Bad("bias-shape", put(bias=lambda a, d: a["bias"][:, :3]),
            r"^landscape_bias_act_: bias must be \[c, F\] = \[2, 4\], got shape \[2, 3\]$"),
        Bad("bias-c", put(bias=lambda a, d: a["bias"][:1]),
            r"^landscape_bias_act_: bias must be \[c, F\] = \[2, 4\], got shape \[1, 4\]$"),
        Bad("act", put(act="tanh"), r"^landscape_bias_act_: act must be 'none' or 'relu', got 'tanh'$"),
        Bad("bias-in-x", put(bias=_bias_of_x),
            r"^landscape_bias_act_: (bias overlaps x|x overlaps bias) \(the same memory twice in one call\)"),
    ] + placement("landscape_bias_act_", "x", "bias")
    + placement("landscape_bias_act_", "bias", "x",
                device=r"^landscape_bias_act_: (x is on cpu, expected CUDA|bias is on cpu but x is on cuda:0)$"))


class TestLandscapeBiasAct(OpContract):
    spec = LANDSCAPE_BIAS_ACT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_combine_and_bias_act_closed_forms(device, dtype):
    """Against float64 sums of the rounded inputs: combine == act(einsum) and bias_act == act(x + b)."""
    gen = torch.Generator().manual_seed(9)
    tol = _CLOSE[dtype] * 4
    for R, k, F, c in COMBINE_SHAPES:
        parts, mix = _rand(gen, R, k, F).to(dtype), _rand(gen, c, k).to(dtype)
        lin = torch.einsum("cj,rjf->crf", mix.double(), parts.double())
        scale = torch.einsum("cj,rjf->crf", mix.double().abs(), parts.double().abs()) + 1e-3
        for backend in _backends(device) if ops.native_op("landscape_combine", device) else ["reference"]:
            for act, want in (("none", lin), ("relu", lin.clamp_min(0))):
                got = ops.landscape_combine(parts.to(device), mix.to(device), act, backend=backend).cpu().double()
                assert bool(((got - want).abs() <= tol * scale).all()), (backend, act, R, k, F, c)
    for c, R, F in BIAS_SHAPES:
        x, b = _rand(gen, c, R, F).to(dtype), _rand(gen, c, F).to(dtype)
        want = x.double() + b.double()[:, None]
        for backend in ["reference"] + (["native"] if ops.native_op("landscape_bias_act_", device) else []):
            for bias, act, w in ((b, "relu", want.clamp_min(0)), (b, "none", want),
                                 (None, "relu", x.double().clamp_min(0))):
                y = x.to(device).clone()
                assert ops.landscape_bias_act_(y, None if bias is None else bias.to(device), act, backend=backend) is y
                scale = x.double().abs() + (0 if bias is None else b.double().abs()[:, None]) + 1e-3
                assert bool(((y.cpu().double() - w).abs() <= tol * scale).all()), (backend, act, c, R, F)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_keeps_nan_and_signed_zero(device):
    """act='relu': v < 0 -> +0, NaN and -0 pass through (the reference's rule, on every backend)."""
    v = torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan"), float("-inf"), float("inf")], device=device)
    for backend in _backends(device):
        x = v.view(1, 1, -1).clone()
        ops.landscape_bias_act_(x, None, "relu", backend=backend)
        got = x.view(-1).cpu()
        assert got[0].item() == 0.0 and not torch.signbit(got[0])
        assert torch.signbit(got[1]) and got[1].item() == 0.0
        assert torch.isnan(got[4]) and got[5].item() == 0.0 and got[6].item() == float("inf")
        parts = v.view(-1, 1, 1)  # k = 1: out = 1 * v
        out = ops.landscape_combine(parts, torch.ones(1, 1, device=device), "relu", backend=backend).view(-1).cpu()
        assert torch.equal(out.nan_to_num(7.0), got.nan_to_num(7.0))


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_fused_passes_match_cpu_bitwise(dtype):
    """The CUDA kernels of landscape_combine and landscape_bias_act_ against the CPU op, bit for bit
    (k = 1..9, grid-stride sizes, strided inputs), and bias_act_ writes nothing outside x."""
    require_cuda_kernel("landscape_combine")
    require_cuda_kernel("landscape_bias_act_")
    gen = torch.Generator().manual_seed(12)
    for R, k, F, c in COMBINE_SHAPES + [(1000, 3, 600, 40), (3, 9, 5, 7)]:
        parts, mix = _rand(gen, R, k, F).to(dtype), _rand(gen, c, k).to(dtype)
        for act in ("none", "relu"):
            cpu = ops.landscape_combine(parts, mix, act, backend="native")
            gpu = ops.landscape_combine(parts.cuda().transpose(0, 2).contiguous().transpose(0, 2), mix.cuda(), act,
                                        backend="native")
            assert torch.equal(gpu.cpu(), cpu), (R, k, F, c, act, dtype)
    for c, R, F in BIAS_SHAPES + [(40, 1000, 600)]:
        x, b = _rand(gen, c, R, F).to(dtype), _rand(gen, c, F).to(dtype)
        for bias in (b, None):
            cpu = x.clone()
            ops.landscape_bias_act_(cpu, bias, "relu", backend="native")
            out, buf = placed(x.clone(), offset=5)
            ops.landscape_bias_act_(out, None if bias is None else bias.cuda().t().contiguous().t(), "relu",
                                    backend="native")
            assert torch.equal(out.cpu(), cpu), (c, R, F, dtype)
            assert sentinels_intact(out, buf)
