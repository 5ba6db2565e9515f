#!/usr/bin/env bash
# Set up (venv, qmiss with the benchmark extras) and run every benchmark, then rebuild RESULTS.md.
#   bash benchmarks/run_all.sh          # about 45 minutes on a 2-core CPU (bench_dpo about 10 of them)
#   bash benchmarks/run_all.sh --bat    # also bench_bat.py (7B-layer bat study, about 10 more minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh bench | tail -n 1)
"$PY" benchmarks/bench_plan.py
"$PY" benchmarks/bench_compare.py
"$PY" benchmarks/bench_dtype_flow.py
"$PY" benchmarks/bench_convergence.py
"$PY" benchmarks/bench_export.py
"$PY" benchmarks/bench_dpo.py
if [ "${1:-}" = "--bat" ]; then
  "$PY" benchmarks/bench_bat.py
fi
"$PY" benchmarks/report.py
