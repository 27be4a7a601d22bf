"""SWA / SWAG: fused collect and batched sampling vs the eager code a user would otherwise run.

Baselines, written plainly here (not imported): the swa_gaussian-style eager SWAG (per-parameter
moment updates, ``torch.cat`` of the new deviation onto D, one draw at a time), an eager batched
sampler (all S draws as two big tensor expressions), and ``torch.optim.swa_utils.AveragedModel``
for the running mean. Sizes: P = 2^25 on CUDA, 2^22 on CPU (2^18 with --quick), K = 20, S = 32.
On CUDA, ``of_floor`` is the time of a device-to-device copy of the bytes the op must move (measured
in the same run) over the measured time.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bench.common import bench, copy_floor_ms, peak_mb, row

import pyfastbayes
from pyfastbayes.posteriors import SWA, SWAG

SUITE = "swag"
K, S = 20, 32


class _Flat(nn.Module):
    """A 'model' whose trainable parameters are many tensors of mixed sizes totalling P."""

    def __init__(self, P: int, device: str):
        super().__init__()
        sizes, left, i = [], P, 0
        while left:
            n = min(left, max(1024, P // (2 ** (1 + i % 6))))  # big and small tensors interleaved
            sizes.append(n)
            left -= n
            i += 1
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(n, device=device)) for n in sizes])


def _eager_collect(state, params, n):
    """swa_gaussian-style: per-parameter mean / sq_mean, deviation appended with torch.cat."""
    for i, p in enumerate(params):
        m, sq = state["mean"][i], state["sq"][i]
        m.mul_(n / (n + 1)).add_(p / (n + 1))
        sq.mul_(n / (n + 1)).add_(p * p / (n + 1))
        dev = (p - m).reshape(1, -1)
        D = torch.cat([state["D"][i], dev], 0)
        state["D"][i] = D[1:] if D.shape[0] > K else D


def _eager_sample_one(mean, sq, D, scale):
    """One draw as swa_gaussian: theta = mean + sqrt(scale) (sigma z1 + D^T z2 / sqrt(K - 1)), i.e.
    covariance scale (diag(sigma^2) + D^T D / (K - 1)), the convention of SWAG.sample."""
    var = torch.clamp(sq - mean * mean, min=1e-30)
    z1 = torch.randn_like(mean)
    z2 = torch.randn(D.shape[0], device=mean.device, dtype=mean.dtype)
    low = D.t().matmul(z2) / math.sqrt(D.shape[0] - 1)
    return mean + math.sqrt(scale) * (var.sqrt() * z1 + low)


def _eager_sample_batched(mean, sq, D, scale, n):
    """All n draws of :func:`_eager_sample_one` as two big tensor expressions."""
    var = torch.clamp(sq - mean * mean, min=1e-30)
    z1 = torch.randn(n, mean.numel(), device=mean.device, dtype=mean.dtype)
    z2 = torch.randn(n, D.shape[0], device=mean.device, dtype=mean.dtype)
    return mean + math.sqrt(scale) * (var.sqrt() * z1 + (z2 @ D) / math.sqrt(D.shape[0] - 1))


def run(device: str, quick: bool) -> list[dict]:
    """The suite's rows (see the module docstring for sizes and baselines)."""
    P = 2**18 if quick else (2**25 if device == "cuda" else 2**22)
    rep = dict(warmup=1, repeat=3) if quick else (dict(warmup=3, repeat=10) if device == "cuda"
                                                 else dict(warmup=1, repeat=5))
    torch.manual_seed(0)
    model = _Flat(P, device)
    params = [p.detach() for p in model.parameters()]
    case = f"P=2^{int(math.log2(P))} ({len(params)} tensors), K={K}"
    return _collect_rows(model, params, case, device, rep) + _sample_rows(model, params, case, device, rep)


def _mb(fn, device: str) -> float | str:
    """peak_mb rounded to 0.1 MiB for the table."""
    mb = peak_mb(fn, device)
    return round(mb, 1) if mb != "" else mb


def _collect_rows(model, params, case, device, rep) -> list[dict]:
    """SWAG.collect (its non-finite check included) vs the eager swa_gaussian-style update, SWA.collect
    vs AveragedModel."""
    P, rows = sum(p.numel() for p in params), []
    eager = {"mean": [torch.zeros_like(p) for p in params], "sq": [torch.zeros_like(p) for p in params],
             "D": [torch.zeros(0, p.numel(), device=device) for p in params]}
    for n in range(K):  # fill the ring so that every timed call pays the steady-state cat + drop
        _eager_collect(eager, params, n)
    cnt = [K]

    def eager_step():
        """One eager collect at the steady state (the ring already full)."""
        _eager_collect(eager, params, cnt[0])
        cnt[0] += 1

    t_eager = bench(eager_step, device, **rep)
    rows.append(row(SUITE, "collect " + case, "eager swa_gaussian-style (cat)", t_eager, t_eager))
    del eager
    for dt, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        swag = SWAG(model, max_rank=K, deviation_dtype=dt)
        t = bench(swag.collect, device, **rep)
        floor = copy_floor_ms((3 * 4 + 2 * 4 + nbytes) * P, device)  # read theta, mean, sq; write mean, sq, row
        rows.append(row(SUITE, "collect " + case, f"pyfastbayes SWAG.collect (D {str(dt)[6:]})", t, t_eager, floor,
                        D_MB=round(swag.D.numel() * nbytes / 2**20, 1)))
        t_op = bench(lambda: pyfastbayes.ops.swag_collect_(params, swag.mean, swag.sq_mean, swag.D[1], K), device,
                     **rep)
        rows.append(row(SUITE, "collect " + case, f"pyfastbayes op swag_collect_ (kernel alone, D {str(dt)[6:]})",
                        t_op, t_eager, floor))
        del swag
    avg = torch.optim.swa_utils.AveragedModel(model)
    avg.update_parameters(model)
    t_avg = bench(lambda: avg.update_parameters(model), device, **rep)
    rows.append(row(SUITE, "SWA update " + case, "torch AveragedModel.update_parameters", t_avg, t_avg))
    del avg
    swa = SWA(model)
    t = bench(swa.collect, device, **rep)
    rows.append(row(SUITE, "SWA update " + case, "pyfastbayes SWA.collect", t, t_avg, copy_floor_ms(3 * 4 * P, device)))
    del swa
    return rows


def _sample_rows(model, params, case, device, rep) -> list[dict]:
    """S = 32 draws: SWAG.sample vs 32 eager single draws and an eager batched sampler."""
    P, rows = sum(p.numel() for p in params), []
    for dt, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        swag = SWAG(model, max_rank=K, deviation_dtype=dt)
        with torch.no_grad():
            for _ in range(K):
                for p in params:
                    p.add_(0.01 * torch.randn_like(p))
                swag.collect()
        mean, sq, D = swag.mean, swag.sq_mean, swag.deviations()
        scase = f"sample S={S} " + case
        floor = copy_floor_ms((K * nbytes + 8 + 4 * S) * P, device)  # read D, mean, sq; write S draws
        if dt == torch.float32:
            Df = D
            t_one = bench(lambda: [_eager_sample_one(mean, sq, Df, 0.5) for _ in range(S)], device,
                          **dict(rep, repeat=min(rep["repeat"], 3)))
            rows.append(row(SUITE, scase, f"eager, {S} single draws", t_one, t_one,
                            peak_MB=_mb(lambda: [_eager_sample_one(mean, sq, Df, 0.5) for _ in range(S)],
                                             device)))
            t_bat = bench(lambda: _eager_sample_batched(mean, sq, Df, 0.5, S), device, **rep)
            rows.append(row(SUITE, scase, "eager, batched", t_bat, t_one,
                            peak_MB=_mb(lambda: _eager_sample_batched(mean, sq, Df, 0.5, S), device)))
        t_op = bench(lambda: pyfastbayes.ops.swag_sample(mean, sq, D, S, 0.5, 1e-30, 7), device, **rep)
        rows.append(row(SUITE, scase, f"pyfastbayes op swag_sample (kernel alone, D {str(dt)[6:]})", t_op, t_one,
                        floor, vs_batched=round(t_bat / t_op, 2)))
        t = bench(lambda: swag.sample(S), device, **rep)
        rows.append(row(SUITE, scase, f"pyfastbayes SWAG.sample (D {str(dt)[6:]})", t, t_one, floor,
                        vs_batched=round(t_bat / t, 2), peak_MB=_mb(lambda: swag.sample(S), device),
                        D_MB=round(D.numel() * nbytes / 2**20, 1)))
        del swag, D
    return rows
