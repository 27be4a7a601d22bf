#!/usr/bin/env bash
# Compile every CUDA source for sm_90 with nvcc against the headers of the CUDA build of torch
# (a venv at .venv-cuda, or $PFB_CUDA_VENV) and the CUDA headers its nvidia-* wheels ship.
# Needs nvcc on PATH (no GPU). Any error fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PFB_CUDA_VENV:-.venv-cuda}
if ! command -v nvcc >/dev/null; then
  echo "cuda_compile_check: nvcc not found" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q torch==2.14.1
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
INC=(-Icsrc -I"$SP/torch/include" -I"$SP/torch/include/torch/csrc/api/include")
for d in "$SP"/nvidia/*/include; do INC+=(-I"$d"); done
out=$(mktemp -d)
mapfile -t sources < <(find csrc -name '*.cu' | sort)
echo "nvcc $(nvcc --version | tail -1): ${#sources[@]} sources"
printf '%s\n' "${sources[@]}" | xargs -P 2 -I{} sh -c \
  'nvcc -std=c++20 -arch=sm_90 --expt-relaxed-constexpr -D_GLIBCXX_USE_CXX11_ABI=1 -c "$1" -o "$2/$(basename "$1").o" $3 && echo "  ok  $1"' \
  _ {} "$out" "${INC[*]}"
rm -rf "$out"
