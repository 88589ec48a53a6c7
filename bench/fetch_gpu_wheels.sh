#!/usr/bin/env bash
# Downloads the wheels tools/gpu_check.sh installs on the GPU machine (which
# has no package registry): liger-kernel (the Liger fused-JSD baseline) and
# flashinfer-python (the sampling baseline). Run it on a machine that reaches
# PyPI; bench/wheels is git-ignored and travels to the GPU machine as a carried
# path. The GPU machine runs Python 3.12; both wheels are pure Python.
#
#   bash bench/fetch_gpu_wheels.sh            # latest versions
#   LIGER=liger-kernel==0.8.5 bash bench/fetch_gpu_wheels.sh
#   FLASHINFER=none bash bench/fetch_gpu_wheels.sh   # liger only
#
# Size: liger-kernel is ~1 MB, flashinfer-python ~62 MB (0.7.2); a `run`
# carries at most 64 MiB in all, so carry nothing else big alongside.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=bench/wheels
mkdir -p "$DEST"
for spec in "${LIGER:-liger-kernel}" "${FLASHINFER:-flashinfer-python}"; do
  [ "$spec" = none ] && continue
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$spec"
done
ls -l "$DEST"
