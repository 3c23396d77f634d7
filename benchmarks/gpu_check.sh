#!/usr/bin/env bash
# The GPU check: on a CUDA machine without network (Python 3.12 with torch and torchvision, no
# rasterio/pyogrio/shapely/geopandas), make geodet's missing dependencies importable from a
# carried archive, then run benchmarks/gpu_check.py and print its JSON (also written to
# $OUT/gpu_check.json when $OUT is set, after every measurement).
#
# Prepare the archive on a machine with the package index (Python and platform chosen by flags,
# so any machine will do):
#   bash benchmarks/gpu_check.sh --prepare [DIR]          # default DIR gpu_wheels/ (git-ignored)
# It downloads cp312 manylinux wheels, unpacks the ones such a machine lacks (rasterio, pyogrio,
# pyproj, shapely, geopandas, faster-coco-eval and their small helpers) into site/ and the ones it
# usually has (numpy, pandas, pyyaml, tqdm, ...) into common/, used only where one is missing,
# and packs both with xz -9: the wheels are 85 MB, but rasterio,
# pyogrio and pyproj each bundle GDAL/PROJ and proj.db, which xz's 64 MiB window shares, so
# DIR/gpu_site.tar.xz is about 51 MiB, under a 64 MiB carry limit. Nothing is pip-installed on
# the GPU machine: the archive is unpacked and put on PYTHONPATH (no venv or pip needed there).
# Run (from the repository root):
#   bash benchmarks/gpu_check.sh [DIR] [-- extra gpu_check.py flags]
#   bash benchmarks/gpu_check.sh gpu_wheels -- --budget 300   # issue 39's check: under 6 minutes in all
# (--budget bounds the measurements, scene making included; a part that would overrun is skipped
# and named in the JSON; a hang dumps its stacks and exits at budget + 90 s)
#   GPU_CHECK_RUN=benchmarks/bench_decode.py bash benchmarks/gpu_check.sh [DIR]   # another benchmark
# With no archive in DIR, the dependencies come from the package index instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the GPU check imports (no pyarrow, onnxruntime or onnx: it runs the torch backend);
# the pins are the smallest releases that run with numpy 2
PINNED="rasterio==1.3.11 pyogrio==0.9.0 pyproj==3.6.1 pandas==2.2.3 shapely geopandas pyyaml tqdm faster-coco-eval"
PY="${GPU_CHECK_PYTHON_VERSION:-3.12}"
if [ "${1:-}" = "--prepare" ]; then
  W="${2:-gpu_wheels}"
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  mkdir -p "$W" "$STAGE/whl" "$STAGE/site" "$STAGE/common"
  pip download -q --dest "$STAGE/whl" --python-version "$PY" --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 $PINNED numpy
  for w in "$STAGE"/whl/*.whl; do
    case "$(basename "$w")" in
      torch-*|nvidia_*|triton-*|setuptools-*|wheel-*) continue ;;  # the machine's own stack stays
      rasterio-*|pyogrio-*|pyproj-*|shapely-*|geopandas-*|faster_coco_eval-*|affine-*|cligj-*|click_plugins-*|snuggs-*)
        dest="$STAGE/site" ;;
      *) dest="$STAGE/common" ;;  # numpy, pandas, pyyaml, tqdm, ...: the machine's own copies win
    esac
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$dest"
  done
  tar -C "$STAGE" -cf - site common | xz -9e -T2 > "$W/gpu_site.tar.xz.tmp"
  mv "$W/gpu_site.tar.xz.tmp" "$W/gpu_site.tar.xz"
  du -sh --apparent-size "$STAGE/whl" "$W/gpu_site.tar.xz"
  size=$(stat -c %s "$W/gpu_site.tar.xz")
  if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu_check: $W/gpu_site.tar.xz is over 64 MiB" >&2
    exit 1
  fi
  exit 0
fi
W="${1:-gpu_wheels}"
[ "${1:-}" != "" ] && shift
[ "${1:-}" = "--" ] && shift
WORK="${TMPDIR:-/tmp}/geodet-gpu-check"
mkdir -p "$WORK"
EXTRA=""
if [ -f "$W/gpu_site.tar.xz" ]; then
  t0=$(date +%s)
  rm -rf "$WORK/site" "$WORK/common"
  if command -v xz >/dev/null; then
    xz -dc -T0 "$W/gpu_site.tar.xz" | tar -C "$WORK" -xf -
  else
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" "$W/gpu_site.tar.xz" "$WORK"
  fi
  EXTRA="$WORK/site"
  # the machine's numpy, pandas, pyyaml, ... (numpy the one its torch was built with) win; the
  # carried copies are used only when one of them is missing
  python3 -c "import numpy, pandas, yaml, tqdm, attr, certifi, click, dateutil, pyparsing" 2>/dev/null \
    || EXTRA="$EXTRA:$WORK/common"
  echo "gpu_check: dependencies unpacked from $W/gpu_site.tar.xz in $(( $(date +%s) - t0 )) s" >&2
else
  echo "gpu_check: no $W/gpu_site.tar.xz; installing from the package index" >&2
  python3 -m pip install -q --target "$WORK/site" $PINNED
  EXTRA="$WORK/site"
fi
# geodet from this checkout (nothing to build), then the carried dependencies
export PYTHONPATH="$(pwd):$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import sys, torch, numpy, rasterio, pyogrio, geopandas; print('gpu_check: python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'rasterio', rasterio.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)"
# GPU_CHECK_RUN names another benchmark to run with the same dependencies (e.g. bench_decode.py)
exec python3 "${GPU_CHECK_RUN:-benchmarks/gpu_check.py}" --workdir "$WORK/work" "$@"
