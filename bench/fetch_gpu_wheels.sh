#!/usr/bin/env bash
# Downloads the wheels bench/gpu_check.sh installs on the GPU machine (which
# has no package registry): liger-kernel (the Liger fused-JSD baseline) and
# flashinfer-python (the sampling baseline). Run it on a machine that reaches
# PyPI; bench/wheels is git-ignored and travels to the GPU machine as a carried
# path. The GPU machine runs Python 3.12; both wheels are pure Python.
#
#   bash bench/fetch_gpu_wheels.sh            # latest versions
#   LIGER=liger-kernel==0.6.4 bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=bench/wheels
mkdir -p "$DEST"
for spec in "${LIGER:-liger-kernel}" "${FLASHINFER:-flashinfer-python}"; do
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$spec"
done
ls -l "$DEST"
