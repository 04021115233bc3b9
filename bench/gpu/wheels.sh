#!/usr/bin/env bash
# Run HERE (a machine with the package registry), once, before a GPU session's device run: downloads into .whl/
# (git-ignored) the Python 3.12 wheels of what this library needs and the device machine's image lacks (its
# package list: /work/.library/device/KINDS.md; it has torch, torchvision, timm, pandas, seaborn, safetensors,
# psutil, filelock, tqdm, scikit-learn, scikit-image, tabulate). The versions are those of this checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in open_clip_torch ftfy wcwidth submitit mlxtend platformdirs; do
    packages+=("$name==$(version "$name")")
done
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${packages[@]}"
ls -l .whl
du -sh .whl
