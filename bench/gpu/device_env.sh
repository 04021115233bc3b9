#!/usr/bin/env bash
# A CPU stand-in for the device machine's Python environment, to check evidence.sh against the library versions it
# will meet there before any device time is spent: the device image has torch 2.11.0, torchvision 0.26.0,
# safetensors 0.8.0 and transformers 5.17.0 (/work/.library/device/KINDS.md), where this checkout's .venv pins
# torch 2.14.1. Installs them from PyPI (torch 2.11.0 with its CUDA libraries, about 5 GB; they load without a GPU)
# into a virtual environment, then the wheels evidence.sh carries (bench/gpu/wheels.sh first), then runs evidence.sh's
# dry run with that interpreter.
#
#   bash bench/gpu/wheels.sh && bash bench/gpu/device_env.sh [VENV]      (VENV defaults to /tmp/device-env)
#
# The device runs Python 3.12; this uses the machine's python3 (3.11 here), and numpy/pandas at their newest releases
# for it. It checks the library's calls against those versions, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-/tmp/device-env}
[ -d .whl ] || { echo "no .whl/ folder: run bash bench/gpu/wheels.sh first"; exit 1; }
python3 -m venv "$VENV"
# this machine's pip constraint file caps torch for .venv; the stand-in names its own versions
export PIP_CONSTRAINT=
"$VENV/bin/pip" install --quiet --progress-bar off torch==2.11.0 torchvision==0.26.0 safetensors==0.8.0 \
    transformers==5.17.0 numpy pandas matplotlib seaborn scikit-learn scikit-image scipy tqdm pillow timm \
    huggingface_hub psutil tabulate filelock
"$VENV/bin/pip" install --quiet --no-deps .whl/*.whl
"$VENV/bin/python" -c "import torch, numpy, pandas, open_clip; print('torch', torch.__version__, 'numpy', \
numpy.__version__, 'pandas', pandas.__version__, 'open_clip', open_clip.__version__)"
# the dry run's steps with four times their caps, so that each finishes on 2 CPU cores (519 s on AMD EPYC)
DEVICE=cpu SCALE=0.0002 ITERATIONS=1 MEMORY_PRESET=clip-vit-b-32 MEMORY_TASKS=1 BASE_PRESET=smoke CAP_SCALE=4 \
    BUDGET=2400 OUT=${OUT:-/tmp/evidence-device-env} PYTHON="$VENV/bin/python" bash bench/gpu/evidence.sh
