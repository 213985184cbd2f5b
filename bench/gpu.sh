#!/usr/bin/env bash
# bench/gpu.py in one command, also on a GPU machine that has PyTorch but no network.
#   bench/gpu.sh OUT_DIR [--dry-run]   where the project does not import yet: installs the wheels in .whl/ (into
#                                      /tmp/clipscope-wheels) and the project (editable, no dependencies); then
#                                      runs bench/gpu.py, its output also kept in OUT_DIR/gpu.log
#   bench/gpu.sh --fetch-wheels        where a package index is reachable: saves into .whl/ (git-ignored, about
#                                      30 MB) the wheels of the dependencies a PyTorch image lacks, at the
#                                      versions of constraints.txt, for CPython ${GPU_PYTHON:-3.12} on x86-64 Linux
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS="open_clip_torch ftfy wcwidth braceexpand duckdb fastapi starlette pydantic pydantic_core pydantic-settings
python-dotenv annotated-types annotated-doc typing-inspection typing_extensions opentelemetry-api anyio uvicorn h11
click python-multipart setuptools"
IMPORTS="import clipscope_explorer.app.main, clipscope_explorer.precompute.job, clipscope_explorer.cli"

if [ "${1:-}" = --fetch-wheels ]; then
  platforms=""
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $tag"
  done
  # shellcheck disable=SC2086
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp $platforms -c constraints.txt -d .whl $WHEELS
fi

out=${1:?usage: bench/gpu.sh OUT_DIR [--dry-run] | bench/gpu.sh --fetch-wheels}
shift
mkdir -p "$out"
if ! "$PYTHON" -c "$IMPORTS" 2> /dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/clipscope-wheels .whl/*.whl
    export PYTHONPATH=/tmp/clipscope-wheels${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  "$PYTHON" -c "$IMPORTS" || {
    echo "bench/gpu.sh: the project does not import here (the missing module is named above): run" \
      "bench/gpu.sh --fetch-wheels where a package index is reachable and bring .whl/ along" >&2
    exit 2
  }
fi
PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py "$out" "$@" 2>&1 | tee "$out/gpu.log"
