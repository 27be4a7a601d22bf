#!/usr/bin/env bash
# CUDA checks for a machine without a GPU, against the CUDA build of torch (a venv at .venv-cuda,
# or $PFB_CUDA_VENV):
#  1. compile every CUDA source for sm_90 with nvcc against torch's headers and the CUDA headers
#     its nvidia-* wheels ship (needs nvcc on PATH). Any error fails.
#  2. unless PFB_SKIP_CUDA_TORCH_BUILD=1: `pip install --no-build-isolation .` against that CUDA
#     torch with PYFASTBAYES_CUDA=AUTO must give a working CPU-only build and say why;
#  3. and with PYFASTBAYES_CUDA=ON (against the wheels' CUDA headers) a full CUDA build that
#     compiles, links and, on import, registers the CUDA kernels (and the sparse-input refusal
#     under SparseCUDA) of every op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${PFB_CUDA_VENV:-.venv-cuda}")
if ! command -v nvcc >/dev/null; then
  echo "cuda_checks: nvcc not found" >&2
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

if [ "${PFB_SKIP_CUDA_TORCH_BUILD:-0}" != 1 ]; then
  echo "AUTO build against torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'):"
  "$VENV/bin/python" -m pip install -q scikit-build-core pybind11 ninja numpy tqdm
  log=$(mktemp)
  # its own build folder: objects compiled against another torch must never be reused
  if ! PYFASTBAYES_CUDA=AUTO "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps \
      -C build-dir=build/cuda-torch-check . >"$log" 2>&1; then
    tail -40 "$log"
    exit 1
  fi
  grep -E "pyfastbayes: building" "$log" | sed 's/^ */  /'
  (cd / && "$VENV/bin/python" -c "
import pyfastbayes, torch
info = pyfastbayes.build_info()
assert info['native'] and not info['cuda'], info
p = torch.nn.Parameter(torch.zeros(8)); p.grad = torch.ones(8)
pyfastbayes.optim.SGLD([p], lr=1e-2, num_data=1).step()
print('  imports and steps:', info)")

  echo "ON build (CUDA kernels compiled and linked against the wheels' CUDA headers):"
  if ! PYFASTBAYES_CUDA=ON "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps \
      -C build-dir=build/cuda-on-check . >"$log" 2>&1; then
    grep -E "error|Error" "$log" | head -40
    exit 1
  fi
  rm -f "$log"
  (cd / && "$VENV/bin/python" -c "
import pyfastbayes, torch
info = pyfastbayes.build_info()
assert info['native'] and info['cuda'] and '90' in info['cuda_archs'].split(','), info
ops = sorted({n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('pyfastbayes::')})
assert len(ops) >= 19, ops
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f'pyfastbayes::{n}', 'CUDA')]
assert not missing, f'ops without a CUDA kernel: {missing}'
dense_only = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f'pyfastbayes::{n}', 'SparseCUDA')]
assert not dense_only, f'ops without the sparse-input refusal on CUDA: {dense_only}'
print('  CUDA kernels registered for', len(ops), 'ops:', info)")
fi
