"""SGLD step over a model-like list of ~300 tensors: ours vs what a user would otherwise run.

Baselines in the same run: a per-tensor eager loop, torch._foreach_*, torch.compile of the
loop, and posteriors' SGLD (``pip install posteriors``); and one flat fp32 tensor (134 M on CUDA) vs
the eager ops and ``_foreach``. On CUDA ``of_floor`` is the time of a device-to-device copy of the same
bytes (SGLD moves 12 bytes per fp32 element: read theta and g, write theta) over ours.
``torch.compile`` of the loop is left out when PFB_BENCH_COMPILE=0 (its compile time on 300 tensors
would eat the GPU machine's budget; bench/gpu_check.sh sets it).
A full run refuses to start when a peer cannot be imported (a table that silently lacks a row
misleads); ``--quick`` leaves the row out and prints why.
"""
from __future__ import annotations

import importlib
import math
import os
import time

import torch

from bench.common import bench, copy_floor_ms, row

LR, NUM_DATA, TEMP = 1e-6, 50_000, 1.0
# how to install each peer: requirements-peers.txt pins it with the dependencies it imports (graphviz, ...)
PEERS = {"posteriors": "bash scripts/setup.sh, or pip install --no-deps -r requirements-peers.txt"}


def import_peer(name: str, quick: bool):
    """The peer library ``name``, imported. When it cannot be imported: a full run raises
    RuntimeError with the import error and the fix; a quick run prints both and returns None."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure (missing module, broken dependency)
        why = f"{name} cannot be imported ({type(exc).__name__}: {exc}); fix: {PEERS[name]}"
        if not quick:
            raise RuntimeError(f"bench_sgmcmc: {why}. A full run compares against every peer; "
                               f"run with --quick to leave its row out") from exc
        print(f"# bench_sgmcmc --quick: the {name} row is left out: {why}")
        return None


def model_like(total: int, device: str, n_layers: int = 150, seed: int = 0):
    """~2 * n_layers tensors: square-ish weights of jittered odd sizes plus their biases."""
    g = torch.Generator().manual_seed(seed)
    side = math.sqrt(total / n_layers)
    shapes = []
    for _ in range(n_layers):
        r = int(side * (0.75 + 0.5 * torch.rand((), generator=g).item())) | 1
        shapes += [(r, r), (r,)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    return params, grads


def eager_step(ps, gs):
    for p, g in zip(ps, gs):
        p.add_(g, alpha=-LR * NUM_DATA / 2)
        p.add_(torch.randn_like(p), alpha=math.sqrt(LR * TEMP))


def foreach_step(ps, gs):
    torch._foreach_add_(ps, gs, alpha=-LR * NUM_DATA / 2)
    torch._foreach_add_(ps, [torch.randn_like(p) for p in ps], alpha=math.sqrt(LR * TEMP))


def raw_step(ps, gs):
    """The native op alone (no optimizer bookkeeping): what the kernel costs."""
    from pyfastbayes import ops

    dev = ps[0].device
    hyper = torch.zeros(ops.HYPER.size, dtype=torch.float64, device=dev)
    hyper[ops.HYPER.lr], hyper[ops.HYPER.num_data], hyper[ops.HYPER.temperature] = LR, NUM_DATA, TEMP
    rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
    return lambda: ops.sgld_step_(ps, gs, hyper, rng, backend="native")


def posteriors_runner(posteriors, ps, gs):
    """posteriors.sgmcmc.sgld.update, in place, on a log-posterior whose gradient is gs."""
    state = posteriors.sgmcmc.sgld.init({str(i): p for i, p in enumerate(ps)})

    scaled = {str(i): -NUM_DATA * g for i, g in enumerate(gs)}

    def log_post(params, batch):
        # linear in the parameters, so its gradient is -NUM_DATA * g: the drift of our SGLD
        return sum((p * scaled[k]).sum() for k, p in params.items()), torch.tensor([])

    def step():
        # posteriors' rule: theta + lr' grad log p + sqrt(2 lr' T) xi, i.e. lr' = LR / 2 matches ours
        posteriors.sgmcmc.sgld.update(state, None, log_post, lr=LR / 2, temperature=TEMP, inplace=True)

    return step


def run(device: str, quick: bool) -> list[dict]:
    from pyfastbayes.optim import SGLD

    posteriors = import_peer("posteriors", quick)  # before any timing: a full run fails fast
    total = {("cpu", False): 10_000_000, ("cpu", True): 1_000_000,
             ("cuda", False): 150_000_000, ("cuda", True): 16_000_000}[(device, quick)]
    ps, gs = model_like(total, device)
    n = sum(p.numel() for p in ps)
    case = f"SGLD {len(ps)} tensors, {n / 1e6:.1f} M fp32"
    rows, repeat = [], 3 if quick else 7
    timed = {}
    timed["eager loop"] = bench(lambda: eager_step(ps, gs), device, repeat=repeat)
    timed["torch._foreach"] = bench(lambda: foreach_step(ps, gs), device, repeat=repeat)
    compile_s = None
    if os.environ.get("PFB_BENCH_COMPILE", "1") != "0":
        t0 = time.perf_counter()
        compiled = torch.compile(eager_step, fullgraph=False)
        compiled(ps, gs)
        compile_s = time.perf_counter() - t0
        timed["torch.compile"] = bench(lambda: compiled(ps, gs), device, repeat=repeat)
    if posteriors is not None:
        timed["posteriors sgld"] = bench(posteriors_runner(posteriors, ps, gs), device, repeat=repeat)
    for mode in ("ignore", "raise"):
        params = [torch.nn.Parameter(p) for p in ps]
        for p, g in zip(params, gs):
            p.grad = g
        opt = SGLD(params, lr=LR, num_data=NUM_DATA, temperature=TEMP, nonfinite=mode)
        timed[f"pyfastbayes SGLD (nonfinite={mode})"] = bench(opt.step, device, repeat=repeat)
    timed["pyfastbayes op sgld_step_ (kernel alone)"] = bench(raw_step(ps, gs), device, repeat=repeat)
    floor = copy_floor_ms(12 * n, device)
    ref = timed["eager loop"]
    for impl, ms in timed.items():
        extra = {"vs_foreach": round(timed["torch._foreach"] / ms, 2)}
        if impl == "torch.compile":
            extra["note"] = f"compile {compile_s:.1f} s"
        rows.append(row("sgmcmc", case, impl, ms, ref_ms=ref, floor_ms=floor, **extra))
    del ps, gs
    return rows + flat_rows(device, quick)


def flat_rows(device: str, quick: bool) -> list[dict]:
    """One flat fp32 tensor: the kernel alone against the copy floor (no per-tensor overhead)."""
    from pyfastbayes.optim import SGLD

    n = {("cpu", False): 1 << 24, ("cpu", True): 1 << 20, ("cuda", False): 1 << 27,
         ("cuda", True): 1 << 24}[(device, quick)]
    p, g = torch.randn(n, device=device), torch.randn(n, device=device)
    case, repeat = f"SGLD 1 flat tensor, {n / 1e6:.0f} M fp32", 3 if quick else 10
    timed = {"eager loop": bench(lambda: eager_step([p], [g]), device, repeat=repeat),
             "torch._foreach": bench(lambda: foreach_step([p], [g]), device, repeat=repeat)}
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = SGLD([param], lr=LR, num_data=NUM_DATA, temperature=TEMP, nonfinite="ignore")
    timed["pyfastbayes SGLD (nonfinite=ignore)"] = bench(opt.step, device, repeat=repeat)
    timed["pyfastbayes op sgld_step_ (kernel alone)"] = bench(raw_step([p], [g]), device, repeat=repeat)
    floor = copy_floor_ms(12 * n, device)
    return [row("sgmcmc", case, impl, ms, ref_ms=timed["eager loop"], floor_ms=floor,
                vs_foreach=round(timed["torch._foreach"] / ms, 2)) for impl, ms in timed.items()]
