"""Calibration: ECE (15 uniform bins, l1) of 1M x 10, 1M x 1000 and S = 30 draws of 100k x 10.

Ours (pyfastbayes.calibration.ece: one native pass, argument and value checks included) next to
torchmetrics' MulticlassCalibrationError (update + compute; needs the S-mean materialised) and a
hand-written torch version (max, bucketize, bincount). ``speedup`` is torchmetrics' time over the
row's; ``vs_torch`` is the hand-written version's time over ours; ``state_bytes`` is what the
streaming metric keeps (ours: O(bins); torchmetrics: O(N) lists). On CUDA ``of_floor`` is the
time of one read of the input (``probs.amax()``, same run) over ours.
"""
from __future__ import annotations

import torch

from bench.common import bench, row
from pyfastbayes import calibration as cal
from pyfastbayes import ops

SUITE = "calibration"
N_BINS = 15


def torch_ece(p: torch.Tensor, y: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """What a user would write: top-label confidence, equal-width bins, bincount sums."""
    if p.dim() == 3:
        p = p.mean(0)
    conf, pred = p.max(-1)
    hit = (pred == y).to(conf.dtype)
    b = (conf * n_bins).long().clamp_(0, n_bins - 1)
    gap = torch.bincount(b, weights=conf, minlength=n_bins) - torch.bincount(b, weights=hit, minlength=n_bins)
    return gap.abs().sum() / conf.numel()


def _data(S: int, N: int, C: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (S, N, C) if S > 1 else (N, C)
    p = torch.rand(shape, generator=g, device=device)
    p.pow_(4)  # spread the confidences over more bins
    p.div_(p.sum(-1, keepdim=True))
    y = torch.randint(0, C, (N,), generator=g, device=device)
    return p, y


def run(device: str, quick: bool) -> list[dict]:
    try:
        from torchmetrics.classification import MulticlassCalibrationError
    except ImportError:  # pragma: no cover - the peer is a test extra
        MulticlassCalibrationError = None
    scale = 10 if quick else 1
    cases = [("1M x 10", 1, 1_000_000 // scale, 10), ("1M x 1000", 1, 1_000_000 // scale, 1000),
             ("S=30 x 100k x 10", 30, 100_000 // scale, 10)]
    rows = []
    for case, S, N, C in cases:
        p, y = _data(S, N, C, device)
        big = p.numel() > 50_000_000
        kw = dict(device=device, warmup=1, repeat=5) if big or quick else dict(device=device)
        name = case if not quick else f"{case} /{scale}"
        ours_ms = bench(lambda: cal.ece(p, y, n_bins=N_BINS), **kw)
        hand_ms = bench(lambda: torch_ece(p, y), **kw)
        ref_ms = None
        tm_state = None
        if MulticlassCalibrationError is not None:
            metric = MulticlassCalibrationError(num_classes=C, n_bins=N_BINS).to(device)

            def tm():
                metric.reset()
                metric.update(p.mean(0) if S > 1 else p, y)
                return metric.compute()

            ref_ms = bench(tm, **kw)
            tm()
            tm_state = sum(t.numel() * t.element_size() for t in metric.confidences + metric.accuracies)
            # the three agree (to float32 rounding of torchmetrics' sums)
            assert abs(float(tm()) - float(cal.ece(p, y))) < 1e-4
        floor_ms = bench(lambda: p.amax(), **kw) if device == "cuda" else None
        p3 = p if p.dim() == 3 else p.unsqueeze(0)
        op_ms = bench(lambda: ops.calibration_bins(p3, y, N_BINS, backend="native"), **kw)
        rows.append(row(SUITE, name, "pyfastbayes op calibration_bins (kernel alone)", op_ms, ref_ms, floor_ms))
        ours_state = N_BINS * 3 * 8
        rows.append(row(SUITE, name, "pyfastbayes", ours_ms, ref_ms, floor_ms, vs_torch=round(hand_ms / ours_ms, 2),
                        state_bytes=ours_state))
        if ref_ms is not None:
            rows.append(row(SUITE, name, "torchmetrics", ref_ms, ref_ms, state_bytes=tm_state))
        rows.append(row(SUITE, name, "torch (hand-written)", hand_ms, ref_ms))
        del p, y
    return rows
