#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh installs on a GPU machine that has no package index (the lent
# H100/H200 image has torch 2.11 + triton 3.6 but no bitsandbytes or xformers). They land in .whl/ (git-ignored)
# and travel with the checkout: carry .whl when running the check on the device.
#   bitsandbytes 0.50.2: the 8-bit AdamW we compare against (43 MB)
#   xformers 0.0.35: the attention peer (3 MB; needs torch >= 2.10)
# decord (14 MB) is left out: the GPU check reads no video, and the tree that travels is capped at 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "bitsandbytes==0.50.2" "xformers==0.0.35"
ls -la .whl
