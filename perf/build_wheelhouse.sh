#!/usr/bin/env bash
# Build .whl/ (git-ignored): the wheels perf/gpu_check.sh installs offline on a bare GPU machine whose image has
# torch, triton, transformers, peft, accelerate, safetensors, numpy, yaml, tqdm, matplotlib and pynvml but not
# diffusers or webdataset (the device README's package list). Only what the checks import; a few MB.
#
#   bash perf/build_wheelhouse.sh            # Python 3.12 x86-64 wheels, the GPU image's Python
#   PYVER=3.11 bash perf/build_wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PIP=${PIP:-python3 -m pip}
# diffusers and what it needs beyond the image; webdataset and its one dependency. Versions as constraints.txt.
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 webdataset==1.0.2 braceexpand==0.1.7)
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${WHEELS[@]}"
du -sh .whl && ls .whl
