#!/usr/bin/env bash
# The whole demo pipeline (examples/Makefile) with every stage on a GPU: --device cuda.
#
#   scripts/gpu-smoke.sh                 # smallest settings (SMOKE=1) into ./gpu-demo-out
#   SMOKE= OUT=/scratch/demo scripts/gpu-smoke.sh    # the full demo
#
# Needs torch with CUDA and a visible device; it stops with one line before any work when
# there is none. Not run where orstack is developed (a CPU-only machine): what is tested there
# is the same pipeline on the CPU (tests/test_examples.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
orstack="${ORSTACK:-orstack}"
out="$(realpath -m "${OUT:-gpu-demo-out}")"

"$python" - <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu-smoke: torch is not installed")
if not torch.cuda.is_available():
    sys.exit(f"gpu-smoke: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
print(f"gpu-smoke: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
PY

make -C "$here/../examples" demo SMOKE="${SMOKE-1}" PYTHON="$python" ORSTACK="$orstack --device cuda" OUT="$out"
