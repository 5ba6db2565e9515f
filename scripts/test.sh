#!/usr/bin/env bash
# Set up (see setup.sh), check the layering (import-linter's contracts in pyproject.toml), run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh test | tail -n 1)
"$(dirname "$PY")/lint-imports" --no-cache
exec "$PY" -m pytest -q "$@"
