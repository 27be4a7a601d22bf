"""SG-MCMC over several processes with torchrun: one DDP chain, or one chain per rank.

Run (2 processes; gloo on CPU, nccl when every rank has its own GPU):

    torchrun --nproc_per_node=2 examples/torchrun_sgld.py --quick
    torchrun --nproc_per_node=2 examples/torchrun_sgld.py --quick --chains per_rank
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/torchrun_sgld.py --quick

``python examples/torchrun_sgld.py`` (no launcher) runs the same thing in one process. ``--help``
lists the options (sampler, steps, batch, lr, device, dtype, --save).

A small MLP learns sklearn's 8x8 digits (embedded in scikit-learn, no download): 1437 training and
360 test images. The sampler (``pyfastbayes.optim.SGLD`` or ``SGHMC``) targets the posterior of the
weights under the prior N(0, 1 / prior_precision); the loss is the MEAN cross-entropy of a batch
and ``num_data`` is the size of the whole training set, so num_data * mean gradient estimates the
full-data gradient whichever process computed it.

``--chains shared`` (default): ONE chain, replicated over the ranks. The model is wrapped in
DistributedDataParallel; each rank reads its DistributedSampler shard of every global batch
(``--batch`` is the global batch, split evenly over the ranks), and DDP's all-reduce makes every
rank's gradient the mean over the global batch. The sampler broadcasts rank 0's seed at its first
step, so every replica draws the same noise, and ``verify=True`` compares a parameter checksum
across the ranks after every step (it raises if the replicas drift apart). The report prints each
rank's checksum (bitwise equal). The chain equals, up to float rounding in the all-reduce, the
single-process run with the same ``--batch`` and ``--seed``: DistributedSampler(shuffle, seed) hands
rank r the positions r, r + W, r + 2W, ... of one seeded permutation, so global batch k is the
k-th block of ``--batch`` positions of that permutation, exactly the single-process batch k.

``--chains per_rank``: each rank runs its OWN independent chain (its own seed, mixed from rank 0's
by the sampler, and its own initial weights). A chain must see the whole data set to target the
posterior, so the model is not wrapped in DDP and every rank draws its batches of ``--batch``
points from the full training set in its own order. After the burn-in each rank records, at every
``--thin``-th step, the test NLL and |theta|^2 of its current weights (scalars that do not depend
on how hidden units are permuted, unlike the raw weights); rank 0 all_gathers them into
[chains, draws] and prints split R-hat and bulk / tail ESS (``pyfastbayes.diagnostics``).

Both modes end with the test accuracy and NLL of the Bayesian model average (the mean of the
softmax outputs of every recorded draw, of every chain).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch._dynamo  # noqa: F401  before init_process_group: see the note in main()
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler

from pyfastbayes import diagnostics
from pyfastbayes.optim import SGHMC, SGLD

N_TEST = 360  # of sklearn's 1797 digits; the other 1437 are the training set
QUANTITIES = ("test_nll", "sq_norm")  # recorded per draw for the diagnostics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="150 steps (about 1 s of sampling on 2 CPU cores)")
    p.add_argument("--chains", choices=("shared", "per_rank"), default="shared",
                   help="'shared': one chain replicated by DDP; 'per_rank': one independent chain per rank")
    p.add_argument("--sampler", choices=("sgld", "sghmc"), default="sgld")
    p.add_argument("--steps", type=int, help="sampler steps (default 150 with --quick, else 10000)")
    p.add_argument("--burn-in", type=int, help="steps before the first recorded draw (default 50 with --quick, "
                                               "else steps / 2)")
    p.add_argument("--thin", type=int, help="record a draw every THIN steps after the burn-in "
                                            "(default 5 with --quick, else 25)")
    p.add_argument("--batch", type=int,
                   help="global batch: split evenly over the ranks with 'shared' (default 64, rounded up to a "
                        "multiple of the number of processes), each chain's own with 'per_rank' (default 64)")
    p.add_argument("--lr", type=float, help="step size (default 1e-3 for SGLD, 5e-5 for SGHMC)")
    p.add_argument("--friction", type=float, default=0.1, help="SGHMC friction")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prior-precision", type=float, default=10.0,
                   help="alpha of the prior N(0, 1 / alpha); the weights' norm relaxes in ~2 / (lr alpha) steps")
    p.add_argument("--hidden", type=int, default=64, help="width of the MLP's hidden layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per rank with nccl when there are enough GPUs, else CPU with gloo")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-verify", action="store_true", help="'shared': skip the per-step replica check")
    p.add_argument("--save", metavar="PATH", help="rank 0 writes the final parameters here (torch.save)")
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (150 if a.quick else 10000)
    a.burn_in = a.burn_in if a.burn_in is not None else (a.steps // 3 if a.quick else a.steps // 2)
    a.thin = a.thin if a.thin is not None else (5 if a.quick else 25)
    a.lr = a.lr if a.lr is not None else (1e-3 if a.sampler == "sgld" else 5e-5)
    for name in ("steps", "thin", "batch", "hidden"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.burn_in < a.steps:
        p.error(f"--burn-in must be in [0, steps = {a.steps}), got {a.burn_in}")
    if (a.steps - a.burn_in) // a.thin < 4:
        p.error(f"steps - burn-in = {a.steps - a.burn_in} at --thin {a.thin} records fewer than 4 draws "
                f"per chain (R-hat and ESS need 4); raise --steps or lower --thin")
    return a


# ---- process group ------------------------------------------------------------------------------
def launched() -> bool:
    """Started by torchrun / torch.distributed.run (which set RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(choice: str) -> torch.device:
    """One GPU per process on this node (LOCAL_RANK), or the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cuda" and gpus < local_world:
        sys.exit(f"--device cuda needs one GPU per process: {local_world} processes on this node but "
                 f"{gpus} GPU(s) visible; use fewer processes or --device cpu")
    if choice == "cpu" or (choice == "auto" and gpus < local_world):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# ---- data and model -----------------------------------------------------------------------------
def load_digits(dtype: torch.dtype, device: torch.device):
    """sklearn's digits, pixels scaled to [0, 1]; a fixed split, the same on every rank."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        sys.exit("this example reads the digits embedded in scikit-learn: pip install scikit-learn")
    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=dtype) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    te, tr = perm[:N_TEST], perm[N_TEST:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def make_mlp(hidden: int, seed: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device=device, dtype=dtype)


def batches(n: int, batch: int, replicas: int, rank: int, seed: int):
    """Endless index batches: this rank's DistributedSampler shard of a seeded permutation of
    range(n), reshuffled each epoch (set_epoch), ``batch`` indices at a time, incomplete ones dropped.
    With replicas = W and batch = B / W, the W ranks' k-th batches together are the k-th block of B
    positions of the permutation: the single-process (replicas = 1) batch k of size B."""
    sampler = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        got = False
        for idx in BatchSampler(sampler, batch, drop_last=True):
            got = True
            yield torch.tensor(idx)
        if not got:
            raise ValueError(f"a batch of {batch} is larger than this rank's {len(sampler)} training points")
        epoch += 1


# ---- the run ------------------------------------------------------------------------------------
def main(argv=None) -> None:
    a = parse_args(argv)
    dtype = getattr(torch, a.dtype)
    device = pick_device(a.device)
    # Note: torch._dynamo, which torch.optim imports when the first optimizer is built, holds on to
    # the process group when it is first imported after init_process_group (seen with torch 2.13):
    # destroy_process_group then leaves gloo's worker threads running, and one that drops its last
    # finished work during interpreter shutdown aborts the process ("terminate called without an
    # active exception", now and then). Imported above, before the group exists, it holds nothing.
    if launched():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if launched() else 1
    rank = dist.get_rank() if launched() else 0
    run(a, dtype, device, world, rank)  # on an error torchrun stops the other ranks
    if launched():  # every rank done (rank 0 reports last) before the group is torn down
        dist.barrier()
        dist.destroy_process_group()


def gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (all_gather; the same shape on every rank)."""
    if world == 1:
        return t[None]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def run(a: argparse.Namespace, dtype: torch.dtype, device: torch.device, world: int, rank: int) -> None:
    shared = a.chains == "shared"
    if a.batch is None:
        a.batch = world * math.ceil(64 / world) if shared else 64
    if shared and a.batch % world:
        raise SystemExit(f"--batch {a.batch} (the global batch) must be divisible by the {world} processes "
                         f"with --chains shared (each rank reads batch / world points per step)" if rank == 0 else 2)
    x_tr, y_tr, x_te, y_te = load_digits(dtype, device)
    n = len(y_tr)

    # shared: one chain, the same initial weights (DDP also broadcasts rank 0's) and rank 0's seed;
    # per_rank: own initial weights per rank (spread-out starts make R-hat meaningful).
    model = make_mlp(a.hidden, a.seed if shared else a.seed + 1000 * rank, dtype, device)
    net = DistributedDataParallel(model) if shared and launched() else model
    kw = dict(num_data=n, temperature=a.temperature, prior_precision=a.prior_precision, chains=a.chains,
              generator=torch.Generator().manual_seed(a.seed + 1))  # rank 0's is the one broadcast
    if shared:
        kw["verify"] = not a.no_verify  # the sampler checks only when torch.distributed is initialised
    if a.sampler == "sgld":
        opt = SGLD(model.parameters(), lr=a.lr, **kw)
    else:
        opt = SGHMC(model.parameters(), lr=a.lr, friction=a.friction, **kw)
    if shared:  # this rank's shard of the global batches
        order = batches(n, a.batch // world, world, rank, a.seed)
    else:  # the whole training set, this chain's own order
        order = batches(n, a.batch, 1, 0, a.seed + 1000 * rank)

    trace, probs_sum = [], torch.zeros(len(y_te), 10, dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    for t in range(a.steps):
        idx = next(order).to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()  # mean NLL (DDP: global mean)
        opt.step()
        if t >= a.burn_in and (t - a.burn_in + 1) % a.thin == 0:
            with torch.no_grad():
                logp = torch.log_softmax(model(x_te).double(), -1)  # the module itself: no DDP sync
                probs_sum += logp.exp()
                sq = sum(p.double().square().sum() for p in model.parameters())
                trace.append(torch.stack([-logp[torch.arange(len(y_te)), y_te].mean(), sq]))
    seconds = time.perf_counter() - t0

    params = [p.detach() for p in model.parameters()]
    checksum = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
    checksums = gather(checksum, world).cpu()
    seeds = gather(torch.tensor([opt.seed()], dtype=torch.int64, device=device), world).reshape(-1).cpu()
    draws = gather(torch.stack(trace), world).cpu()  # [world, draws, len(QUANTITIES)]
    if shared:  # the replicas are one chain: its draws once
        draws = draws[:1]
    elif world > 1:  # the model average over every chain's draws
        dist.all_reduce(probs_sum)
    times = gather(torch.tensor([seconds], dtype=torch.float64, device=device), world).reshape(-1).cpu()

    if rank == 0:
        report(a, device, world, n, draws, probs_sum.cpu() / (draws.shape[0] * draws.shape[1]), y_te.cpu(),
               checksums, seeds, times)
        if a.save:
            torch.save({"params": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "world": world, "chains": a.chains, "steps": a.steps, "batch": a.batch}, a.save)
            print(f"final parameters of rank 0 saved to {a.save}")


def report(a, device, world, n, draws, probs, y_te, checksums, seeds, times) -> None:
    backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
    print(f"pyfastbayes torchrun example: {world} process(es), backend {backend}, device {device.type}, "
          f"{a.sampler.upper()}, chains={a.chains!r}, {a.dtype}")
    if a.chains == "shared":
        per = f" = {world} ranks x {a.batch // world} (DistributedSampler shards)" if world > 1 else ""
        data = f"global batch {a.batch}{per}; DDP averages the gradient over the global batch"
    else:
        data = f"each chain: batches of {a.batch} from the whole training set in its own order"
    print(f"data: sklearn digits, {n} train / {len(y_te)} test; num_data = {n}; {data}")
    print(f"steps: {a.steps} (burn-in {a.burn_in}, a draw every {a.thin}: {draws.shape[1]} draws per chain) "
          f"in {times.max():.2f} s (slowest rank)")
    print("sampler seeds: " + ", ".join(f"rank {r}: {int(s)}" for r, s in enumerate(seeds)))
    print("parameter checksums (float64 sum, sum of squares of every parameter):")
    for r, (s, q) in enumerate(checksums.tolist()):
        print(f"  rank {r}: {s!r} {q!r}")
    same = all(torch.equal(checksums[0], c) for c in checksums)
    if a.chains == "shared":
        checked = "verify=True compared them after every step" if launched() and not a.no_verify else "not verified"
        print(f"replicas identical: {'yes' if same else 'NO'} ({checked})")
    else:
        differ = len({tuple(c.tolist()) for c in checksums}) == world  # every pair of chains differs
        print(f"chains: {world} independent, final parameters all different: {'yes' if differ else 'NO'}")
    # R-hat / ESS: [chains, draws] per quantity (one chain: R-hat compares its two halves)
    summ = diagnostics.summary({name: draws[..., i] for i, name in enumerate(QUANTITIES)})
    print(f"diagnostics over {draws.shape[0]} chain(s) x {draws.shape[1]} draws (rank R-hat, bulk / tail ESS):")
    print("  " + str(summ).replace("\n", "\n  "))
    for name, d in summ.items():
        print(f"rhat[{name}] = {float(d.rhat):.4f}  ess_bulk = {float(d.ess_bulk):.1f}  "
              f"ess_tail = {float(d.ess_tail):.1f}")
    acc = (probs.argmax(-1) == y_te).double().mean().item()
    nll = -probs[torch.arange(len(y_te)), y_te].clamp_min(1e-300).log().mean().item()
    print(f"model average of {draws.shape[0] * draws.shape[1]} draws: test accuracy {acc:.4f}, "
          f"test NLL {nll:.4f}")


if __name__ == "__main__":
    main()
