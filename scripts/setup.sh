#!/usr/bin/env bash
# Set up a fresh machine for pyfastbayes: a virtual environment (.venv, or $PFB_VENV) with the CPU
# build of torch, the build tools, the demo/test/benchmark extras, and pyfastbayes built from
# this checkout against that torch (editable, so Python edits need no rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PFB_VENV:-.venv}
TORCH_SPEC=${PFB_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q -r requirements-dev.txt
# the peers compared against in tests and benchmarks, without letting them replace torch or pull
# a CUDA torchvision (which breaks `import torchmetrics` beside the CPU torch)
"$PY" -m pip install -q --no-deps -r requirements-peers.txt
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
# every peer must import: a test or benchmark against a peer that cannot load fails, it does not skip
"$PY" -c "import posteriors, torchmetrics, netcal.metrics, sklearn, scipy, matplotlib, curvlinops, loss_landscapes.metrics, laplace, bayesian_torch.layers, arviz" || {
  echo "setup: a peer library does not import (see the error above); fix requirements-peers.txt" >&2; exit 1; }
"$PY" -c "import pyfastbayes, sys; i = pyfastbayes.build_info(); print('pyfastbayes', i); sys.exit(0 if i['native'] else 1)"
