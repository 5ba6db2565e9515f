#!/usr/bin/env bash
# The GPU checks in one command: set up (see setup.sh; an existing CUDA torch is left alone) with the test and
# benchmark extras, then, if torch sees a CUDA GPU, the GPU-marked tests (`pytest -m gpu`; extra arguments go to
# pytest) and benchmarks/bench_gpu.py, which writes benchmarks/results/bench_gpu.md. Failing tests fail the script
# before any benchmark runs. Without a CUDA GPU it says so in one line, checks nothing and exits 0 (without an
# NVIDIA driver at all, before any set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /proc/driver/nvidia/version ]; then
  echo "gpu_check: no NVIDIA driver on this machine; nothing was checked"
  exit 0
fi
PY=$(bash scripts/setup.sh test,bench | tail -n 1)
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  version=$("$PY" -c 'import torch; print(torch.__version__)')
  echo "gpu_check: no CUDA GPU visible to torch $version; nothing was checked"
  exit 0
fi
"$PY" -m pytest -m gpu -q "$@"
"$PY" benchmarks/bench_gpu.py
