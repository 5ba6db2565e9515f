#!/usr/bin/env bash
# The GPU checks in one command, for a machine with no package index (the lent GPU machine) as for your own:
#   bash scripts/gpu_check.sh [--layers N] [PYTEST_ARGS...]
# 1. If nvidia-smi is missing or lists no GPU: says "no GPU", checks nothing, exits 0.
# 2. Python: $QMISS_PYTHON, else the active venv's, else python3; it must hold torch (never installed here).
#    nvidia-smi lists a GPU and that torch sees none (a CPU-only build, CUDA_VISIBLE_DEVICES, a driver too old
#    for the build): exits 1, saying which.
# 3. scripts/gpu_env.py installs the wheels carried in .whl/ (or $QMISS_WHEELS; filled by scripts/gpu_wheels.sh)
#    that this Python lacks, with pip --no-index --no-deps into $QMISS_GPU_SITE (default /tmp/qmiss-gpu-site, put
#    on PYTHONPATH), and exits 1 naming whatever qmiss still misses.
# 4. `pytest -m gpu -q PYTEST_ARGS`; failing tests fail the script before any benchmark runs.
# 5. benchmarks/bench_gpu.py --layers N (default 8: a Llama-2-7B-shaped slice whose seven adapter variants fit a
#    24 GB card; then the chunked loss at a 128k vocabulary and FSDP2 in one process), which writes
#    benchmarks/results/bench_gpu.md section by section; its exit status is the script's.
# With $OUT set, the test log and bench_gpu.md (as far as the bench wrote it) are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=8
if [ "${1:-}" = "--layers" ]; then
  LAYERS=$2
  shift 2
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no GPU: nvidia-smi is not on this machine; nothing was checked"
  exit 0
fi
listing=$(nvidia-smi -L 2>&1) || true
gpus=$(grep '^GPU ' <<<"$listing" || true)
if [ -z "$gpus" ]; then
  echo "gpu_check: no GPU: nvidia-smi lists none (${listing:-no output}); nothing was checked"
  exit 0
fi

if [ -n "${QMISS_PYTHON:-}" ]; then
  PY=$QMISS_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=$VIRTUAL_ENV/bin/python
else
  PY=python3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY has no torch; this script never installs torch: run it with the Python that holds the" \
       "CUDA build (QMISS_PYTHON=...)" >&2
  exit 1
fi
GPUS=$gpus "$PY" - <<'EOF'
import os, sys, torch
if torch.cuda.is_available():
    print(f"gpu_check: torch {torch.__version__} sees {torch.cuda.device_count()} CUDA GPU(s): "
          f"{torch.cuda.get_device_name(0)}")
    sys.exit(0)
build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
print(f"gpu_check: nvidia-smi lists a GPU but torch {torch.__version__} ({build}, {sys.executable}) sees none"
      + (f"; CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else "") + ". nvidia-smi:\n" + os.environ["GPUS"],
      file=sys.stderr)
sys.exit(1)
EOF

"$PY" scripts/gpu_env.py "${QMISS_WHEELS:-.whl}" "${QMISS_GPU_SITE:-/tmp/qmiss-gpu-site}"
export PYTHONPATH="${QMISS_GPU_SITE:-/tmp/qmiss-gpu-site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"

start=$SECONDS
"$PY" -m pytest -m gpu -q "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check_tests.log"
echo "gpu_check: GPU tests took $((SECONDS - start)) s"
start=$SECONDS
stamp=$(mktemp)
status=0
"$PY" benchmarks/bench_gpu.py --layers "$LAYERS" || status=$?
echo "gpu_check: bench_gpu.py --layers $LAYERS took $((SECONDS - start)) s, exit status $status"
# what the bench wrote before a failure is worth having too (it writes each section as it is measured)
if [ -n "${OUT:-}" ] && [ benchmarks/results/bench_gpu.md -nt "$stamp" ]; then
  cp benchmarks/results/bench_gpu.md "$OUT/"
fi
rm -f "$stamp"
exit $status
