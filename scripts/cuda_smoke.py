"""Every CUDA kernel of pyfastbayes once, on small inputs that reach each code path (aligned and
unaligned, vector body and tails, several chunks and launches, every dtype, shared and global
bins), checked against the CPU op. Small and quick, so that it can run under compute-sanitizer:

    compute-sanitizer --tool memcheck|racecheck|synccheck python scripts/cuda_smoke.py

Exits non-zero (AssertionError) when a CUDA result differs from the CPU one.
"""
from __future__ import annotations

import sys

import torch

import pyfastbayes
from pyfastbayes import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def close(a, b, tol):
    torch.testing.assert_close(a.cpu().double(), b.cpu().double(), rtol=tol, atol=tol)


def sgmcmc() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [1, 3, 4, 5, 1027, 70_001]  # odd tails, and more than one 16 K chunk
    for dtype in DTYPES:
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        for name, state in (("sgld_step_", False), ("sghmc_step_", True), ("psgld_step_", True)):
            base = [torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
            grads = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
            bufs = [torch.rand(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
            hyper = torch.tensor([1e-3, 0.7, 500.0, 2.0, 0.5, 1e-3], dtype=torch.float64)
            out = {}
            for dev in ("cpu", "cuda"):
                # copies (x.to("cpu") would be x itself, and the step writes in place); params are
                # views one element in: unaligned bases
                ps = [b.clone().to(dev)[1:] for b in base]
                gs, bs = [x.clone().to(dev) for x in grads], [x.clone().to(dev) for x in bufs]
                args = [ps, gs] + ([bs] if state else []) + [hyper.to(dev), torch.tensor([7, 3], device=dev)]
                getattr(ops, name)(*args, backend="native")
                out[dev] = ps + (bs if state else [])
            for a, b in zip(out["cuda"], out["cpu"]):
                close(a, b, tol)
        x = torch.zeros(4099, dtype=dtype, device="cuda")[3:]
        assert not bool(ops.any_nonfinite([x], backend="native"))
        x[-1] = float("nan")
        assert bool(ops.any_nonfinite([x], backend="native"))


def calibration() -> None:
    g = torch.Generator().manual_seed(1)
    for S, N, C, B in ((1, 3000, 10, 15), (2, 700, 3, 15), (3, 500, 33, 10), (1, 200, 1000, 15), (2, 100, 300, 15)):
        for logits in (False, True):
            x = torch.randn(S, N, C, generator=g)
            p = x if logits else x.softmax(-1)
            y = torch.randint(0, C, (N,), generator=g)
            y[:3] = C  # bad targets
            for dtype in DTYPES:
                for classwise in (False, True):
                    cpu = ops.calibration_bins(p.to(dtype), y, B, logits, classwise, backend="native")
                    gpu = ops.calibration_bins(p.to(dtype).cuda(), y.cuda(), B, logits, classwise, backend="native")
                    for a, b in zip(gpu, cpu):
                        close(a, b, 1e-9)


def swag() -> None:
    g = torch.Generator().manual_seed(2)
    sizes = [3, 1, 4096, 5001]
    P = sum(sizes)
    params = [torch.randn(n, generator=g) for n in sizes]
    for dev_dtype in (torch.float32, torch.bfloat16):
        res = {}
        for dev in ("cpu", "cuda"):
            mean, sq = torch.zeros(P, device=dev), torch.zeros(P, device=dev)
            D = torch.zeros(3, P + 1, dtype=dev_dtype, device=dev)[:, :P]  # ring rows of stride P + 1
            for n in range(5):
                ps = [(p + 0.1 * n).to(dev) for p in params]
                ops.swag_collect_(ps, mean, sq, D[n % 3], n, backend="native")
            draws = ops.swag_sample(mean, sq, D, 40, 0.5, 1e-30, 42, 1, 0, backend="native")
            few = ops.swag_sample(mean, sq, D, 20, 0.5, 1e-30, 43, 1, 0, backend="native")  # the halved draw tile
            res[dev] = (mean, sq, D, draws, few)
        for a, b in zip(res["cuda"], res["cpu"]):
            close(a, b, 1e-4 if dev_dtype == torch.float32 else 1e-2)


def random() -> None:
    c = torch.randint(0, 2**32, (1001, 4), dtype=torch.int64)
    assert torch.equal(ops.philox4x32(c.cuda(), 5, 9, backend="native").cpu(), ops.philox4x32(c, 5, 9, backend="native"))
    a, b = torch.empty(10_003), torch.empty(10_003, device="cuda")
    ops.philox_normal_(a, 1, 2, 3, backend="native")
    ops.philox_normal_(b, 1, 2, 3, backend="native")
    close(b, a, 1e-5)


def curvature() -> None:
    """loss_hessian: elementwise kinds, cross_entropy with one- and many-column tiles, shared-memory
    and global-scratch (long rows) coefficients, every dtype."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 1, 1), (37, 31, 2), (5, 33, 3), (4, 300, 40), (2, 30_000, 2)]  # the last: global scratch (fp64)
    for (N, C, k), dtype in ((s, d) for s in shapes for d in DTYPES):
        if C > 1000 and dtype != torch.float64:
            continue
        x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
        V = torch.randn(N, C, k, generator=g, dtype=torch.float64).to(dtype)
        for kind in ("cross_entropy", "bce", "mse"):
            for mode in ("hessian", "factor", "factor_t"):
                cpu = ops.loss_hessian(kind, x, V, mode, backend="native")
                gpu = ops.loss_hessian(kind, x.cuda(), V.cuda(), mode, backend="native")
                close(gpu, cpu, 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2)


def landscape() -> None:
    """landscape_points_: m = 1, 2, 8 directions, few and many points (the y split of the grid),
    several coords tiles per block (float32 only), float64 and same-dtype coords, every dtype; then
    landscape_combine and landscape_bias_act_; CPU and CUDA agree bit for bit."""
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 1, 1), (1000, 2, 37), (70_001, 8, 3), (33, 2, 5000), (280_001, 1, 40)]  # last: several tiles
    for (P, m, n), dtype in ((s, d) for s in shapes for d in DTYPES):
        if P * n > 1_000_000 and dtype != torch.float32:
            continue
        th = torch.randn(P, generator=g, dtype=torch.float64).to(dtype)
        D = torch.randn(m, P, generator=g, dtype=torch.float64).to(dtype)
        for c in (torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(n, m, generator=g).to(dtype)):
            cpu, gpu = torch.empty(n, P, dtype=dtype), torch.empty(n, P, dtype=dtype, device="cuda")
            ops.landscape_points_(th, D, c, cpu, backend="native")
            ops.landscape_points_(th.cuda(), D.cuda(), c.cuda(), gpu, backend="native")
            assert torch.equal(gpu.cpu(), cpu), ("landscape_points_", P, m, n, dtype, c.dtype)
    # the grid engine's fused passes: k = 1..9 parts, both activations, with and without a bias
    for (R, k, F, c), dtype in ((s, d) for s in [(1, 1, 1, 1), (513, 3, 128, 33), (7, 9, 1000, 5)] for d in DTYPES):
        parts = torch.randn(R, k, F, generator=g, dtype=torch.float64).to(dtype)
        mix = torch.randn(c, k, generator=g, dtype=torch.float64).to(dtype)
        bias = torch.randn(c, F, generator=g, dtype=torch.float64).to(dtype)
        for act in ("none", "relu"):
            cpu = ops.landscape_combine(parts, mix, act, backend="native")
            gpu = ops.landscape_combine(parts.cuda(), mix.cuda(), act, backend="native")
            assert torch.equal(gpu.cpu(), cpu), ("landscape_combine", R, k, F, c, act, dtype)
            for b in (bias, None):
                x_cpu, x_gpu = cpu.clone(), cpu.cuda()
                ops.landscape_bias_act_(x_cpu, b, act, backend="native")
                ops.landscape_bias_act_(x_gpu, None if b is None else b.cuda(), act, backend="native")
                assert torch.equal(x_gpu.cpu(), x_cpu), ("landscape_bias_act_", R, F, c, act, dtype)


def kfac() -> None:
    """kfac_factor_: every (x, factor) dtype pair, with and without the bias, D = 1 to 300 (past a
    block, not a multiple of it), x transposed on the device, two batches into one factor; the
    GEMMs add in other orders, so CUDA and CPU agree to ~eps * the size of the terms, and both
    stay exactly symmetric."""
    g = torch.Generator().manual_seed(6)
    pairs = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
             (torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, torch.float64)]
    for (M, d, bias), (xd, fd) in ((s, p) for s in [(1, 1, True), (300, 17, False), (2000, 299, True)] for p in pairs):
        B = torch.randn(d + bias, d + bias, generator=g, dtype=torch.float64)
        cpu = (B + B.t()).to(fd)
        gpu = cpu.cuda()
        for scale in (0.5, 2.0):
            x = torch.randn(M, d, generator=g).to(xd)
            ops.kfac_factor_(cpu, x, scale, bias, backend="native")
            ops.kfac_factor_(gpu, x.t().contiguous().cuda().t(), scale, bias, backend="native")
        assert torch.equal(gpu, gpu.t()) and torch.equal(cpu, cpu.t()), ("kfac_factor_ symmetry", M, d, xd, fd)
        close(gpu / (M + 1), cpu / (M + 1), 1e-5 if fd == torch.float32 else 1e-12)


def vi() -> None:
    """The vi family: the four two-input noisy ops, vi_rademacher_, vi_rademacher_mul and the sigma^2 ops, every
    dtype, partial last Philox blocks and a few CUDA blocks, inputs one element past an aligned
    allocation (the scalar path) and transposed on the device, out a strided view (the temporary);
    the normals agree to ~1e-6 (FMA contraction), the signs (and x times them) to the bit."""
    g = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        for n in (1, 5, 1027, 70_001):
            a = torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype)
            rho = (3 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(-30, 25).to(dtype)
            var = (torch.rand(n, generator=g, dtype=torch.float64) - 0.01).to(dtype)  # a few below 0
            for name, b in (("vi_sample", rho), ("vi_sample_backward", rho), ("vi_local_noise", var),
                            ("vi_local_noise_backward", var)):
                f = getattr(ops, name)
                cpu = f(a[1:], b, torch.tensor([-3, 2**32 + 5]), 9, backend="native")
                gpu = f(a.cuda()[1:], b.cuda(), torch.tensor([-3, 2**32 + 5], device="cuda"), 9, backend="native")
                close(gpu, cpu, tol)
            cpu = torch.zeros(n, dtype=dtype)
            ops.vi_rademacher_(cpu, torch.tensor([5, 6]), 2**32 - 1, backend="native")
            gpu = torch.zeros(2 * n, dtype=dtype, device="cuda")[::2]
            ops.vi_rademacher_(gpu, torch.tensor([5, 6], device="cuda"), 2**32 - 1, backend="native")
            assert torch.equal(gpu.cpu(), cpu), ("vi_rademacher_", n, dtype)
            for part in (slice(1, None), slice(None, -1)):  # x one element past an aligned allocation, and aligned
                cpu = ops.vi_rademacher_mul(a[part], torch.tensor([5, 6]), 7, backend="native")
                gpu = ops.vi_rademacher_mul(a.cuda()[part], torch.tensor([5, 6], device="cuda"), 7, backend="native")
                assert torch.equal(gpu.cpu(), cpu), ("vi_rademacher_mul", n, dtype)
            gs = torch.randn(n + 2, generator=g, dtype=torch.float64).to(dtype)  # sigma^2 ops, grad in place
            s2_cpu, gr_cpu = ops.vi_sigma_sq(rho, backend="native"), ops.vi_sigma_sq_backward_(gs[1:-1].clone(), rho,
                                                                                           backend="native")
            gr_gpu = gs.cuda()  # grad = elements 1 .. n (unaligned: the scalar path); the two ends untouched
            s2_gpu = ops.vi_sigma_sq_and_backward_(gr_gpu[1:-1], rho.cuda(), backend="native")
            close(s2_gpu, s2_cpu, tol)
            close(gr_gpu[1:-1], gr_cpu, tol)
            ends = gr_gpu[[0, -1]].cpu()
            assert torch.equal(ends, gs[[0, -1]]), ("vi_sigma_sq_and_backward_ wrote outside grad", n, dtype)
            close(ops.vi_sigma_sq(rho.cuda(), backend="native"), s2_cpu, tol)
            gw = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
            pos = torch.tensor([-3, 2**32 + 5])
            cpu = ops.vi_sample_and_backward(a[1:], rho, gw, pos, 9, backend="native")
            gpu = ops.vi_sample_and_backward(a.cuda()[1:], rho.cuda(), gw.cuda(), pos.cuda(), 9, backend="native")
            for c_, g_ in zip(cpu, gpu):
                close(g_, c_, tol)
        m = torch.randn(40, 30, generator=g).to(dtype)
        r = torch.randn(30, 40, generator=g).to(dtype).t()
        cpu = ops.vi_sample(m, r, torch.tensor([1, 1]), 0, backend="native")
        gpu = ops.vi_sample(m.t().contiguous().cuda().t(), r.cuda(), torch.tensor([1, 1], device="cuda"), 0,
                            backend="native")
        close(gpu, cpu, tol)


def vi_kl() -> None:
    """vi_kl and vi_kl_backward: every dtype, odd sizes around the vector step and a 16 K chunk, an
    empty and a 0-dim tensor, mu one element past an aligned allocation (the scalar head), 513
    tensors (two launches); the sums to ~1e-5 (float32 terms in another order), gradients as the
    noisy ops'."""
    g = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        for sizes in ([1, 3, 5, 0, 9, 16_385, 1027], [2] * 512 + [70_001]):
            mus = [torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
            rhos = [(3 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(-80, 80).to(dtype) for n in sizes]
            pv = 0.1 + torch.rand(len(sizes), generator=g, dtype=torch.float64)
            mus_c, mus_g = [m[1:] for m in mus], [m.cuda()[1:] for m in mus]
            rhos_g = [r.cuda() for r in rhos]
            mus_c.append(torch.tensor(0.5, dtype=dtype))
            mus_g.append(torch.tensor(0.5, dtype=dtype, device="cuda"))
            rhos.append(torch.tensor(-80.0, dtype=dtype))
            rhos_g.append(torch.tensor(-80.0, dtype=dtype, device="cuda"))
            pv = torch.cat([pv, torch.tensor([2.0], dtype=torch.float64)])
            cpu = ops.vi_kl(mus_c, rhos, pv, backend="native")
            gpu = ops.vi_kl(mus_g, rhos_g, pv.cuda(), backend="native")
            close(gpu, cpu, 1e-5)
            gr = torch.tensor(0.5, dtype=cpu.dtype)
            c = ops.vi_kl_backward(gr, mus_c, rhos, pv, backend="native")
            d = ops.vi_kl_backward(gr.cuda(), mus_g, rhos_g, pv.cuda(), backend="native")
            for a, b in zip(d[0] + d[1], c[0] + c[1]):
                close(a, b, tol)


def main() -> int:
    assert pyfastbayes.build_info()["cuda"], "a CUDA build of pyfastbayes is needed"
    for check in (random, sgmcmc, swag, calibration, curvature, landscape, kfac, vi, vi_kl):
        check()
        torch.cuda.synchronize()
        print(f"cuda_smoke: {check.__name__} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
