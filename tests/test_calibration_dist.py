"""CalibrationError.sync() under torch.distributed: gloo, 2 processes on the CPU."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import exit_without_teardown
from pyfastbayes import calibration as cal

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(42)
    p = (torch.randn(3, 1000, 5, generator=g, dtype=torch.float64) * 2).softmax(-1)
    y = torch.randint(0, 5, (1000,), generator=g)
    return p, y


def _worker(rank: int, init_file: str, out_file: str) -> None:
    import torch._dynamo  # noqa: F401  (before the group: see tests/test_vi_distributed.py)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        p, y = _data()
        top = cal.CalibrationError(n_bins=15)
        cw = cal.CalibrationError(n_bins=15, classwise=True, num_classes=5)
        empty = cal.CalibrationError(n_bins=15)  # rank 1 contributes nothing
        lo, hi = (0, 700) if rank == 0 else (700, 1000)  # unequal shards
        for m in (top, cw):
            m.update(p[:, lo:hi], y[lo:hi])
        if rank == 0:
            empty.update(p, y)
        local = float(top.compute())
        res = [float(m.sync().compute()) for m in (top, cw, empty)]
        res.append(float(top.sync().compute()))  # idempotent
        res.append(local)
        torch.save(res, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_sync_gloo_two_processes():
    with tempfile.TemporaryDirectory() as d:
        init, out = os.path.join(d, "init"), os.path.join(d, "out")
        mp.spawn(_worker, args=(init, out), nprocs=WORLD, join=True)
        results = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    p, y = _data()
    want = [float(cal.ece(p, y)), float(cal.ece(p, y, classwise=True)), float(cal.ece(p, y))]
    for res in results:
        for got, w in zip(res[:3], want):
            assert abs(got - w) <= 1e-12
        assert abs(res[3] - want[0]) <= 1e-12
    assert results[0][4] != pytest.approx(want[0], abs=1e-6)  # the local value differs: sync mattered
