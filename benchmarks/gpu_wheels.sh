#!/usr/bin/env bash
# Build .whl/: the wheels benchmarks/gpu_check.sh installs on a GPU machine whose image may lack
# them (pytest, pytest-benchmark, fvcore, PyYAML, Pillow and their dependencies), at the exact versions
# pinned in requirements.txt, for that machine's CPython (x86-64 Linux). Run through
# `make gpu-wheels [GPU_PYTHON=3.12]`; the folder must stay within 64 MiB.
#
#   bash benchmarks/gpu_wheels.sh PYTHON_VERSION DIR NAME...
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=$1 DIR=$2
shift 2
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
rm -rf "$DIR"
mkdir -p "$DIR"
for name in "$@"; do
  pin=$(grep -i -m1 "^${name}==" requirements.txt) || {
    echo "gpu_wheels.sh: requirements.txt pins no version of $name (a line '$name==VERSION' is needed)" >&2; exit 1; }
  # a wheel for that Python and platform where PyPI has one (pure-Python wheels fit any) ...
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DIR" "$pin" 2> /dev/null; then
    # ... else a wheel built here from the source release (pure-Python packages only)
    "$PY" -m pip wheel -q --no-deps -w "$DIR" "$pin"
    built=$(ls "$DIR" | grep -i "^$(echo "$name" | tr '-' '_')-" || true)
    case "$built" in
      *-none-any.whl) ;;
      *) echo "gpu_wheels.sh: $pin has no wheel for CPython $PYVER x86-64 and is not pure Python ($built)" >&2; exit 1 ;;
    esac
  fi
done
size=$(du -sb "$DIR" | cut -f1)
echo "$DIR: $(ls "$DIR" | wc -l) wheels, $((size / 1024)) KiB"
if [ "$size" -gt "$LIMIT" ]; then
  echo "gpu_wheels.sh: $DIR holds $size bytes, over the 64 MiB a GPU machine's working tree may carry" >&2
  exit 1
fi
