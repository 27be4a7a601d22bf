"""SG-MCMC under FSDP2 (torch.distributed.fsdp.fully_shard, gloo, 2 and 3 processes on CPU): the
parameters are DTensors placed Shard(0), each rank steps its local shard with the noise that the
unsharded tensor's elements get (the ops' offsets), so the sharded chain equals the single-process
chain with the same seed and the same (full-batch) gradients, in fp64 to rounding.

The model's shapes put shards at offsets of every residue mod 4 in both worlds (world 2: 2015, 5,
18, 2; world 3: 1209, 2418, 3, 6, 18, 2), shards longer than the CPU kernel's 1024-normal buffer,
and empty shards (the last layer has one row: ranks 1.. hold nothing of it; world 3: rank 2 holds
nothing of the 4-row layer either). Also: non-finite gradients in
one rank's shard skip / raise on every rank, verify=True compares the RNG positions (and not the
shards), state_dict round trip with local-shard-sized buffers, and refused placements."""
import os

import pytest
import torch
from torch import nn

from _helpers import fully_sharded, spawn_gloo
from pyfastbayes.optim import PSGLD, SGHMC, SGLD

STEPS = 4
N = 12  # full batch, split evenly over 2 or 3 ranks
SAMPLERS = {"sgld": (SGLD, {}), "sghmc": (SGHMC, dict(friction=0.2)), "psgld": (PSGLD, dict(alpha=0.9, eps=1e-3))}


def _model():
    torch.manual_seed(0)  # the same initial weights on every rank (fully_shard keeps each rank's chunk)
    return nn.Sequential(nn.Linear(403, 9), nn.Tanh(), nn.Linear(9, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 403, generator=g, dtype=torch.float64), torch.randn(N, 1, generator=g, dtype=torch.float64)


def _chain(cls, model, x, y, steps=STEPS, **kw):
    """``steps`` steps on the mean squared error of (x, y); returns the optimizer."""
    opt = cls(model.parameters(), lr=1e-3, num_data=100, **{**SAMPLERS_KW[cls], **kw})
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


SAMPLERS_KW = {cls: kw for cls, kw in SAMPLERS.values()}


def _single(name, fused=None):
    """The single-process chain: rank 0's seed, the whole batch."""
    model = _model()
    x, y = _data()
    torch.manual_seed(100)
    _chain(SAMPLERS[name][0], model, x, y, fused=fused)
    return [p.detach().clone() for p in model.parameters()]


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _data()
        lo, hi = rank * N // world, (rank + 1) * N // world  # this rank's part of the batch
        out = {"offsets": {}}
        for name, fused in [("sgld", None), ("sghmc", None), ("psgld", None)] + (
                [("sgld", False)] if world == 3 else []):
            model, mesh = fully_sharded(_model(), world)
            assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
            torch.manual_seed(100 + rank)  # the ranks' own seeds differ: rank 0's is broadcast
            opt = _chain(SAMPLERS[name][0], model, x[lo:hi], y[lo:hi], fused=fused, verify=True)
            out[name, fused] = _full(model)
            plan = opt._plan()[0]
            out["offsets"] = plan.offsets
            out["local_numels"] = [p.numel() for p in plan.params]
            if opt._buffer:  # state buffers are local-shard-sized
                out[name, "bufs"] = [tuple(opt.state[p][opt._buffer].shape) == tuple(p.to_local().shape)
                                     for p in model.parameters()]
            if name == "sghmc" and fused is None:
                opt2 = SGHMC(model.parameters(), lr=1e-3, num_data=100)
                opt2.load_state_dict(opt.state_dict())  # buffers checked against the local shapes
                out["loaded"] = all(torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
                                    for p in model.parameters())
        if world == 2:
            out.update(_nonfinite_and_verify(rank, world, x[lo:hi], y[lo:hi]))
            out.update(_refusals(rank, world))
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _nonfinite_and_verify(rank, world, x, y):
    """A NaN in rank 1's shard of one gradient: 'skip' skips the step on every rank (no shard
    changes, no RNG advance), 'raise' raises on every rank; verify=True catches a rank whose RNG
    position moved alone."""
    out = {}
    for mode in ("skip", "raise"):
        model, _ = fully_sharded(_model(), world)
        torch.manual_seed(100 + rank)
        opt = _chain(SGLD, model, x, y, steps=1, nonfinite=mode)
        before = [p.to_local().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if rank == 1:
            next(iter(model.parameters())).grad.to_local()[0, 0] = float("nan")
        try:
            opt.step()
            out[mode] = None
        except RuntimeError as e:
            out[mode] = str(e)
        out[mode, "unchanged"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        out[mode, "step"] = opt.state[next(iter(model.parameters()))]["rng"][1].item()
    model, _ = fully_sharded(_model(), world)
    torch.manual_seed(100 + rank)
    opt = _chain(SGLD, model, x, y, steps=1, verify=True)
    if rank == 1:
        opt.state[next(iter(model.parameters()))]["rng"][0] += 1  # this rank's chain moved alone
    try:
        _chain_step(opt, model, x, y)
        out["verify"] = None
    except RuntimeError as e:
        out["verify"] = str(e)
    return out


def _chain_step(opt, model, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _refusals(rank, world):
    """Placements whose local shard is not one contiguous range of the full tensor, and
    chains='per_rank' with sharded parameters, are refused at construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    cols = nn.Parameter(distribute_tensor(torch.randn(4, 6, dtype=torch.float64), mesh, [Shard(1)]))
    for key, make in (("shard1", lambda: SGLD([cols], lr=1e-3, num_data=10)),
                      ("per_rank", lambda: SGLD(fully_sharded(_model(), world)[0].parameters(), lr=1e-3, num_data=10,
                                                chains="per_rank"))):
        try:
            make()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    # Replicate is fine: offset 0, the whole tensor on every rank, the same noise on every rank
    rep = nn.Parameter(distribute_tensor(torch.zeros(3, 5, dtype=torch.float64), mesh, [Replicate()]))
    torch.manual_seed(100 + rank)
    opt = SGLD([rep], lr=1e-2, num_data=10, verify=True)
    rep.grad = distribute_tensor(torch.zeros(3, 5, dtype=torch.float64), mesh, [Replicate()])
    opt.step()
    out["replicate"] = rep.to_local().clone()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_chains_equal_the_single_process_chain(world):
    ranks = spawn_gloo(_worker, world)
    names = [("sgld", None), ("sghmc", None), ("psgld", None)] + ([("sgld", False)] if world == 3 else [])
    for name, fused in names:
        want = _single(name, fused)
        for r, out in enumerate(ranks):
            for i, (got, exp) in enumerate(zip(out[name, fused], want)):
                torch.testing.assert_close(got, exp, rtol=0, atol=1e-12,
                                           msg=lambda m: f"{name} fused={fused} rank {r} param {i}: {m}")
        if name != "sgld":
            assert all(all(out[name, "bufs"]) for out in ranks)
    # the layout the test is about: offsets of every residue mod 4 and empty shards
    offsets = [o for out in ranks for o, n in zip(out["offsets"], out["local_numels"]) if n]
    assert {o % 4 for o in offsets} == {0, 1, 2, 3}, offsets
    assert any(n == 0 for out in ranks for n in out["local_numels"])
    assert all(out["loaded"] for out in ranks)
    if world == 2:
        _check_nonfinite_verify_and_refusals(ranks)


def _check_nonfinite_verify_and_refusals(ranks):
    for out in ranks:
        assert out["skip"] is None and out["skip", "unchanged"] and out["skip", "step"] == 1
        assert out["raise"] is not None and "non-finite gradient" in out["raise"] and out["raise", "unchanged"]
        assert out["raise", "step"] == 1
        assert out["verify"] is not None and "differ across ranks" in out["verify"]
        assert "Shard(dim=1)" in out["shard1"] and "neither Shard(0) nor Replicate" in out["shard1"]
        assert "chains='per_rank'" in out["per_rank"] and "sharded" in out["per_rank"]
    assert "another rank's shards" in ranks[0]["raise"]
    assert torch.equal(ranks[0]["replicate"], ranks[1]["replicate"])
    assert ranks[0]["replicate"].abs().sum() > 0  # it stepped (noise)
