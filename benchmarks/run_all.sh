#!/usr/bin/env bash
# Set up (venv, qmiss with the benchmark extras) and run the benchmarks, then rebuild RESULTS.md.
#   bash benchmarks/run_all.sh                              # all; about 50 minutes on a 2-core CPU (bench_dpo 10 of them)
#   bash benchmarks/run_all.sh --bat                        # also bench_bat.py (7B-layer bat study, about 10 more minutes)
#   bash benchmarks/run_all.sh --only bench_long_context    # one benchmark (its extra arguments after its name)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh bench | tail -n 1)
if [ "${1:-}" = "--only" ]; then
  name="${2:?--only needs a benchmark name, e.g. bench_long_context}"
  shift 2
  script="benchmarks/${name%.py}.py"
  [ -f "$script" ] || { echo "run_all.sh: no benchmark $script; see benchmarks/bench_*.py" >&2; exit 2; }
  "$PY" "$script" "$@"
  "$PY" benchmarks/report.py
  exit 0
fi
"$PY" benchmarks/bench_plan.py
"$PY" benchmarks/bench_long_context.py
"$PY" benchmarks/bench_compare.py
"$PY" benchmarks/bench_dtype_flow.py
"$PY" benchmarks/bench_convergence.py
"$PY" benchmarks/bench_export.py
"$PY" benchmarks/bench_dpo.py
"$PY" benchmarks/bench_packing.py
if [ "${1:-}" = "--bat" ]; then
  "$PY" benchmarks/bench_bat.py
fi
"$PY" benchmarks/report.py
