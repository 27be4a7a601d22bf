"""grid under torch.distributed (gloo, 2 processes on CPU): the points are split across the ranks and
the surface gathered, so every rank returns the full result, equal to the single-process one (both
bn modes, with metrics); distributed=False opts out; different arguments, different data or an error
on one rank are reported on every rank instead of hanging."""
import os

import torch
from torch import nn

from _helpers import CountingBatches, spawn_gloo
from pyfastbayes.landscape import grid, random_directions


def _acc(out, y):
    return (out.argmax(-1) == y).float().mean()


def _model():
    torch.manual_seed(1)  # the same weights on every rank
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 6, 6) * 2 + 1)
    return m.eval()


def _data(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, 1, 6, 6, generator=g), torch.randint(0, 3, (k,), generator=g)) for k in (7, 6)]


def _problem():
    model = _model()
    d = random_directions(model, 2, generator=torch.Generator().manual_seed(5))
    # 5 x 3 = 15 points: ranks get 7 and 8, chunks of 3 do not line up with the split
    return model, d, (torch.linspace(-1, 1, 5), torch.linspace(-0.5, 0.5, 3))


def _surface(bn, **kw):
    model, d, coords = _problem()
    kw.setdefault("batch_points", 3)
    res = grid(model, nn.CrossEntropyLoss(), _data(), d, coords, metrics={"acc": _acc}, bn=bn, progress=False, **kw)
    return torch.stack([res.loss, res.metrics["acc"]])


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None




def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {"eval": _surface("eval"), "recompute": _surface("recompute", distributed=True),
               "alone": _surface("eval", distributed=False)}
        model, d, coords = _problem()
        loss_fn = nn.CrossEntropyLoss()
        other = (coords[0] * (1 + rank), coords[1])  # rank 1 passes other offsets
        out["coords"] = _error(lambda: grid(model, loss_fn, _data(), d, other, progress=False))
        out["data"] = _error(lambda: grid(model, loss_fn, _data(3 + rank), d, coords, progress=False))
        empty = [] if rank == 1 else _data()  # rank 1 has no examples: it fails, rank 0 is told
        out["fail"] = _error(lambda: grid(model, loss_fn, empty, d, coords, progress=False))
        # each rank walks the data once per chunk of ITS points: 7 and 8 points in chunks of 4 -> 2
        # walks each (all 15 points would take 4)
        counted = CountingBatches(_data())
        grid(model, loss_fn, counted, d, coords, batch_points=4, first_layer=False, progress=False)
        out["walks"] = counted.walks
        # still in step after the refusals: one more surface
        out["after"] = _surface("eval")
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_points_split_across_ranks_give_the_single_process_surface():
    ranks = spawn_gloo(_worker, 2)
    for bn in ("eval", "recompute"):
        want = _surface(bn)
        for r in ranks:
            torch.testing.assert_close(r[bn], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_surface("recompute"), _surface("recompute", batch_points=7))
    for r in ranks:
        assert r["walks"] == 2
        torch.testing.assert_close(r["alone"], _surface("eval"), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["after"], _surface("eval"), rtol=1e-6, atol=1e-7)
        assert r["coords"] is not None and "rank(s) [1] passed other" in r["coords"]
        assert r["data"] is not None and "the ranks saw different data" in r["data"]
    assert ranks[1]["fail"] is not None and "no examples" in ranks[1]["fail"]
    assert ranks[0]["fail"] is not None and "grid failed on rank(s) [1]" in ranks[0]["fail"]
    # complete: no zero left where the other rank's points are (a cross-entropy is > 0)
    assert (ranks[0]["eval"][0] > 0).all()
