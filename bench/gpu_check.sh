#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA kernels (sm_90), run the whole test suite there (the
# CUDA tests included), compute-sanitizer (memcheck, racecheck, synccheck) over scripts/cuda_smoke.py
# while the tests run, then every benchmark suite on the GPU, and write a short summary. Every step
# has a time limit and the summary is written whatever fails. Results land in $OUT (the device
# tool's output folder) or ./gpu-check.
#   OUT=$OUT bash bench/gpu_check.sh [--quick]
# Order: build; sanitizers in the background; the CUDA tests (-k cuda: every test of a *_cuda.py
# file and every op-contract case on the cuda device); the benchmarks (after the sanitizers, so
# nothing else uses the GPU); STEPS with 'ncu': Nsight Compute over scripts/ncu_targets.py (NCU_LIMIT);
# then the rest of the suite until DEADLINE. At most 8 files in $OUT (the device tool's limit).
# Knobs (environment): STEPS (default "build tests sanitize bench"), BENCH_ONLY (suites, e.g.
# sgmcmc,swag, in that order), CUDA_K (the -k expression of the CUDA test step, default cuda), PEERS=0
# (install only pytest and torchmetrics from the carried wheels: fewer peer rows and tests), TEST_LIMIT / SAN_LIMIT / BENCH_LIMIT / LAPLACE_LIMIT / VI_LIMIT (seconds per step;
# bench_laplace and bench_vi run apart in --quick mode, defaults 120 s and 90 s), DEADLINE (seconds from
# the start by which the rest of the suite is interrupted, with its summary, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check}
mkdir -p "$OUT"
QUICK=${1:-}
STEPS=${STEPS:-build tests sanitize bench}
DEADLINE=${DEADLINE:-540}
T_START=$(date +%s)
log() { echo "== [$(( $(date +%s) - T_START )) s] $*" | tee -a "$OUT/summary.txt"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

log "$(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
log "python $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__)'), $(nvcc --version | tail -1), $(nproc) cores"
# no network there: install what is missing from the carried .gpu-wheels/ (scripts/fetch_gpu_wheels.sh)
if [ -d .gpu-wheels ]; then
  need=()
  for m in pytest:"pytest pluggy iniconfig packaging" xdist:"pytest-xdist execnet" numpy:numpy tqdm:tqdm \
           posteriors:"posteriors torchopt graphviz optree tensordict cloudpickle pyvers typing-extensions" \
           torchmetrics:"torchmetrics lightning-utilities" bayesian_torch:bayesian-torch scipy:scipy \
           loss_landscapes:loss-landscapes \
           laplace:"laplace-torch asdfghjkl curvlinops-for-pytorch backpack-for-pytorch unfoldNd einops einconv linear-operator opt-einsum"; do
    [ "${PEERS:-1}" = 0 ] && [[ " pytest xdist numpy tqdm torchmetrics " != *" ${m%%:*} "* ]] && continue  # PEERS=0: pytest + torchmetrics
    python -c "import ${m%%:*}" 2>/dev/null || need+=(${m#*:})
  done
  if [ ${#need[@]} -gt 0 ]; then
    python -m pip install -q --no-index --find-links .gpu-wheels --no-deps "${need[@]}" >/tmp/pfb-wheels.log 2>&1
    log "offline install of ${need[*]}: rc=$?"
  fi
fi
python -c "import pytest" 2>/dev/null || log "pytest is missing: run scripts/fetch_gpu_wheels.sh here and carry .gpu-wheels"

# a call without 'build' on a machine that was released in between (30 s idle) finds no pyfastbayes:
# build then, or every suite would time the pure-PyTorch fallbacks (the 2026-11-27 second call did)
if ! has build && ! (cd /tmp && python -c "import pyfastbayes._C" 2>/dev/null); then
  log "pyfastbayes._C is not installed here (a fresh machine): building"
  STEPS="build $STEPS"
fi
if has build; then
  t0=$(date +%s)
  # sm_90 only: the image's TORCH_CUDA_ARCH_LIST (9.0a) would add a second, identical pass (95 s, not 50)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PYFASTBAYES_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0 CUDAFLAGS="-Xptxas=-v" \
    python -m pip install --no-build-isolation --no-deps -v -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 . \
    >"$OUT/build.log" 2>&1
  rc=$?
  log "build rc=$rc in $(( $(date +%s) - t0 )) s (ptxas registers and spills per kernel: build.log)"
  [ $rc -eq 0 ] || { tail -60 "$OUT/build.log"; exit $rc; }
fi
cd /tmp  # import the installed package, not the source tree
python -c "import pyfastbayes; print(pyfastbayes.build_info())" | tee -a "$OUT/summary.txt"
# the 2026-11-27 run lost pytest workers to SIGSEGV while a refusal was thrown from _C: say where
so=$(python -c "import pyfastbayes._C as c; print(c.__file__)")
log "_C NEEDED: $(readelf -dW "$so" | grep -oE "\[lib(stdc\+\+|c10|cudart)[^]]*\]" | tr "\n" " ")"
log "_C: $(readelf -lW "$so" | grep -c GNU_EH_FRAME) GNU_EH_FRAME header(s); $(ldd "$so" | grep -oE "lib(cudart|gomp|stdc\+\+|gcc_s)[^ ]* => [^ ]*" | tr '\n' ' ')"
has tests && timeout 120 python "$REPO/scripts/cxx_error_probe.py" 2>&1 | tee -a "$OUT/summary.txt"

san_pid=""
if has sanitize && command -v compute-sanitizer >/dev/null; then
  ( for tool in memcheck racecheck synccheck; do  # the three at once, one log
      ( timeout "${SAN_LIMIT:-150}" compute-sanitizer --tool $tool --error-exitcode 9 \
          python "$REPO/scripts/cuda_smoke.py" >/tmp/pfb-san-$tool.log 2>&1
        echo "### $tool rc=$?" >>/tmp/pfb-san-$tool.log ) &
    done
    wait
    for tool in memcheck racecheck synccheck; do echo "### $tool"; cat /tmp/pfb-san-$tool.log; done >"$OUT/sanitize.log" ) &
  san_pid=$!
elif has sanitize; then
  log "compute-sanitizer not found: sanitizer pass skipped"
fi

xdist=""
# worksteal: a worker that runs out takes queued tests from a busy one (the -k cuda tail is a few long
# tests: torch.compile cases, the nccl example)
python -c "import xdist" 2>/dev/null && xdist="-n 14 --dist worksteal"
# SIGINT at the limit: pytest stops and still prints its summary (failures so far)
run_tests() {  # run_tests LOG LIMIT ARGS...
  local log=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -s INT -k 30 "$limit" python -m pytest -q $xdist -p no:cacheprovider -rfE --durations=15 "$@" >"$log" 2>&1
  log "tests $* rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E "passed|failed|error" "$log" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$log" | head -40 | tee -a "$OUT/summary.txt"
}
has tests && run_tests "$OUT/tests-cuda.log" "${TEST_LIMIT:-200}" -k "${CUDA_K:-cuda}" "$REPO/tests"

if [ -n "$san_pid" ]; then
  wait "$san_pid"
  log "sanitizers: $(grep -E "^### .* rc=|ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log" | tr '\n' ' ')"
  grep -E "cuda_smoke:|Error|error" "$OUT/sanitize.log" | head -12
fi

if has bench; then
  t0=$(date +%s)
  suites=${BENCH_ONLY:-$(cd "$REPO/bench" && ls bench_*.py | sed 's/^bench_//; s/\.py$//' | paste -sd, -)}
  others=$(tr , '\n' <<<"$suites" | grep -vxE "laplace|vi" | paste -sd, -)
  : >"$OUT/bench.txt"
  if [ -n "$others" ]; then
    (cd "$REPO" && PFB_BENCH_COMPILE=0 timeout "${BENCH_LIMIT:-300}" python bench/run.py --device cuda $QUICK \
        --only "$others" --json "$OUT/bench.json") >>"$OUT/bench.txt" 2>&1
    log "bench rc=$? in $(( $(date +%s) - t0 )) s"
  fi
  # laplace and vi run apart, --quick, each under its own limit: a full run refuses to start without
  # its peer (laplace-torch / bayesian-torch, installed above from the carried wheels), which would
  # stop the suites after it. On CUDA bench_vi's --quick keeps the full MNIST MLP at batch 128.
  for apart in laplace:${LAPLACE_LIMIT:-120} vi:${VI_LIMIT:-90}; do
    name=${apart%%:*} limit=${apart#*:}
    [[ ",$suites," == *",$name,"* ]] || continue
    t0=$(date +%s)
    rm -f "/tmp/pfb-bench-$name.json"
    (cd "$REPO" && timeout "$limit" python bench/run.py --device cuda --quick --only "$name" \
        --json "/tmp/pfb-bench-$name.json") >>"$OUT/bench.txt" 2>&1
    log "bench $name (--quick) rc=$? in $(( $(date +%s) - t0 )) s"
    python - "$OUT/bench.json" "/tmp/pfb-bench-$name.json" <<'PY'
import json, os, sys
out, add = sys.argv[1:]
if os.path.exists(add):  # the suite's rows join the others' in bench.json
    new = json.load(open(add))
    d = json.load(open(out)) if os.path.exists(out) else {"device": new["device"], "rows": []}
    d["rows"] += new["rows"]
    json.dump(d, open(out, "w"), indent=1)
PY
  done
  grep -vE "Warning|warn" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
fi
if has ncu && command -v ncu >/dev/null; then  # the kernels that missed their targets, profiled
  t0=$(date +%s)
  timeout "${NCU_LIMIT:-90}" ncu --kernel-name regex:"swag_sample_kernel|calibration_bins_kernel" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      python "$REPO/scripts/ncu_targets.py" >"$OUT/ncu.txt" 2>&1
  log "ncu rc=$? in $(( $(date +%s) - t0 )) s (ncu.txt)"
fi
if has tests; then
  left=$(( DEADLINE - ($(date +%s) - T_START) ))
  if [ $left -gt 30 ]; then run_tests "$OUT/tests-rest.log" $left -k "not cuda" "$REPO/tests"
  else log "no time left for the rest of the suite (DEADLINE=$DEADLINE)"; fi
fi
log "done"
