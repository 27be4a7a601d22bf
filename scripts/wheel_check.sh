#!/usr/bin/env bash
# Build a wheel against the torch of .venv (scripts/setup.sh), install it into a fresh venv that
# has only torch, and import it there: the wheel must be self-contained.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PFB_VENV:-.venv}/bin/python
out=$(mktemp -d)
"$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$out/dist"
python3 -m venv "$out/venv"
"$out/venv/bin/python" -m pip install -q "$("$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')"
"$out/venv/bin/python" -m pip install -q "$out"/dist/pyfastbayes-*.whl
(cd "$out" && "$out/venv/bin/python" -c "
import torch, pyfastbayes
info = pyfastbayes.build_info()
assert info['native'], info
p = torch.nn.Parameter(torch.zeros(10)); p.grad = torch.ones(10)
pyfastbayes.optim.SGLD([p], lr=1e-3, num_data=1).step()
print('wheel', [f for f in __import__('os').listdir('$out/dist')], 'imports:', info)")
rm -rf "$out"
