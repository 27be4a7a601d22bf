#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA kernels, run the test suite (the CUDA tests run
# there), run every benchmark suite on the GPU, and print a short table. Results land in $OUT
# (the device tool's output folder) or ./gpu-check.
#   bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check}
mkdir -p "$OUT"
QUICK=${1:-}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "$(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
log "python $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__)'), $(nvcc --version | tail -1)"
# no network there: install what the test run needs from the carried .gpu-wheels/ (scripts/fetch_gpu_wheels.sh)
if [ -d .gpu-wheels ]; then
  for m in pytest numpy tqdm posteriors; do
    python -c "import $m" 2>/dev/null && continue
    case $m in
      pytest) pkgs="pytest pluggy iniconfig packaging" ;;
      posteriors) pkgs="posteriors torchopt graphviz optree tensordict cloudpickle pyvers typing-extensions" ;;
      *) pkgs=$m ;;
    esac
    python -m pip install -q --no-index --find-links .gpu-wheels --no-deps $pkgs >>"$OUT/wheels.log" 2>&1
    log "offline install of $pkgs: rc=$?"
  done
fi
python -c "import pytest" 2>/dev/null || log "pytest is missing: run scripts/fetch_gpu_wheels.sh here and carry .gpu-wheels"
t0=$(date +%s)
PYFASTBAYES_CUDA=ON python -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit $rc; }
cd /tmp
python -c "import pyfastbayes; print(pyfastbayes.build_info())" | tee -a "$OUT/summary.txt"

t0=$(date +%s)
python -m pytest -q -x -p no:cacheprovider "$REPO/tests" >"$OUT/tests.log" 2>&1
log "tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests.log")"
grep -E "FAILED|Error" "$OUT/tests.log" | head -20

t0=$(date +%s)
(cd "$REPO" && python bench/run.py --device cuda $QUICK --json "$OUT/bench.json") >"$OUT/bench.txt" 2>&1
log "bench rc=$? in $(( $(date +%s) - t0 )) s"
grep -vE "Warning|warn" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
