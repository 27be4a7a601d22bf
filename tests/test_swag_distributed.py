"""SWAG(shard=True) under torch.distributed (gloo, 2 and 3 processes on CPU; the CUDA variant puts
2 processes on one GPU, gloo moving the shards through host memory, and adds D kept in pinned host
memory).

Rank r keeps the columns shard_columns(P, R)[r] of mean, sq_mean and D; after the same collects
every rank's draws (sample, sample_, predict) must equal the single-process SWAG's with rank 0's
seed exactly (torch.equal), whatever the ranks' own seeds; the gathered moments, deviations and
state_dict equal the single-process ones; log_prob agrees up to rounding (sums over shards). Errors
(a rank built otherwise, a shard loaded on the wrong rank or world, refused collects) are raised on
every rank, none left waiting in a collective.
"""
import copy
import functools
import os

import pytest
import torch
from torch import nn

from _helpers import needs_cuda, spawn_gloo
from pyfastbayes.posteriors import SWAG
from pyfastbayes.posteriors._sharding import SHARD_ALIGN, shard_columns

P = 30 * 40 + 40 + 40 * 7 + 7  # 1527: not a multiple of 4, six 256-column blocks
RANGES = {2: [(0, 768), (768, 1527)], 3: [(0, 512), (512, 1024), (1024, 1527)]}
CONFIGS = {  # name -> SWAG keyword arguments (the model is float32)
    "f32": dict(max_rank=4),
    "bf16_D_f64": dict(max_rank=3, deviation_dtype=torch.bfloat16, dtype=torch.float64),
}
# CUDA only: D in pinned host memory, streamed back in column blocks (offset a_r + c0)
CUDA_CONFIGS = {**CONFIGS, "D_on_host": dict(max_rank=4, store_device="cpu")}
COLLECTS = 6  # > max_rank: the ring buffer wraps


def _model(device="cpu"):
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts them too)
    return nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 7)).to(device)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def _collect(model, swag, steps=COLLECTS):
    """A deterministic 'training' trajectory: the same parameters on every rank at every collect."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
            swag.collect()


def _run(swag, model, x):
    """Every public reader of a SWAG, in a fixed order (the global generator feeds the draws)."""
    out = {"lowrank": swag.sample(5), "diag": swag.sample(3, cov="diag", scale=0.7)}
    m = copy.deepcopy(model)
    swag.sample_(m)
    out["sample_"] = _flat(m)
    out["predict"] = swag.predict(x, n_samples=3)
    out["mean"] = swag.full_mean().clone()
    out["variance"] = swag.variance()
    out["deviations"] = swag.deviations().clone()
    out["state"] = swag.state_dict()
    out["log_prob"] = swag.log_prob(out["lowrank"])
    m = copy.deepcopy(model)
    swag.load_mean_(m)
    out["load_mean"] = _flat(m)
    out["predict_mean"] = swag.predict_mean(x)
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in out.items()}


def _inputs():
    return torch.randn(8, 30, generator=torch.Generator().manual_seed(2))


def _sharded(rank, device, config, group=None, seed_base=100):
    """The sharded run of one config on this rank: its outputs, its shard shapes and columns, and
    the draws (seed 7) of two fresh sharded SWAGs restored from the shard and the full state."""
    model = _model(device)
    kw = CUDA_CONFIGS[config]
    swag = SWAG(model, shard=True, process_group=group, **kw)
    _collect(model, swag)
    torch.manual_seed(seed_base + rank)  # the ranks' own seeds differ: the draws use rank 0's
    out = _run(swag, model, _inputs().to(device))
    out["columns"] = swag.columns
    out["shapes"] = (tuple(swag.mean.shape), tuple(swag.sq_mean.shape), tuple(swag.D.shape))
    shard, full = swag.shard_state_dict(), out["state"]
    for name, state in (("from_shard", shard), ("from_full", full)):
        fresh = SWAG(model, shard=True, process_group=group, **kw)
        fresh.load_state_dict(state)
        torch.manual_seed(7 + rank)
        out[name] = fresh.sample(4).cpu()
    out["shard_state"] = shard
    return out


def _single(device, config, seed=100):
    model = _model(device)
    swag = SWAG(model, **CUDA_CONFIGS[config])
    _collect(model, swag)
    torch.manual_seed(seed)
    out = _run(swag, model, _inputs().to(device))
    torch.manual_seed(7)
    out["again"] = swag.sample(4).cpu()
    return out


def _error(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _refusals(rank, world):
    """Collects that must be refused on every rank at once (state unchanged everywhere)."""
    out = {}
    for name, kw, poison in (
            ("fp16_range", dict(max_rank=3, deviation_dtype=torch.float16), "big"),  # the last rank's columns
            ("fp16_nan", dict(max_rank=3, deviation_dtype=torch.float16), "nan"),    # NaN at column 0 (rank 0)
            ("nan", dict(max_rank=3), "nan"),
            ("one_replica", dict(max_rank=3), "nan_rank1")):                        # replicas differ
        model = _model()
        swag = SWAG(model, shard=True, **kw)
        _collect(model, swag, steps=2)
        before = (swag.n_averaged, swag.mean.clone(), swag.D.clone())
        with torch.no_grad():
            if poison == "big":
                model[2].bias[-1] += 1e5
            elif poison == "nan" or rank == 1:
                model[0].weight[0, 0] = float("nan")
        out[name] = _error(swag.collect)
        assert swag.n_averaged == before[0] and torch.equal(swag.mean, before[1]) and torch.equal(swag.D, before[2])
    return out


def _worker(rank, world, port, out_dir, device="cpu", errors=False):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {c: _sharded(rank, device, c) for c in (CUDA_CONFIGS if device == "cuda" else CONFIGS)}
        out["auto"] = SWAG(_model(device), shard=None).sharded
        if errors:
            out.update(_refusals(rank, world))
            # one rank builds another SWAG: every rank refuses, none waits in a collective
            out["mismatch"] = _error(lambda: SWAG(_model(), max_rank=5 if rank == 1 else 4, shard=True))
            # a shard on another rank, and a shard of another world (the group of ranks 1 and 2)
            states = [None] * world
            dist.all_gather_object(states, out["f32"]["shard_state"])
            target = SWAG(_model(), shard=True, **CONFIGS["f32"])
            out["wrong_rank"] = _error(lambda: target.load_state_dict(states[(rank + 1) % world]))
            pair = dist.new_group([1, 2])  # every rank takes part in creating it
            if rank in (1, 2):
                out["pair"] = _sharded(rank, device, "f32", group=pair, seed_base=200)
                out["wrong_world"] = _error(lambda: target.load_state_dict(out["pair"]["shard_state"]))
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _check_equal_to_single(ranks, device, world, config):
    want = _single(device, config)
    for r, got in enumerate(ranks):
        got = got[config]
        for name in ("lowrank", "diag", "sample_", "mean", "variance", "deviations", "load_mean", "predict_mean",
                     "predict"):
            assert torch.equal(got[name], want[name]), (config, r, name)
        for name in ("mean", "sq_mean", "D"):
            assert torch.equal(got["state"][name], want["state"][name]), (config, r, name)
        assert {k: v for k, v in got["state"].items() if not torch.is_tensor(v)} == \
               {k: v for k, v in want["state"].items() if not torch.is_tensor(v)}
        torch.testing.assert_close(got["log_prob"], want["log_prob"], rtol=1e-12, atol=1e-9)
        assert torch.equal(got["from_shard"], want["again"]) and torch.equal(got["from_full"], want["again"])
        a, b = RANGES[world][r]
        K = CUDA_CONFIGS[config]["max_rank"]
        assert got["columns"] == (a, b) and got["shapes"] == ((b - a,), (b - a,), (K, b - a)), (config, r)
        assert got["shard_state"]["D"].shape == (K, b - a)


def test_two_processes_draw_what_one_process_draws():
    ranks = spawn_gloo(_worker, 2)
    for config in CONFIGS:
        _check_equal_to_single(ranks, "cpu", 2, config)
    assert all(r["auto"] for r in ranks)


def test_three_processes_a_subgroup_and_the_errors():
    ranks = spawn_gloo(functools.partial(_worker, errors=True), 3)
    for config in CONFIGS:
        _check_equal_to_single(ranks, "cpu", 3, config)
    for r in (1, 2):  # the group [1, 2]: its rank 0 is global rank 1, whose seed the draws use
        _check_pair(ranks[r], r)
    for r, got in enumerate(ranks):
        assert got["fp16_range"].startswith("ValueError") and "float16" in got["fp16_range"], got["fp16_range"]
        assert got["fp16_nan"].startswith("ValueError") and "NaN" in got["fp16_nan"], got["fp16_nan"]
        assert got["nan"].startswith("ValueError") and "NaN" in got["nan"], got["nan"]
        if r == 1:
            assert "NaN" in got["one_replica"], got["one_replica"]
        else:
            assert got["one_replica"].startswith("RuntimeError") and "replicas differ" in got["one_replica"]
        assert got["mismatch"].startswith("ValueError") and "rank 1 differs" in got["mismatch"], got["mismatch"]
        assert "max_rank 4 vs 5" in got["mismatch"]
        assert "same rank" in got["wrong_rank"] and f"rank {(r + 1) % 3} of 3" in got["wrong_rank"]
        if r in (1, 2):
            assert f"rank {r - 1} of 2" in got["wrong_world"] and f"rank {r} of 3" in got["wrong_world"]


def _check_pair(got, r):
    want = _single("cpu", "f32", seed=201)
    pair = got["pair"]
    for name in ("lowrank", "diag", "sample_", "predict", "mean", "deviations"):
        assert torch.equal(pair[name], want[name]), (r, name)
    a, b = RANGES[2][r - 1]
    assert pair["columns"] == (a, b) and pair["shapes"][2] == (4, b - a)


@needs_cuda
def test_cuda_two_processes_on_one_gpu():
    ranks = spawn_gloo(functools.partial(_worker, device="cuda"), 2)
    for config in CUDA_CONFIGS:
        _check_equal_to_single(ranks, "cuda", 2, config)


# ---- no process group ----------------------------------------------------------------------------
def test_shard_columns_tile_balance_and_align():
    for numel in (0, 1, 255, 256, 257, 1527, 4096, 10**6 + 3):
        for world in (1, 2, 3, 7, 16):
            ranges = shard_columns(numel, world)
            assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
            assert all(a % SHARD_ALIGN == 0 and (a < numel or a == b) for a, b in ranges)
            blocks = [-(-(b - a) // SHARD_ALIGN) for a, b in ranges]
            assert max(blocks) - min(blocks) <= 1, (numel, world, ranges)
    assert shard_columns(P, 2) == RANGES[2] and shard_columns(P, 3) == RANGES[3]
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_columns(100, 2, align=6)
    with pytest.raises(ValueError, match="world"):
        shard_columns(100, 0)


def test_bad_arguments_without_a_process_group():
    model = _model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        SWAG(model, shard=True)
    with pytest.raises(TypeError, match="shard"):
        SWAG(model, shard="yes")
    with pytest.raises(ValueError, match="process_group"):
        SWAG(model, process_group=object())
    swag = SWAG(model, max_rank=3, shard=None)  # no process group: not sharded, nothing changes
    assert not swag.sharded and swag.columns == (0, P) and swag.D.shape == (3, P)
    _collect(model, swag, steps=3)
    with pytest.raises(RuntimeError, match="shard_state_dict"):
        swag.shard_state_dict()
    state = swag.state_dict()
    state["shard"] = {"world": 2, "index": 1, "columns": (768, P), "numel": P}
    with pytest.raises(ValueError, match="one shard of a sharded SWAG, rank 1 of 2"):
        swag.load_state_dict(state)
    state["shard"] = {"world": 2}
    with pytest.raises(ValueError, match="world, index, columns, numel"):
        swag.load_state_dict(state)
