#!/usr/bin/env bash
# Download the few wheels benchmarks/gpu_check.py needs on a bare GPU machine (Python 3.12, torch, lightning, timm,
# h5py, scikit-image, matplotlib; no network there) into .whl/ (ignored by git). Run it here, copy the checkout
# (with .whl/) there, and follow benchmarks/README.md ("GPU check").
#
#   bash benchmarks/gpu_wheels.sh              # PYTHON_VERSION=3.12 PLATFORM=manylinux2014_x86_64 by default
#
# monai and nibabel are pure Python (medcl's pipeline and NIfTI I/O); tensorboardX (pure) and protobuf (one abi3
# wheel) let medcl's own trainer factory keep its TensorBoard logger (without them the check builds the same
# trainer without loggers and says so). Everything else they need (numpy, packaging, torch) is in a torch +
# lightning environment. --no-deps: nothing else is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
ABI="cp${PY/./}"
PACKAGES=(${GPU_WHEELS:-"monai==1.6.1" "nibabel==5.4.2" "tensorboardX==2.6.4" "protobuf==6.33.6"})
mkdir -p "$DEST"
python -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --abi "$ABI" --abi abi3 --abi none --platform "$PLATFORM" --dest "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -n 1 | sed 's/total/total size of the wheels/'
