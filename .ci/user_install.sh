#!/usr/bin/env bash
# A user's own torch 2 environment: a clean venv holding only the small CPU
# torch==2.13.0 (no torchvision), setuptools and wheel; fusion built there as a
# wheel from a fresh clone of this repository with --no-build-isolation,
# installed, and a model made of torch.nn fused and checked.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

git clone -q "$repo" "$work/fusion"
"$python" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -q torch==2.13.0 setuptools wheel > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
(cd "$work/fusion" && $pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .) \
    > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
$pip install -q --no-deps "$work"/dist/fusion-*.whl > "$work/pip.log" 2>&1 \
    || { cat "$work/pip.log"; exit 1; }
$pip list 2>/dev/null | grep -iE '^(torch|torchvision|fusion) '

cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch
from torch import nn

import fusion
from fusion import fuse

assert "torchvision" not in [m.split(".")[0] for m in __import__("sys").modules]
assert fusion._C.torch_version == torch.__version__.split("+")[0]
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                      nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2), nn.BatchNorm2d(8),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10))
model.train()
with torch.no_grad():
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))
model.eval()
x = torch.randn(4, 3, 8, 8)
fused, report = fuse(model, example_inputs=x, return_report=True)
with torch.no_grad():
    err = float((fused(x) - model(x)).norm() / model(x).norm())
assert len(report.fused) == 3 and not report.left, report
assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
assert err < 1e-5, err
print(f"user install: fusion on torch {torch.__version__} fused {len(report.fused)} "
      f"norms, rel_err {err:.1e}")
PY
