#!/usr/bin/env bash
# The prepared GPU verification run: scripts/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]
#
# On a bare H100/H200 image (torch 2.11, triton 3.6, no package index): installs the wheels in .whl/ (fetch them
# beforehand with scripts/fetch_gpu_wheels.sh and carry .whl), makes fastdiff importable from this checkout without
# installing it, then runs scripts/gpu_check.py's stages in priority order within about 8 minutes. On the device:
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=560)
# --dry-run checks the script's own plumbing on a CPU (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [--dry-run]}"
shift
mkdir -p "$OUT"
SITE="${TMPDIR:-/tmp}/fastdiff-gpu-site"
mkdir -p "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "gpu_check: installing .whl/ failed; the stages that need those packages will say so"
fi
# fastdiff from this checkout, as an install would lay it out: its kernels import as fastdiff_kernels (pyproject maps
# the folder kernels/ to that name), and the checkout's root stays off the path (kernels/ would shadow the name
# `kernels`, which bitsandbytes looks up)
ln -sfn "$PWD/fastdiff" "$SITE/fastdiff"
ln -sfn "$PWD/kernels" "$SITE/fastdiff_kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$OUT" "$@"
