#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index, which benchmarks/gpu_check.sh then
# installs with pip --no-index:
#
#   bash benchmarks/gpu_wheels.sh [DEST]        (default DEST: .whl, which git ignores)
#
# The packages are those probekit needs that the GPU image lacks (its own torch, transformers,
# accelerate... are used as they are), at the versions this checkout's .venv has (what CI tested),
# built for CPython $PY_VERSION (default 3.12) on x86-64 Linux. Override the list with PACKAGES.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
PACKAGES="${PACKAGES:-pydantic pydantic-core annotated-types typing-inspection typing-extensions}"
LOCAL="${LOCAL_PYTHON:-$ROOT/.venv/bin/python}"

specs=()
for name in $PACKAGES; do
    version="$("$LOCAL" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)"
    specs+=("$name${version:+==$version}")
done
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${specs[@]}"
echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)): ${specs[*]}"
