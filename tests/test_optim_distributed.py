"""SG-MCMC under torch.distributed (gloo, 2 processes on CPU): with chains='shared' every rank draws
rank 0's noise whatever its own seed (one broadcast at the first step), so replicas that see the
same gradients (as under DDP) stay identical and equal the single-process chain of rank 0's seed;
verify=True catches replicas that drifted apart; chains='per_rank' gives independent chains."""
import os

import pytest
import torch
from torch import nn

from _helpers import spawn_gloo
from pyfastbayes.optim import SGHMC, SGLD

STEPS = 5


def _model():
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts them too)
    return nn.Linear(5, 3)


def _chain(opt_cls, model, steps=STEPS, **kw):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)  # every rank: the same gradient
    opt = opt_cls(model.parameters(), lr=1e-2, num_data=100, **kw)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for name, cls in (("sgld", SGLD), ("sghmc", SGHMC)):
            model = _model()
            torch.manual_seed(100 + rank)  # the ranks' own seeds differ
            out[name], _ = _chain(cls, model, verify=True)
        model = _model()
        torch.manual_seed(100 + rank)
        out["per_rank"], _ = _chain(SGLD, model, chains="per_rank")
        model = _model()
        torch.manual_seed(100 + rank)
        _, opt = _chain(SGLD, model, steps=1, verify=True)
        if rank == 1:
            with torch.no_grad():
                model.weight[0, 0] += 1.0  # one replica changed alone
        try:
            model.zero_grad()
            model(torch.ones(1, 5)).sum().backward()
            opt.step()
            out["verify"] = None
        except RuntimeError as e:
            out["verify"] = str(e)
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shared_chains_equal_the_single_process_chain_and_per_rank_chains_differ():
    ranks = spawn_gloo(_worker, 2)
    for name, cls in (("sgld", SGLD), ("sghmc", SGHMC)):
        model = _model()
        torch.manual_seed(100)  # rank 0's seed, alone
        want, _ = _chain(cls, model)
        for r in ranks:
            assert torch.equal(r[name], want), name
    assert not torch.equal(ranks[0]["per_rank"], ranks[1]["per_rank"])
    for r in ranks:
        assert r["verify"] is not None and "differ across ranks" in r["verify"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="chains"):
        SGLD(nn.Linear(2, 2).parameters(), lr=1e-2, num_data=10, chains="each")
    with pytest.raises(TypeError, match="verify"):
        SGLD(nn.Linear(2, 2).parameters(), lr=1e-2, num_data=10, verify=1)
