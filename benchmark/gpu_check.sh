#!/usr/bin/env bash
# The checks that need a GPU, on one GPU in under 8 minutes, ending in one table (benchmark/gpu_check.py says which).
#
#   bash benchmark/gpu_check.sh                          # the project's requirements installed
#   bash benchmark/gpu_check.sh --wheels wheels/gpu      # a bare GPU machine without network: install carried wheels
#   bash benchmark/gpu_check.sh --checks ratio           # any gpu_check.py flag after the optional --wheels DIR
#
# --wheels DIR installs DIR/*.whl (made by benchmark/gpu_wheels.sh on a machine with network) into a private folder
# ($GPU_CHECK_SITE, default /tmp/gpu_check_site) put first on PYTHONPATH; the machine's own torch stays in use.
# Exit status 0 when every check passed. Results: the table, runs/gpu_check/gpu_check.json, runs/gpu_check/logs/.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--wheels" ]; then
  dir=${2:?--wheels needs a folder}
  shift 2
  ls "$dir"/*.whl > /dev/null 2>&1 || { echo "gpu_check.sh: no .whl files in $dir" >&2; exit 2; }
  site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dir"/*.whl \
    || { echo "gpu_check.sh: installing the wheels of $dir into $site failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# every check inside has its own timeout and the whole has a 470 s budget, so the table always comes
exec "$PY" benchmark/gpu_check.py --python "$PY" "$@"
