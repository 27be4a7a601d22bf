"""Command line: ``python -m pyfastbayes demo [--quick] [--out DIR] [--device cpu|cuda]``."""
import argparse
import os
import sys


def _device_problem(device: str) -> str | None:
    """Why ``device`` cannot run the demo here, or None (checked before any work starts)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return f"not a torch device ({e}); use cpu or cuda"
    if dev.type not in ("cpu", "cuda"):
        return "the demo runs on cpu or cuda"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False here (a CPU build or no GPU); use --device cpu"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyfastbayes", description="pyfastbayes command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="Bayesian regression and digits classification, every posterior method")
    d.add_argument("--out", default="pyfastbayes-report", help="report folder (default: ./pyfastbayes-report)")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--quick", action="store_true", help="a ~20-second smoke run with small budgets")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_parser("info", help="print the native build's configuration")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        import pyfastbayes

        print(pyfastbayes.build_info())
        return 0
    problem = _device_problem(args.device)
    if problem:
        ap.error(f"--device {args.device}: {problem}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: a file of that name exists; pass a folder for the report")
    from .demo import run_demo

    run_demo(out=args.out, device=args.device, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
