"""examples/torchrun_sgld.py under `python -m torch.distributed.run` (gloo, CPU): the shared chain's
replicas stay identical and equal the single-process chain that sees the same global batches;
per_rank chains are independent and the report gives finite R-hat / ESS; bad options are refused."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import needs_cuda, require

require("sklearn")  # the example reads sklearn's embedded digits
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "torchrun_sgld.py"


def run_example(*args: str, nproc: int | None = None, timeout: int = 240) -> str:
    """Run the example (under torch.distributed.run with ``nproc`` processes, or as a plain script),
    one thread per process; returns stdout after asserting rc 0."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *launcher, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def checksums(out: str) -> list[tuple[float, float]]:
    """The report's per-rank 'rank r: sum sum_of_squares' lines, in rank order."""
    rows = re.findall(r"^  rank (\d+): (\S+) (\S+)$", out, re.M)
    assert [int(r) for r, _, _ in rows] == list(range(len(rows))), out
    return [(float(s), float(q)) for _, s, q in rows]


def diagnostics(out: str) -> dict[str, tuple[float, float, float]]:
    """{quantity: (rhat, ess_bulk, ess_tail)} from the report's 'rhat[name] = ...' lines."""
    rows = re.findall(r"^rhat\[(\w+)\] = (\S+)  ess_bulk = (\S+)  ess_tail = (\S+)$", out, re.M)
    return {name: tuple(map(float, vals)) for name, *vals in rows}


def model_average(out: str) -> tuple[int, float, float]:
    draws, acc, nll = re.search(r"^model average of (\d+) draws: test accuracy (\S+), test NLL (\S+)$", out,
                                re.M).groups()
    return int(draws), float(acc), float(nll)


@pytest.mark.slow
def test_shared_chain_two_ranks_equals_the_single_process_chain(tmp_path):
    # float64 so that the only difference, the order of the all-reduce's sums, stays far below the
    # tolerance over 150 steps (float32 differs by ~5e-7 here, too close to a 1e-6 check)
    common = ["--quick", "--dtype", "float64"]
    out2 = run_example(*common, "--save", str(tmp_path / "two.pt"), nproc=2)
    out1 = run_example(*common, "--save", str(tmp_path / "one.pt"))
    assert "2 process(es), backend gloo" in out2 and "chains='shared'" in out2
    assert "global batch 64 = 2 ranks x 32 (DistributedSampler shards)" in out2
    sums = checksums(out2)
    assert len(sums) == 2 and sums[0] == sums[1], out2  # bitwise: the replicas are one chain
    assert "replicas identical: yes (verify=True compared them after every step)" in out2
    seeds = re.search(r"^sampler seeds: rank 0: (\S+), rank 1: (\S+)$", out2, re.M).groups()
    assert seeds[0] == seeds[1], out2  # rank 0's seed, broadcast
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["world"] == 2 and one["world"] == 1
    assert two["params"].keys() == one["params"].keys()
    for name, p in one["params"].items():
        assert p.dtype == torch.float64
        torch.testing.assert_close(two["params"][name], p, rtol=1e-9, atol=1e-9, msg=name)
    # the single-process run is the same chain: the same model average and checksums to ~1e-12
    draws2, acc2, nll2 = model_average(out2)
    draws1, acc1, nll1 = model_average(out1)
    assert draws1 == draws2 == 20 and acc1 == acc2 and math.isclose(nll1, nll2, rel_tol=1e-6)
    assert acc2 > 0.8, out2  # 10 classes: chance is 0.1
    for a, b in zip(checksums(out1)[0], sums[0]):
        assert math.isclose(a, b, rel_tol=1e-9)


@pytest.mark.slow
def test_per_rank_chains_three_ranks_report_rhat_and_ess():
    out = run_example("--quick", "--chains", "per_rank", nproc=3)
    assert "3 process(es), backend gloo" in out and "chains='per_rank'" in out
    seeds = re.search(r"^sampler seeds: (.*)$", out, re.M).group(1)
    assert len(set(re.findall(r"rank \d+: (\S+)", seeds))) == 3, out  # three different chains
    sums = checksums(out)
    assert len(sums) == 3 and len(set(sums)) == 3, out
    assert "chains: 3 independent, final parameters all different: yes" in out
    assert "diagnostics over 3 chain(s) x 20 draws" in out
    diag = diagnostics(out)
    assert set(diag) == {"test_nll", "sq_norm"}, out
    for name, (rhat, ess_bulk, ess_tail) in diag.items():
        assert math.isfinite(rhat) and rhat > 0.5, (name, out)
        assert 0 < ess_bulk <= 3 * 20 * 2 and 0 < ess_tail <= 3 * 20 * 2, (name, out)  # bounded by ~2x the draws
    draws, acc, nll = model_average(out)
    assert draws == 60 and acc > 0.8 and 0 < nll < 1.0, out


def test_bad_options_are_refused(capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chains", "each"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "--chains: invalid choice: 'each'" in proc.stderr, proc.stderr
    spec = importlib.util.spec_from_file_location("torchrun_sgld", SCRIPT)  # the rest in this process
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for argv, why in [(["--steps", "20", "--burn-in", "10", "--thin", "5"], "fewer than 4 draws"),
                      (["--burn-in", "-1"], "--burn-in must be in [0, steps = 10000)"),
                      (["--quick", "--batch", "0"], "--batch must be >= 1"),
                      (["--device", "tpu"], "--device: invalid choice")]:
        with pytest.raises(SystemExit) as exc:
            example.parse_args(argv)
        assert exc.value.code == 2 and why in capsys.readouterr().err, argv
    a = example.parse_args(["--quick", "--chains", "per_rank"])
    assert (a.steps, a.burn_in, a.thin, a.chains, a.lr) == (150, 50, 5, "per_rank", 1e-3)


@pytest.mark.slow
@needs_cuda
def test_one_rank_on_cuda_with_nccl():
    # one GPU is enough for one rank: DDP, the sampler's broadcast and verify all-reduces on nccl
    out = run_example("--quick", "--device", "cuda", nproc=1)
    assert "1 process(es), backend nccl, device cuda" in out, out
    assert "replicas identical: yes (verify=True compared them after every step)" in out
    draws, acc, _ = model_average(out)
    assert draws == 20 and acc > 0.8, out
