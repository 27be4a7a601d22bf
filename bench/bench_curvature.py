"""Curvature: 32 Hessian-vector products on an MLP and a small CNN, side by side with what a user
would otherwise run; GGN products; trace (100 probes) and the top-10 eigenvalues.

Baselines, written here from their published recipes (not imported, except curvlinops):
a loop of double-backward ``torch.autograd.grad`` (one vector at a time, as PyHessian does),
``torch.func.vmap`` over ``jvp(grad)`` (forward-over-reverse, all 32 at once), curvlinops'
``HessianLinearOperator`` / ``GGNLinearOperator`` (``pip install curvlinops-for-pytorch``), and
PyHessian-style trace (Hutchinson, one probe at a time) and top-k eigenvalues (power iteration
with deflation). Sizes: MLP 784-1024-1024-10, batch 1024 on CUDA; 784-256-256-10, batch 256 on
the CPU (2 cores); ``--quick`` smaller. ``peak_MB`` (CUDA) is the peak memory of the k = 32 block
over that of one gradient (``peak_x_grad``).
"""
from __future__ import annotations

import torch
from torch import nn

from bench.common import bench, peak_mb, row

SUITE = "curvature"
K = 32


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def _data(n: int, device: str):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _loop_hvp(model, loss_fn, x, y, V):
    """PyHessian / double backward: the graph of the gradient kept, one vector at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    out = []
    for j in range(V.shape[1]):
        vs = torch.split(V[:, j], [p.numel() for p in params])
        hv = torch.autograd.grad(grads, params, grad_outputs=[v.view_as(p) for v, p in zip(vs, params)],
                                 retain_graph=j < V.shape[1] - 1)
        out.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(out, 1)


def _vmap_hvp(model, loss_fn, x, y, V):
    """torch.func: vmap over the k vectors of jvp(grad(loss)) (forward-over-reverse)."""
    from torch.func import functional_call, grad, jvp, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in params.values()]

    def loss(ps):
        return loss_fn(functional_call(model, ps, (x,)), y)

    def hvp(v):
        tangent = {n: t.view_as(params[n]) for n, t in zip(names, torch.split(v, sizes))}
        return torch.cat([t.reshape(-1) for t in jvp(grad(loss), (params,), (tangent,))[1].values()])

    return vmap(hvp, in_dims=1, out_dims=1)(V)


def _pyhessian_trace(model, loss_fn, x, y, n_probes: int, gen):
    P = sum(p.numel() for p in model.parameters())
    total = 0.0
    for _ in range(n_probes):
        z = torch.randint(0, 2, (P, 1), generator=gen).to(x.device, torch.float32).mul_(2).sub_(1)
        total += float((z * _loop_hvp(model, loss_fn, x, y, z)).sum())
    return total / n_probes


def _pyhessian_top(model, loss_fn, x, y, k: int, n_iter: int, gen):
    """Power iteration with deflation against the eigenvectors found so far (PyHessian's eigenvalues)."""
    P = sum(p.numel() for p in model.parameters())
    vals, vecs = [], []
    for _ in range(k):
        v = torch.randn(P, 1, generator=gen).to(x.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(n_iter):
            for u in vecs:
                v -= (u.T @ v) * u
            hv = _loop_hvp(model, loss_fn, x, y, v)
            lam = float((v * hv).sum())
            v = hv / hv.norm()
        vals.append(lam)
        vecs.append(v)
    return vals


def run(device: str, quick: bool) -> list[dict]:
    from pyfastbayes.curvature import eigenvalues, ggn, hessian, trace

    width, n = {("cuda", False): (1024, 1024), ("cuda", True): (256, 256), ("cpu", False): (256, 256),
                ("cpu", True): (64, 64)}[(device, quick)]
    rep = dict(warmup=1, repeat=3) if quick or device == "cpu" else dict(warmup=2, repeat=7)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(n, device)
    rows = []
    try:
        import curvlinops
    except ImportError:
        curvlinops = None
        print("# bench_curvature: curvlinops cannot be imported; its rows are left out "
              "(bash scripts/setup.sh installs it)")
    for name, model in ((f"MLP 784-{width}-{width}-10, batch {n}", _mlp(width)), (f"CNN, batch {n}", _cnn())):
        torch.manual_seed(0)
        model = model.to(device)
        params = [p for p in model.parameters()]
        P = sum(p.numel() for p in params)
        V = torch.randn(P, K, generator=torch.Generator().manual_seed(1)).to(device)
        case = f"{K} products, {name} (P = {P})"
        H = hessian(model, loss_fn, (x, y))
        G = ggn(model, loss_fn, (x, y))
        t_loop = bench(lambda: _loop_hvp(model, loss_fn, x, y, V), device, **rep)
        t_vmap = bench(lambda: _vmap_hvp(model, loss_fn, x, y, V), device, **rep)
        t_h = bench(lambda: H @ V, device, **rep)
        t_g = bench(lambda: G @ V, device, **rep)
        grad_mb = peak_mb(lambda: torch.autograd.grad(loss_fn(model(x), y), params), device)
        peak = peak_mb(lambda: H @ V, device)
        extra = dict(peak_MB=round(peak, 1), peak_x_grad=round(peak / grad_mb, 2)) if grad_mb else {}
        rows.append(row(SUITE, case, "double-backward loop (PyHessian-style)", t_loop, t_loop))
        rows.append(row(SUITE, case, "torch.func vmap(jvp(grad))", t_vmap, t_loop))
        if curvlinops is not None:
            ch = curvlinops.HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
            cg = curvlinops.GGNLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
            t_ch = bench(lambda: ch @ V, device, **rep)
            t_cg = bench(lambda: cg @ V, device, **rep)
            rows.append(row(SUITE, case, "curvlinops Hessian @ V", t_ch, t_loop))
            rows.append(row(SUITE, case, "curvlinops GGN @ V", t_cg, t_loop))
        rows.append(row(SUITE, case, "pyfastbayes hessian @ V", t_h, t_loop, vs_vmap=round(t_vmap / t_h, 2), **extra))
        rows.append(row(SUITE, case, "pyfastbayes ggn @ V", t_g, t_loop, vs_vmap=round(t_vmap / t_g, 2),
                        ggn_vs_hessian=round(t_h / t_g, 2)))
        if name.startswith("MLP"):
            n_probes, n_iter = (20, 5) if quick or device == "cpu" else (100, 20)
            gen = torch.Generator().manual_seed(2)
            t_tr_ref = bench(lambda: _pyhessian_trace(model, loss_fn, x, y, n_probes, gen), device, warmup=0, repeat=1)
            t_tr = bench(lambda: trace(H, n_probes=n_probes, generator=torch.Generator().manual_seed(2)), device,
                         warmup=0, repeat=1)
            rows.append(row(SUITE, f"trace, {n_probes} probes, {name}", "PyHessian-style loop", t_tr_ref, t_tr_ref))
            rows.append(row(SUITE, f"trace, {n_probes} probes, {name}", "pyfastbayes trace (blocks of 32)", t_tr,
                            t_tr_ref))
            k = 10 if not quick else 3
            t_ev_ref = bench(lambda: _pyhessian_top(model, loss_fn, x, y, k, n_iter, gen), device, warmup=0, repeat=1)
            t_ev = bench(lambda: eigenvalues(H, k=k, method="block_lanczos", generator=torch.Generator().manual_seed(3)),
                         device, warmup=0, repeat=1)
            rows.append(row(SUITE, f"top-{k} eigenvalues, {name}", f"PyHessian-style power iteration ({n_iter} it.)",
                            t_ev_ref, t_ev_ref))
            rows.append(row(SUITE, f"top-{k} eigenvalues, {name}", "pyfastbayes block Lanczos", t_ev, t_ev_ref))
    return rows
