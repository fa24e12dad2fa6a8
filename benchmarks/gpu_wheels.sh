#!/usr/bin/env bash
# Download, here (with PyPI), the wheels the GPU machine's image lacks, into .whl/ (ignored by git) for
# benchmarks/gpu_check.sh, which installs them there: timm at our pinned version (the image's is older) and fvcore with
# what it needs. Python 3.12 on x86-64 manylinux: the device image's python3 (the device tool's README).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | cut -d= -f3; }
mkdir -p .whl
for pkg in timm fvcore iopath yacs termcolor; do
    v=$(pin "$pkg")
    if [ "$pkg" = fvcore ] || [ "$pkg" = iopath ]; then  # pure Python, published as source: build a wheel here
        python3 -m pip wheel -q --no-deps -w .whl "$pkg==$v"
    else
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg==$v"
    fi
done
ls .whl
