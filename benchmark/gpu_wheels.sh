#!/usr/bin/env bash
# Wheels for benchmark/gpu_check.sh --wheels DIR on a GPU machine without network (Python 3.12, x86-64) whose image
# already has torch, accelerate, tokenizers, numpy, pyarrow, pandas, rich, huggingface-hub, safetensors, regex,
# absl-py, six, psutil, ninja, einops, msgpack, py-cpuinfo (as common CUDA images do), but not the rest of
# requirements.txt. Run on a machine with PyPI, in the project's environment (requirements.txt installed: the
# versions of the dependencies below are read from it), then carry DIR to the GPU machine:
#
#   bash benchmark/gpu_wheels.sh [DIR]        # default DIR: wheels/gpu (about 25 MB)
set -eu
cd "$(dirname "$0")/.."
dir=${1:-wheels/gpu}
PY=${PYTHON:-python}
mkdir -p "$dir"
pinned() {  # NAME==VERSION as requirements*.txt pin it
  grep -h -E "^$1==" requirements.txt requirements-trl.txt | head -1
}
installed() {  # NAME==VERSION as installed here (the dependencies pip resolved for requirements.txt)
  "$PY" -c "import sys, importlib.metadata as m; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"
}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the project's pins (transformers too: images often carry an older one), then what they need beyond such an image
"$PY" -m pip download -q --no-deps "${platform[@]}" -d "$dir" \
  "$(pinned transformers)" "$(pinned datasets)" "$(pinned tyro)" "$(pinned trl)" \
  "$(installed dill)" "$(installed multiprocess)" "$(installed docstring-parser)" "$(installed typeguard)" \
  "$(installed hjson)" "$(installed pydantic)" "$(installed pydantic-core)" "$(installed annotated-types)" \
  "$(installed typing-inspection)" "$(installed nltk)"
# published as source only: built here. Both are pure Python (DeepSpeed compiles its ops at run time, if ever).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$(pinned deepspeed)" "$(pinned rouge-score)"
ls -l "$dir"
echo "carry $dir to the GPU machine, then: bash benchmark/gpu_check.sh --wheels $dir"
