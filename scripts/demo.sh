#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job: `qmiss-train` with no model or data flags, a 4-bit MiSS
# fine-tune of SmolLM2-135M-Instruct on built-in arithmetic word problems. Extra arguments go to qmiss-train.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" -m qmiss.train "$@"
