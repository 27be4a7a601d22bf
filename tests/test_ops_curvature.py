"""The loss-Hessian op (loss_hessian, curvature family): the op contract, the per-row Hessians
against autograd, the factor identities B B^T = H, extreme logits, C = 1, C = 1000, N = 0, and the
CUDA kernel against the CPU op over shapes that cross its code paths. The GGN / Fisher operators
built on it are tested in their own files."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pyfastbayes import _reference, ops

from _helpers import ALL_DTYPES, DEVICES, Bad, OpContract, OpSpec, needs_cuda, needs_native, placement, put

OP = "loss_hessian"
KINDS = ("cross_entropy", "bce", "mse")  # the kinds that take any C (gaussian_natural: even C, its own tests)
GN = "gaussian_natural"
MODES = ("hessian", "factor", "factor_t")


def _logits(N, C, gen, scale=3.0):
    return torch.randn(N, C, generator=gen, dtype=torch.float64) * scale


def _natural(N, C, gen):
    """Natural parameters [N, C = 2D] of D Gaussians: eta1 = mu / s2, eta2 = -1 / (2 s2) with mu ~
    N(0, 2^2) and log s2 ~ N(0, 1.5^2)."""
    D = C // 2
    mu = torch.randn(N, D, generator=gen, dtype=torch.float64) * 2
    s2 = torch.exp(torch.randn(N, D, generator=gen, dtype=torch.float64) * 1.5)
    return torch.cat([mu / s2, -0.5 / s2], 1)


def lh_make(kind, device, dtype, gen):
    def call(k_, x, V, m):
        return dict(kind=k_, outputs=x.to(dtype=dtype, device=device), V=V.to(dtype=dtype, device=device), mode=m)

    calls = []
    if kind == "random":  # every kind x mode, several (N, C, k) shapes, C = 1 and k = 1 included
        for (N, C, k), loss, mode in itertools.product([(33, 7, 3), (5, 1, 2), (9, 40, 1), (4, 3, 33)], KINDS, MODES):
            calls.append(call(loss, _logits(N, C, gen), torch.randn(N, C, k, generator=gen, dtype=torch.float64), mode))
        for (N, C, k), mode in itertools.product([(33, 8, 3), (5, 2, 2), (9, 40, 1), (4, 4, 33)], MODES):
            calls.append(call(GN, _natural(N, C, gen), torch.randn(N, C, k, generator=gen, dtype=torch.float64), mode))
        return calls
    if kind == "empty":  # N = 0: an empty [0, C, k] result
        return [call(loss, _logits(0, 6, gen), torch.empty(0, 6, 2, dtype=torch.float64), mode)
                for loss, mode in itertools.product(KINDS + (GN,), MODES)]
    # transposed outputs, permuted V (k strided), a column slice of wider outputs
    for loss, mode in itertools.product(KINDS + (GN,), MODES):
        # [11, 6] viewed transposed: N = 11, C = 6 (gaussian_natural: its eta2 columns 3-5 below 0)
        x = _natural(11, 6, gen).t().contiguous().t() if loss == GN else _logits(6, 11, gen).t()
        V = torch.randn(3, 11, 6, generator=gen, dtype=torch.float64).permute(1, 2, 0)  # [11, 6, 3]
        calls.append(call(loss, x, V, mode))  # .to() keeps the strides of these dense views
        wide = _logits(8, 9, gen)
        if loss == GN:  # columns 2:8 of wider outputs
            wide[:, 2:8] = _natural(8, 6, gen)
        cols = slice(2, 8) if loss == GN else slice(2, 7)
        wide = wide.to(dtype=dtype, device=device)[:, cols]
        Vw = torch.randn(8, 2 * wide.shape[1], 2, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)[:, ::2]
        calls.append(dict(kind=loss, outputs=wide, V=Vw, mode=mode))
    return calls


def lh_post(kind, calls, outs, after):
    """A new contiguous [N, C, k] tensor of the inputs' dtype, never one of the inputs."""
    for a, out in zip(calls, outs):
        assert out.shape == a["V"].shape and out.dtype == a["V"].dtype and out.is_contiguous()
        assert out.numel() == 0 or out.data_ptr() not in (a["V"].data_ptr(), a["outputs"].data_ptr())


def lh_good(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return dict(kind="cross_entropy", outputs=_logits(4, 5, gen).to(dtype=dtype, device=device),
                V=torch.randn(4, 5, 3, generator=gen).to(dtype=dtype, device=device), mode="hessian")


def _opcheck_args(kind, mode, dtype, N=4):
    def f(device):
        a = lh_good(device, dtype)
        return dict(a, kind=kind, mode=mode, outputs=a["outputs"][:N], V=a["V"][:N])
    return f


def _gn_opcheck_args(mode, dtype):
    def f(device):
        gen = torch.Generator().manual_seed(4)
        return dict(kind=GN, outputs=_natural(4, 6, gen).to(dtype=dtype, device=device),
                    V=torch.randn(4, 6, 3, generator=gen).to(dtype=dtype, device=device), mode=mode)
    return f


LOSS_HESSIAN = OpSpec(
    OP, grid=ALL_DTYPES, make=lh_make, good=lh_good, post=lh_post, seed=11,
    opcheck=[_opcheck_args("cross_entropy", "factor", torch.float64), _opcheck_args("cross_entropy", "factor_t", torch.float32),
             _opcheck_args("bce", "factor", torch.float64), _opcheck_args("mse", "hessian", torch.float32),
             _opcheck_args("cross_entropy", "hessian", torch.float32, N=0), _gn_opcheck_args("factor", torch.float64),
             _gn_opcheck_args("factor_t", torch.float32)],
    bad=[
        Bad("kind-unknown", put(kind="nll"),
            rf"^{OP}: kind must be 'cross_entropy', 'bce', 'mse' or 'gaussian_natural', got 'nll'$"),
        Bad("gaussian-odd-C", put(kind=GN), rf"^{OP}: kind 'gaussian_natural' needs an even number of columns C = 2D "
            rf"\(eta1 of the D targets, then their eta2\), got C = 5$"),
        Bad("kind-case", put(kind="CrossEntropy"), rf"^{OP}: kind must be .* got 'CrossEntropy'$"),
        Bad("mode-unknown", put(mode="sqrt"), rf"^{OP}: mode must be 'hessian', 'factor' or 'factor_t', got 'sqrt'$"),
        Bad("outputs-int", put(outputs=lambda a, d: a["outputs"].long(), V=lambda a, d: a["V"].long()),
            rf"^{OP}: outputs must be floating point, got Long$"),
        Bad("outputs-1d", put(outputs=lambda a, d: a["outputs"][0]), rf"^{OP}: outputs must be \[N, C\], got shape \[5\]$"),
        Bad("outputs-3d", put(outputs=lambda a, d: a["outputs"][None]),
            rf"^{OP}: outputs must be \[N, C\], got shape \[1, 4, 5\]$"),
        Bad("C-0", put(outputs=lambda a, d: a["outputs"][:, :0], V=lambda a, d: a["V"][:, :0]),
            rf"^{OP}: outputs needs C >= 1 columns, got C = 0$"),
        Bad("V-dtype", put(V=lambda a, d: a["V"].double()), rf"^{OP}: V must have the dtype of outputs \(Float\), got Double$"),
        Bad("V-int", put(V=lambda a, d: a["V"].int()), rf"^{OP}: V must have the dtype of outputs \(Float\), got Int$"),
        Bad("V-2d", put(V=lambda a, d: a["V"][..., 0]),
            rf"^{OP}: V must be \[N, C, k\] with N = 4, C = 5 \(outputs' shape\), got shape \[4, 5\]$"),
        Bad("V-N", put(V=lambda a, d: a["V"][:3]), rf"^{OP}: V must be \[N, C, k\] with N = 4, C = 5 .* got shape \[3, 5, 3\]$"),
        Bad("V-C", put(V=lambda a, d: a["V"][:, :4]), rf"^{OP}: V must be \[N, C, k\] .* got shape \[4, 4, 3\]$"),
        Bad("V-4d", put(V=lambda a, d: a["V"][..., None]), rf"^{OP}: V must be \[N, C, k\] .* got shape \[4, 5, 3, 1\]$"),
        Bad("k-0", put(V=lambda a, d: a["V"][..., :0]), rf"^{OP}: V needs k >= 1 columns \(V.size\(2\)\), got k = 0$"),
    ] + placement(OP, "V", "outputs", device=rf"^{OP}: (outputs is on cpu, expected CUDA|V is on cpu but outputs is on cuda:0)$")
    + placement(OP, "outputs", "V"))


class TestLossHessian(OpContract):
    spec = LOSS_HESSIAN


# ---- closed forms ------------------------------------------------------------------------------
def _row_loss(kind, C, gen):
    """The sum-reduced loss of one row of outputs (a function of the [C] outputs): its Hessian is H_n."""
    if kind == "cross_entropy":
        y = torch.randint(0, C, (1,), generator=gen)
        return lambda o: F.cross_entropy(o[None], y, reduction="sum")
    target = torch.rand(C, generator=gen, dtype=torch.float64)
    if kind == "bce":
        return lambda o: F.binary_cross_entropy_with_logits(o, target, reduction="sum")
    return lambda o: F.mse_loss(o, target, reduction="sum")


def _backends(device):
    return ["reference"] + (["native"] if ops.native_op(OP, device) else [])


def _eye(N, C, dtype, device):
    return torch.eye(C, dtype=dtype, device=device).expand(N, C, C)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_matches_autograd(kind, device):
    """loss_hessian(kind, x, I) row n = the autograd Hessian of the row's sum-reduced loss, and
    H V for a random V = that Hessian times V."""
    gen = torch.Generator().manual_seed(1)
    N, C = 6, 9
    x = _logits(N, C, gen, scale=4.0)
    x[2, 4] += 30.0  # one saturated row
    V = torch.randn(N, C, 4, generator=gen, dtype=torch.float64)
    H = torch.stack([torch.autograd.functional.hessian(_row_loss(kind, C, gen), x[n]) for n in range(N)])
    for backend in _backends(device):
        got = ops.loss_hessian(kind, x.to(device), _eye(N, C, torch.float64, device), "hessian", backend=backend).cpu()
        torch.testing.assert_close(got, H, rtol=1e-12, atol=1e-14, msg=lambda m: f"{backend}: {m}")
        hv = ops.loss_hessian(kind, x.to(device), V.to(device), "hessian", backend=backend).cpu()
        torch.testing.assert_close(hv, H @ V, rtol=1e-12, atol=1e-13, msg=lambda m: f"{backend}: {m}")
        hv32 = ops.loss_hessian(kind, x.float().to(device), V.float().to(device), backend=backend).cpu()
        torch.testing.assert_close(hv32.double(), H @ V, rtol=1e-5, atol=1e-5, msg=lambda m: f"{backend} fp32: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_factor_identities(kind, dtype, device):
    """B (B^T I) = H, factor_t is the transpose of factor, and B V, B^T V match B and B^T applied as matrices."""
    gen = torch.Generator().manual_seed(2)
    N, C = 5, 8
    x = _logits(N, C, gen).to(dtype=dtype, device=device)
    I = _eye(N, C, dtype, device)
    V = torch.randn(N, C, 3, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for backend in _backends(device):
        lh = lambda X, mode: ops.loss_hessian(kind, x, X, mode, backend=backend)  # noqa: E731
        H, B, Bt = lh(I, "hessian"), lh(I, "factor"), lh(I, "factor_t")
        torch.testing.assert_close(lh(Bt, "factor"), H, **tol)
        torch.testing.assert_close(B @ B.transpose(1, 2), H, **tol)
        torch.testing.assert_close(Bt, B.transpose(1, 2), **tol)
        torch.testing.assert_close(lh(V, "factor"), B @ V, **tol)
        torch.testing.assert_close(lh(V, "factor_t"), Bt @ V, **tol)
        if kind == "cross_entropy":  # the stated B = diag(q) - p q^T
            p = x.double().softmax(-1)
            q = p.sqrt()
            B_formula = torch.diag_embed(q) - p[:, :, None] * q[:, None, :]
            torch.testing.assert_close(B.double(), B_formula, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_huge_logits_stay_finite(dtype, device):
    """Logits of magnitude 1e4: max-subtracted softmax and exp(-|x|) in bce give no NaN / inf, and
    the values match the float64 closed form."""
    gen = torch.Generator().manual_seed(3)
    N, C = 6, 5
    x = torch.randn(N, C, generator=gen, dtype=torch.float64).sign() * 1e4
    x[0] = torch.tensor([1e4, 1e4 - 1.0, -1e4, 0.0, 1e4 - 0.5])  # near-ties among huge logits
    x[1] = 1e4  # all equal: p = 1 / C
    xd = x.to(dtype=dtype, device=device)
    V = torch.randn(N, C, 2, generator=gen, dtype=torch.float64)
    x64 = xd.double().cpu()  # the logits as rounded to dtype
    p = x64.softmax(-1)
    s = torch.sigmoid(x64)
    want = {"cross_entropy": (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ V,
            "bce": (s * (1 - s))[:, :, None] * V, "mse": 2 * V}
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for kind, backend, mode in itertools.product(KINDS, _backends(device), MODES):
        out = ops.loss_hessian(kind, xd, V.to(dtype=dtype, device=device), mode, backend=backend)
        assert torch.isfinite(out).all(), (kind, backend, mode)
        if mode == "hessian":
            torch.testing.assert_close(out.double().cpu(), want[kind], rtol=tol, atol=tol, msg=lambda m: f"{kind} {backend}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_one_class_and_thousand_classes(device):
    """C = 1: cross_entropy's H = 0 (p = 1), bce / mse their diagonal; C = 1000 against the dense formula."""
    gen = torch.Generator().manual_seed(4)
    x1 = _logits(7, 1, gen).to(device)
    V1 = torch.randn(7, 1, 3, generator=gen, dtype=torch.float64).to(device)
    for backend in _backends(device):
        for mode in MODES:
            assert not ops.loss_hessian("cross_entropy", x1, V1, mode, backend=backend).any()
        s = torch.sigmoid(x1)
        torch.testing.assert_close(ops.loss_hessian("bce", x1, V1, backend=backend), (s * (1 - s))[..., None] * V1)
    N, C = 5, 1000
    x = _logits(N, C, gen, scale=5.0)
    V = torch.randn(N, C, 2, generator=gen, dtype=torch.float64)
    p = x.softmax(-1)
    want = p[:, :, None] * V - p[:, :, None] * (p[:, :, None] * V).sum(1, keepdim=True)
    for backend, dtype in itertools.product(_backends(device), [torch.float64, torch.float32]):
        got = ops.loss_hessian("cross_entropy", x.to(dtype=dtype, device=device), V.to(dtype=dtype, device=device),
                               backend=backend)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol, msg=lambda m: f"{backend} {dtype}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_no_rows(device):
    for kind, mode, backend in itertools.product(KINDS, MODES, _backends(device)):
        out = ops.loss_hessian(kind, torch.empty(0, 4, device=device), torch.empty(0, 4, 6, device=device), mode,
                               backend=backend)
        assert out.shape == (0, 4, 6) and out.dtype == torch.float32 and out.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_result_is_new_and_carries_no_graph(device):
    """The inputs are read only and the result is detached on both backends (the op has no autograd)."""
    gen = torch.Generator().manual_seed(8)
    x = _logits(3, 4, gen).to(device).requires_grad_()
    V = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    x0, V0 = x.detach().clone(), V.detach().clone()
    for backend, kind in itertools.product(_backends(device), KINDS):
        out = ops.loss_hessian(kind, x, V, "hessian", backend=backend)
        assert not out.requires_grad and out.grad_fn is None
        out.add_(1.0)  # writing the result touches no input
    assert torch.equal(x.detach(), x0) and torch.equal(V.detach(), V0)


@needs_native
def test_native_refuses_other_floating_dtypes():
    x = torch.zeros(2, 3).to(torch.float8_e5m2)
    with pytest.raises(RuntimeError, match=rf"^{OP}: outputs must be float64, float32, float16 or bfloat16, got "):
        ops.loss_hessian("mse", x, torch.zeros(2, 3, 1).to(torch.float8_e5m2), backend="native")


def test_wrapper_falls_back_to_the_reference_without_a_kernel(monkeypatch):
    from pyfastbayes import _native

    a = lh_good("cpu", torch.float64)
    expected = _reference.loss_hessian(**a)
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    assert ops.native_op(OP, "cpu") is None
    torch.testing.assert_close(ops.loss_hessian(**a), expected, rtol=0, atol=0)


# ---- gaussian_natural ---------------------------------------------------------------------------
def _gaussian_row_nll(y):
    """The row's summed Gaussian NLL as a function of its natural parameters [2D], written with
    torch.distributions.Normal (mean -eta1 / (2 eta2), variance -1 / (2 eta2)): its Hessian is H_n."""
    D = y.shape[0]

    def f(o):
        eta1, eta2 = o[:D], o[D:]
        return -torch.distributions.Normal(-eta1 / (2 * eta2), (-0.5 / eta2).sqrt()).log_prob(y).sum()
    return f


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_natural_matches_autograd(device):
    """Row n of loss_hessian('gaussian_natural', x, I) is the autograd Hessian of the row's Gaussian
    NLL (whatever the targets: the natural parameterisation's Hessian has no y in it), B B^T = H,
    factor_t is B^T, and products with a random V match the matrices."""
    gen = torch.Generator().manual_seed(12)
    N, D = 7, 3
    x = _natural(N, 2 * D, gen)
    H = torch.stack([torch.autograd.functional.hessian(_gaussian_row_nll(torch.randn(D, generator=gen, dtype=torch.float64)),
                                                       x[n]) for n in range(N)])
    H2 = torch.stack([torch.autograd.functional.hessian(_gaussian_row_nll(torch.randn(D, generator=gen, dtype=torch.float64) * 9),
                                                        x[n]) for n in range(N)])
    torch.testing.assert_close(H, H2, rtol=1e-10, atol=1e-10)  # (the reference itself: y-free)
    V = torch.randn(N, 2 * D, 4, generator=gen, dtype=torch.float64)
    I = _eye(N, 2 * D, torch.float64, device)
    for backend in _backends(device):
        lh = lambda X, mode, xx=x: ops.loss_hessian(GN, xx.to(device), X.to(device), mode, backend=backend).cpu()  # noqa: E731
        torch.testing.assert_close(lh(I, "hessian"), H, rtol=1e-12, atol=1e-12, msg=lambda m: f"{backend}: {m}")
        B, Bt = lh(I, "factor"), lh(I, "factor_t")
        torch.testing.assert_close(B @ B.transpose(1, 2), H, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Bt, B.transpose(1, 2), rtol=0, atol=0)
        assert not B[:, :D, D:].any()  # lower triangular in each (eta1, eta2) block: Cholesky's factor
        for mode, M in (("hessian", H), ("factor", B), ("factor_t", Bt)):
            torch.testing.assert_close(lh(V, mode), M @ V, rtol=1e-12, atol=1e-12)
            got32 = lh(V.float(), mode, x.float()).double()
            torch.testing.assert_close(got32, M @ V, rtol=1e-4, atol=1e-4, msg=lambda m: f"{backend} fp32 {mode}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_natural_no_gaussian_gives_nan_in_its_block(device):
    """eta2 >= 0 (and NaN) is no Gaussian: its block's two rows are NaN, the other blocks exact."""
    gen = torch.Generator().manual_seed(13)
    x = _natural(3, 4, gen)  # D = 2
    good = x.clone()
    x[0, 2], x[1, 3], x[2, 2] = 0.0, 0.5, math.nan
    V = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    for backend, mode in itertools.product(_backends(device), MODES):
        out = ops.loss_hessian(GN, x.to(device), V.to(device), mode, backend=backend).cpu()
        want = ops.loss_hessian(GN, good.to(device), V.to(device), mode, backend=backend).cpu()
        bad = torch.zeros(3, 4, dtype=torch.bool)
        bad[0, [0, 2]] = bad[1, [1, 3]] = bad[2, [0, 2]] = True
        assert out[bad].isnan().all(), (backend, mode)
        torch.testing.assert_close(out[~bad], want[~bad], rtol=0, atol=0)


# ---- CUDA kernel against the CPU op -----------------------------------------------------------
# Shapes crossing the kernel's paths: k = 1 (lanes over classes), k in (1, 32) (lanes split over
# classes and columns, partial column tiles), k > 32 (several column tiles), C below and above
# the block, rows beyond the grid (grid-stride), and C whose probabilities do not fit in shared
# memory (global scratch rows: with 227 KiB of opt-in shared memory, as on H100 / H200, less 4 KiB,
# fp32 C > 57088 (factor_t C > 28544), fp64 C > 28544 (factor_t C > 14272)).
CUDA_SHAPES = [(1, 1, 1), (3, 2, 1), (37, 31, 2), (5, 33, 3), (9, 257, 5), (4, 1000, 32), (3, 100, 33),
               (2, 64, 70), (5000, 3, 1), (700, 10, 7)]


@needs_cuda
@needs_native
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind, dtype):
    gen = torch.Generator().manual_seed(5)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else {
        torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]
    for (N, C, k), mode in itertools.product(CUDA_SHAPES, MODES):
        x = _logits(N, C, gen).to(dtype)
        V = torch.randn(N, C, k, generator=gen, dtype=torch.float64).to(dtype)
        cpu = ops.loss_hessian(kind, x, V, mode, backend="native")
        gpu = ops.loss_hessian(kind, x.cuda(), V.cuda(), mode, backend="native")
        torch.testing.assert_close(gpu.cpu(), cpu, **tol, msg=lambda m: f"{kind} {mode} {(N, C, k)}: {m}")


@needs_cuda
@needs_native
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_matches_cpu_gaussian_natural(dtype):
    gen = torch.Generator().manual_seed(9)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else {
        torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]
    for (N, C, k), mode in itertools.product([(1, 2, 1), (37, 2, 3), (5, 34, 3), (9, 256, 5), (5000, 4, 1), (3, 100, 33)],
                                             MODES):
        x = _natural(N, C, gen).to(dtype)
        V = torch.randn(N, C, k, generator=gen, dtype=torch.float64).to(dtype)
        cpu = ops.loss_hessian(GN, x, V, mode, backend="native")
        gpu = ops.loss_hessian(GN, x.cuda(), V.cuda(), mode, backend="native")
        torch.testing.assert_close(gpu.cpu(), cpu, **tol, msg=lambda m: f"{mode} {(N, C, k)}: {m}")


@needs_cuda
@needs_native
@pytest.mark.parametrize("dtype,C", [(torch.float32, 60000), (torch.float64, 30000)])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_long_rows_match_cpu(mode, dtype, C):
    """Rows too long for the probabilities to sit in shared memory (the global scratch path)."""
    gen = torch.Generator().manual_seed(6)
    x = _logits(3, C, gen, scale=4.0).to(dtype)
    V = torch.randn(3, C, 2, generator=gen, dtype=torch.float64).to(dtype)
    cpu = ops.loss_hessian("cross_entropy", x, V, mode, backend="native")
    gpu = ops.loss_hessian("cross_entropy", x.cuda(), V.cuda(), mode, backend="native")
    # atol: the dots over C terms are summed in another order (1 ulp of t, times q^2 <= 1)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)


@needs_cuda
@needs_native
def test_cuda_noncontiguous_and_huge_logits():
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(40, 12, generator=gen) * 1e4).t().contiguous().t()  # [40, 12], column-major
    V = torch.randn(3, 40, 12, generator=gen).permute(1, 2, 0)
    for kind, mode in itertools.product(KINDS, MODES):
        cpu = ops.loss_hessian(kind, x, V, mode, backend="native")
        gpu = ops.loss_hessian(kind, x.cuda().t().contiguous().t(), V.cuda().permute(2, 0, 1).contiguous().permute(1, 2, 0),
                               mode, backend="native")
        assert torch.isfinite(gpu).all()
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-5, atol=2e-6)
