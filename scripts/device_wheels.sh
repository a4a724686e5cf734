#!/usr/bin/env bash
# Run on the development machine, before lending a GPU machine a few minutes: fills the git-ignored .whl/ with the
# wheels the GPU machine lacks (for its Python 3.12; it has torch, torchvision, transformers, onnx, onnxruntime,
# opencv, numpy, pillow, anyio, uvloop, prometheus-client, typer, rich, pyyaml and nvidia-ml-py, and no network),
# and copies ../shared/data/images into the git-ignored .shared/. Both are carried to the GPU machine with the
# checkout, where scripts/device_check.sh installs and reads them. Versions: constraints.txt and the development
# environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl \
    ultralytics==8.4.190 ultralytics-thop==2.2.3 rapidocr-onnxruntime==1.4.4 pyclipper==1.4.0 shapely==2.2.0 \
    onnx2torch==1.5.15 pi-heif==1.4.0 watchdog==7.1.1 structlog==26.1.0 pydantic==2.14.3 pydantic-core==2.50.4 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0

rm -rf .shared
mkdir -p .shared/data
# The images the scenario reads (--source .shared/data/images), nothing else: the GPU machine builds stand-in weights.
# -L: the copy holds files, not links back to this machine.
cp -rL ../shared/data/images .shared/data/images
du -sh .whl .shared
