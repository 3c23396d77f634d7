#!/usr/bin/env bash
# The GPU check: on a CUDA machine without network (Python 3.12 with torch and torchvision, no
# rasterio/pyogrio/shapely/geopandas), install geodet and its missing dependencies from cp312
# wheels carried in WHEELS (default gpu_wheels/, git-ignored), then run benchmarks/gpu_check.py
# and print its JSON (also written to $OUT/gpu_check.json when $OUT is set).
#
# Prepare the wheels on a machine with the package index. The GDAL-bundling wheels are large:
# with the pinned releases below (the smallest that run with numpy 2) the folder is 73 MB =
# 70 MiB (rasterio 21 MB, pyogrio 22, pandas 12, pyproj 8), over a 64 MiB carry limit; without
# pandas (--no-pandas, for a machine that has it) it is 61 MB = 58 MiB:
#   bash benchmarks/gpu_check.sh --prepare [WHEELS]
# Run (from the repository root):
#   bash benchmarks/gpu_check.sh [WHEELS] [-- extra gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
# what the GPU check imports (no pyarrow, onnxruntime or onnx: it runs the torch backend)
DEPS="rasterio shapely pyogrio geopandas pyproj pandas pyyaml tqdm faster-coco-eval"
PINNED="rasterio==1.3.11 pyogrio==0.9.0 pyproj==3.6.1 pandas==2.2.3 shapely geopandas pyyaml tqdm faster-coco-eval"
if [ "${1:-}" = "--prepare" ]; then
  W="${2:-gpu_wheels}"
  mkdir -p "$W"
  pip download --dest "$W" --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 $PINNED
  # the machine's own numpy and torch stack stay; geodet runs from the checkout (PYTHONPATH)
  rm -f "$W"/numpy-* "$W"/torch-* "$W"/nvidia_* "$W"/triton-* "$W"/setuptools-* "$W"/wheel-*
  [ "${3:-}" = "--no-pandas" ] && rm -f "$W"/pandas-*
  du -sh "$W"
  exit 0
fi
W="${1:-gpu_wheels}"
[ "${1:-}" != "" ] && shift
[ "${1:-}" = "--" ] && shift
VENV="${TMPDIR:-/tmp}/geodet-gpu-venv"
python3 -m venv --system-site-packages "$VENV"   # keeps the machine's torch, torchvision and numpy
. "$VENV/bin/activate"
if [ -d "$W" ]; then
  pip install -q --no-index --find-links "$W" $DEPS
else
  echo "gpu_check: no wheel folder $W; installing from the package index" >&2
  pip install -q $DEPS
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # geodet from this checkout, nothing to build
python -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
exec python benchmarks/gpu_check.py --workdir "${TMPDIR:-/tmp}/gpu-check-work" "$@"
