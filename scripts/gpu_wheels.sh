#!/usr/bin/env bash
# Fill .whl/ (gitignored) with the wheels scripts/gpu_check.sh installs on a GPU machine that has no package index:
#   bash scripts/gpu_wheels.sh [DEST]    DEST defaults to .whl; PYTHON (default python3) runs pip
# Run it where pip reaches an index. What it fetches is what qmiss needs (its dependencies and the test and bench
# extras, import-linter aside) and the lent GPU image lacks: that image has Python 3.12 with CUDA torch 2.11,
# transformers 5.17, accelerate, peft, pytest, numpy, pandas, pyarrow, requests, pyyaml, tqdm, xxhash, fsspec,
# psutil, jinja2, matplotlib and huggingface_hub, and no bitsandbytes, trl, datasets or gguf. Of those four's own
# requirements, datasets' dill and multiprocess are not in the image either; the rest are. Each comes at its
# version in constraints.txt (the tested lock), built for CPython 3.12 on manylinux x86_64, without dependencies
# (--no-deps: the list below is the whole set). Old wheels in DEST are removed first: two versions of one package
# would stop the install. Fails if the wheels exceed 60 MiB (the working tree travels to the GPU machine within
# 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PACKAGES=(bitsandbytes trl datasets gguf dill multiprocess)
LIMIT_MIB=60

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "gpu_wheels: $name is not in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# manylinux_2_24: bitsandbytes 0.50's tag; pip matches each glibc version exactly, so several are named.
"${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${pins[@]}"
total=0
for wheel in "$DEST"/*.whl; do
  size=$(stat -c %s "$wheel")
  total=$((total + size))
  awk -v s="$size" -v n="$(basename "$wheel")" 'BEGIN { printf "gpu_wheels: %6.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" -v d="$DEST" -v l="$LIMIT_MIB" 'BEGIN { printf "gpu_wheels: %6.2f MiB in %s (limit %d MiB)\n", s / 1048576, d, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: over $LIMIT_MIB MiB: the working tree would not travel" >&2
  exit 1
fi
