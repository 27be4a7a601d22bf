"""Run every benchmark suite (bench/bench_*.py) and print one table; write JSON.

    python bench/run.py [--device cpu|cuda] [--quick] [--only sgmcmc,...] [--json out.json]

Each suite module exposes ``run(device: str, quick: bool) -> list[dict]`` (rows from
``bench.common.row``): ours next to the baselines of the same run, with ratios.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import sys
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # after site-packages: an installed pyfastbayes (with _C) wins


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def print_table(rows: list[dict]) -> None:
    """Print ``rows`` (dicts) as one aligned table: the standard columns first, then any extras."""
    cols = ["suite", "case", "impl", "ms", "speedup", "of_floor"]
    cols += sorted({k for r in rows for k in r} - set(cols))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols} if rows else {}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated suite names, e.g. sgmcmc,calibration")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()
    suites = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(suites)
        if unknown:
            ap.error(f"unknown suites {sorted(unknown)}; have {suites}")
        suites = [s for s in args.only.split(",") if s]  # in the order asked: the first ones matter most
    import pyfastbayes

    print(f"# {time.strftime('%Y-%m-%d')} | {machine(args.device)} | torch {torch.__version__} | "
          f"pyfastbayes {pyfastbayes.build_info()}")
    rows, failed = [], []
    for s in suites:  # each suite's table is printed (and the json rewritten) as soon as it ends,
        try:  # so a run cut by a time limit keeps them; a suite that raises does not stop the others
            new = importlib.import_module(f"bench.bench_{s}").run(args.device, args.quick)
        except Exception:
            traceback.print_exc()
            print(f"# bench_{s} FAILED (traceback above); the other suites go on", flush=True)
            failed.append(s)
            continue
        rows += new
        print_table(new)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"device": machine(args.device), "rows": rows}, indent=1))
    if failed:
        print(f"# failed suites: {','.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
