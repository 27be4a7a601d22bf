"""SWAG under FSDP2 (torch.distributed.fsdp.fully_shard, gloo, 2 and 3 processes on CPU): the
parameters are DTensors placed Shard(0); every rank keeps mean, sq_mean and D for its local shards
only (one contiguous range of the full flat vector per parameter) and draws them with the
sampler's offset, so after the same parameter trajectory:

- mean, sq_mean and D of rank r equal the single-process SWAG's columns of rank r's shards,
- the gathered variance, deviations and state_dict equal the single-process ones,
- sample(n) (all-gathered, full P), sample_() (each rank writes its local shards; compared through
  full_tensor()), predict and predict_mean equal the single-process results with rank 0's seed
  whatever the ranks' own seeds, and predict leaves the parameters as they were,
- log_prob agrees up to rounding (sums over the ranks' columns),

all bit-equal (torch.equal) except log_prob and the predictions (1e-12 in fp64): a column's
moments, deviations and draw are computed per element by the same formula from the same noise
(the Philox stream at its global index, the same z2 on every rank), whatever range of the vector
the op is given; log_prob sums in another order, and the forward passes run on the FSDP-gathered
parameters through other kernels' blockings.

The model's shapes put local shards at offsets of every residue mod 4 in both worlds (world 2:
2015, 3632, 3663, 3681, 3686; world 3: 1209, 2418, 3630, 3633, 3636, 3683), runs of several
parameters' shards that are adjacent in the flat vector (merged into one sampler call), and empty
shards (the 1-row layer: ranks 1.. hold nothing of it). Also: a NaN in one rank's shard
refuses the collect on every rank (state unchanged), state_dict round trip, and the refusals:
shard=True with FSDP2 parameters, a Shard(1) placement, shard_state_dict.
"""
import math
import os

import pytest
import torch
from torch import nn

from _helpers import fully_sharded, spawn_gloo
from pyfastbayes.posteriors import SWAG

COLLECTS = 5  # > max_rank: the ring buffer wraps
MAX_RANK = 3
N = 6


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(403, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _trajectory():
    """COLLECTS lists of full parameter values (the same on every process)."""
    g = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in _model().parameters()]
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return [[b + 0.3 * torch.randn(s, generator=g, dtype=torch.float64) for b, s in zip(base, shapes)]
            for _ in range(COLLECTS)]


def _x():
    return torch.randn(N, 403, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _local_ranges(world, rank):
    """(global start, length) of rank's local shard of each parameter, by torch.chunk's rule (the
    rows ceil-split over the ranks), computed independently of the code under test."""
    out, off = [], 0
    for p in _model().parameters():
        rows, per_row = p.shape[0], math.prod(p.shape[1:])
        c = -(-rows // world)
        r0, r1 = min(rank * c, rows), min((rank + 1) * c, rows)
        out.append((off + r0 * per_row, (r1 - r0) * per_row))
        off += p.numel()
    return out


def _cols(t, ranges):
    return torch.cat([t[..., g:g + n] for g, n in ranges], -1)


def _write_full(model, values):
    """Write full tensors into the model: DTensors get the rows of their local shard."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            if hasattr(p, "to_local"):  # Shard(0): rows ceil-split over the ranks; Replicate: all rows
                local = p.to_local()
                c = -(-v.shape[0] // p.device_mesh.size()) if p.placements[0].is_shard() else 0
                r0 = min(p.device_mesh.get_local_rank() * c, v.shape[0])
                local.copy_(v[r0:r0 + local.shape[0]])
            else:
                p.copy_(v)


def _full_flat(model):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def _reads(swag, model, x, seed):
    """Every public reader, in a fixed order; ``seed`` feeds the global generator (the FSDP ranks
    pass different ones: rank 0's seeds must win)."""
    torch.manual_seed(seed)
    out = {"lowrank": swag.sample(7), "diag": swag.sample(3, cov="diag", scale=0.7)}
    swag.sample_(model)
    out["sample_"] = _full_flat(model)
    before = _full_flat(model)
    out["predict"] = swag.predict(x, n_samples=4, likelihood="regression")
    out["predict_unchanged"] = torch.equal(_full_flat(model), before)
    out["predict_mean"] = swag.predict_mean(x, likelihood="regression")
    swag.load_mean_(model)
    out["load_mean"] = _full_flat(model)
    out["variance"] = swag.variance()
    out["deviations"] = swag.deviations().clone()
    out["full_mean"] = swag.full_mean().clone()
    out["log_prob"] = swag.log_prob(out["lowrank"][:3])
    out["log_prob_diag"] = swag.log_prob(out["diag"], cov="diag", scale=0.7)
    out["state"] = swag.state_dict()
    return out


def _single():
    model = _model()
    swag = SWAG(model, max_rank=MAX_RANK)
    for values in _trajectory():
        _write_full(model, values)
        swag.collect()
    return swag, _reads(swag, model, _x(), 100)


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, mesh = fully_sharded(_model(), world)
        swag = SWAG(model, max_rank=MAX_RANK)
        out = {"fsdp": swag.fsdp, "sharded": swag.sharded, "runs": swag.runs, "local_numel": swag.local_numel}
        for values in _trajectory():
            _write_full(model, values)
            swag.collect()
        out["local"] = {"mean": swag.mean.clone(), "sq_mean": swag.sq_mean.clone(), "D": swag.D.clone()}
        out.update(_reads(swag, model, _x(), 100 + rank))
        # a fresh FSDP SWAG loads the gathered state (cut to its shards) and draws the same
        other = SWAG(model, max_rank=MAX_RANK)
        other.load_state_dict(out["state"])
        torch.manual_seed(7 + rank)
        out["reloaded"] = (torch.equal(other.mean, swag.mean) and torch.equal(other.sq_mean, swag.sq_mean)
                           and torch.equal(other.D, swag.D) and other.n_averaged == swag.n_averaged)
        out["reloaded_draw"] = other.sample(2)
        if world == 2:
            out.update(_refusals(rank, world, model, swag))
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _refusals(rank, world, model, swag):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    # a NaN in rank 1's shard: every rank refuses the collect, nothing changes
    before = (swag.mean.clone(), swag.D.clone(), swag.n_averaged)
    with torch.no_grad():
        if rank == 1:
            next(iter(model.parameters())).to_local()[0, 3] = float("nan")
    try:
        swag.collect()
        out["nan"] = None
    except (ValueError, RuntimeError) as e:
        out["nan"] = f"{type(e).__name__}: {e}"
    out["nan_unchanged"] = (torch.equal(swag.mean, before[0]) and torch.equal(swag.D, before[1])
                            and swag.n_averaged == before[2])
    for key, make in (("shard_true", lambda: SWAG(model, shard=True)),):
        try:
            make()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    try:
        swag.shard_state_dict()
        out["shard_state"] = None
    except RuntimeError as e:
        out["shard_state"] = str(e)
    mesh = init_device_mesh("cpu", (world,))
    cols = nn.Linear(6, 4).double()
    cols.weight = nn.Parameter(distribute_tensor(cols.weight.detach(), mesh, [Shard(1)]))
    cols.bias = nn.Parameter(distribute_tensor(cols.bias.detach(), mesh, [Replicate()]))
    try:
        SWAG(cols)
        out["shard1"] = None
    except ValueError as e:
        out["shard1"] = str(e)
    # Replicate: every rank keeps the whole parameter (offset 0) and draws the single-process draw
    torch.manual_seed(3)
    rep = nn.Linear(5, 3).double()
    plain = nn.Linear(5, 3).double()
    plain.load_state_dict(rep.state_dict())
    for name in ("weight", "bias"):
        setattr(rep, name, nn.Parameter(distribute_tensor(getattr(rep, name).detach(), mesh, [Replicate()])))
    s_rep, s_plain = SWAG(rep, max_rank=2), SWAG(plain, max_rank=2)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        vals = [0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in plain.parameters()]
        _write_full(rep, vals)
        _write_full(plain, vals)
        s_rep.collect()
        s_plain.collect()
    torch.manual_seed(11 + rank)
    got = s_rep.sample(3)
    torch.manual_seed(11)
    out["replicate"] = torch.equal(got, s_plain.sample(3))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_swag_equals_the_single_process_swag(world):
    ranks = spawn_gloo(_worker, world)
    single, want = _single()
    offsets = set()
    for r, out in enumerate(ranks):
        assert out["fsdp"] and out["sharded"]
        ranges = _local_ranges(world, r)
        offsets |= {g % 4 for g, n in ranges if n}
        assert out["local_numel"] == sum(n for _, n in ranges)
        assert [(g, n) for g, _, n in out["runs"]] == _merge(ranges)
        # the local state: exactly the single-process columns of this rank's shards
        assert torch.equal(out["local"]["mean"], _cols(single.mean, ranges)), r
        assert torch.equal(out["local"]["sq_mean"], _cols(single.sq_mean, ranges)), r
        assert torch.equal(out["local"]["D"], _cols(single.D, ranges)), r
        for key in ("lowrank", "diag", "sample_", "load_mean", "variance", "deviations", "full_mean"):
            assert torch.equal(out[key], want[key]), (r, key)
        assert out["predict_unchanged"], r
        for key in ("predict", "predict_mean"):
            for got, exp in zip(out[key], want[key]):
                torch.testing.assert_close(got, exp, rtol=0, atol=1e-12, msg=lambda m: f"rank {r} {key}: {m}")
        for key in ("log_prob", "log_prob_diag"):
            torch.testing.assert_close(out[key], want[key], rtol=1e-12, atol=1e-9)
        for key, value in want["state"].items():
            got = out["state"][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, (r, key)
        assert out["reloaded"], r
        assert torch.equal(out["reloaded_draw"], ranks[0]["reloaded_draw"])
    assert any(out["local_numel"] < sum(p.numel() for p in _model().parameters()) for out in ranks)
    # the layout the test is about: shards at offsets of every residue mod 4, and empty shards
    assert offsets == {0, 1, 2, 3}, offsets
    assert any(n == 0 for r in range(world) for _, n in _local_ranges(world, r))
    if world == 2:
        _check_refusals(ranks)


def _merge(ranges):
    """Adjacent (start, length) ranges joined (the runs of the local state); empty ones dropped."""
    out = []
    for g, n in ranges:
        if n and out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((g, n))
    return out


def _check_refusals(ranks):
    assert ranks[1]["nan"].startswith("ValueError") and "'0.weight'" in ranks[1]["nan"], ranks[1]["nan"]
    assert ranks[0]["nan"].startswith("RuntimeError") and "another rank" in ranks[0]["nan"], ranks[0]["nan"]
    for out in ranks:
        assert out["nan_unchanged"]
        assert "shard=True" in out["shard_true"] and "FSDP2" in out["shard_true"], out["shard_true"]
        assert "Shard(0)" in out["shard1"], out["shard1"]
        assert "'weight'" in out["shard1"] and "Shard(dim=1)" in out["shard1"], out["shard1"]
        assert "state_dict()" in out["shard_state"]
        assert out["replicate"]
