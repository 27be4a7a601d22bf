"""Which C++ errors survive in this process? Each probe runs in a fresh interpreter (faulthandler
on) and makes a native op refuse a bad argument (a TORCH_CHECK in pyfastbayes' C++), or torch
refuse one, after some setup; it prints the probe's exit code: 0 = the RuntimeError reached
Python, -11 = the process died (SIGSEGV) while the exception was thrown.

    python scripts/cxx_error_probe.py

Written for the GPU run (bench/gpu_check.sh), where such refusals killed pytest workers.
"""
from __future__ import annotations

import subprocess
import sys

OURS = ("from pyfastbayes import ops\n"
        "try:\n"
        "    ops.calibration_bins(torch.rand(3, 4{dev}), torch.zeros(3, dtype=torch.long{dev}), 15, backend='native')\n"
        "except RuntimeError as e:\n"
        "    print('  refused:', str(e)[:80])\n")
TORCH = ("try:\n"
         "    torch.zeros(2{dev}).view(3)\n"
         "except RuntimeError as e:\n"
         "    print('  refused:', str(e)[:80])\n")
SETUP = {
    "fresh": "",
    "cuda initialised": "torch.zeros(1, device='cuda')\n",
    "heavy imports": ("import importlib\n"
                      "for m in ('numpy', 'scipy.stats', 'sklearn.metrics', 'pandas', 'pyarrow', 'matplotlib.pyplot'):\n"
                      "    try: importlib.import_module(m)\n"
                      "    except Exception: pass\n"),
    "after torch.compile": "torch.compile(lambda x: x + 1, backend='aot_eager')(torch.ones(3))\n",
    "after an earlier refusal": OURS.format(dev=""),
}


def main() -> int:
    has_cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                              capture_output=True, text=True).stdout.strip() == "True"
    probes = []  # (label, process): every probe at once (each is one interpreter start)
    for setup_name, setup in SETUP.items():
        if "cuda" in setup and not has_cuda:
            continue
        for what, body in (("pyfastbayes", OURS), ("torch", TORCH)):
            for dev in ([""] + ([", device='cuda'"] if has_cuda else [])):
                code = "import faulthandler; faulthandler.enable()\nimport torch\n" + setup + body.format(dev=dev)
                label = f"{what} refusal on {'cuda' if dev else 'cpu'}, {setup_name}"
                probes.append((label, subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True)))
    for label, proc in probes:
        out, _ = proc.communicate(timeout=300)
        print(f"probe: {label}: rc={proc.returncode}", flush=True)
        if proc.returncode != 0:
            print("  " + "\n  ".join(out.strip().splitlines()[-12:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
