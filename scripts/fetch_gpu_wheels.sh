#!/usr/bin/env bash
# The GPU machine has torch, nvcc and scikit-build-core but no network: download (here) the few
# wheels its test run needs into .gpu-wheels/ (git-ignored, < 64 MiB), and pass
# carry=[".gpu-wheels"] to the device tool; bench/gpu_check.sh installs them offline.
# pytest-xdist spreads the test run over the cores there; posteriors, torchmetrics, bayesian-torch and
# laplace-torch (with its backends) are the peers of the GPU benchmarks. Tests whose optional peers are absent there (sklearn, matplotlib, ...) skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PFB_GPU_PYTHON_VERSION:-3.12}
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
python3 -m pip download -q --only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d .gpu-wheels \
  pytest pluggy iniconfig packaging numpy tqdm pytest-xdist execnet \
  posteriors==0.1.3 torchopt==0.7.3 graphviz optree tensordict cloudpickle pyvers typing-extensions \
  torchmetrics lightning-utilities \
  bayesian-torch==0.5.0 \
  laplace-torch==0.3 asdfghjkl==0.1a4 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 \
  einops einconv==0.1.0 linear-operator==0.6.1 opt-einsum scipy loss-landscapes
du -sh .gpu-wheels
# the peers of bench_vi (bayesian-torch), bench_laplace (laplace-torch and its backends, scipy) and
# bench_landscape (loss-landscapes; scikit-learn would not fit: the bench falls back to random digits):
# the carry limit is 64 MiB; scipy is the largest of them
[ "$(du -sb .gpu-wheels | cut -f1)" -lt $((63 * 1024 * 1024)) ] || { echo ".gpu-wheels exceeds the 64 MiB carry limit" >&2; exit 1; }
