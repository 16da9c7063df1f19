#!/usr/bin/env bash
# One-shot GPU run of every chapter notebook (book/0*.ipynb) on a lent GPU machine.
#
# That machine has python3 with torch (CUDA), transformers, tqdm, matplotlib, pandas and
# safetensors, but no Jupyter. The Jupyter pieces travel as wheels in .whl/notebooks/
# (git-ignored; 36 wheels, 19 MB, pure Python or cp312 manylinux) and are installed with
# --no-deps. To make that folder again (then delete packaging, typing_extensions,
# python_dateutil and tzdata from it: the machine has them, through torch and pandas):
#   python -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
#     -d .whl/notebooks nbclient nbformat ipykernel ipywidgets
# Then scripts/run_notebooks.py executes every chapter with nbclient on the default model
# (Atlas; set KN_MODEL for another), times each, checks that its `model` really sat on
# CUDA, and writes the summary to $OUT/gpu_suite.txt (one line per chapter, written as
# each finishes) and the executed notebooks to $OUT/executed/.
#
# From a session: run(command="bash scripts/gpu_suite.sh", carry=[".whl/notebooks"])
# Locally (CPU, for a dry run): OUT=/tmp/suite REQUIRE_CUDA=0 bash scripts/gpu_suite.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-$PWD/_build/gpu_suite}"
mkdir -p "$OUT"
export KN_PROGRESS=0 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1
export KN_CACHE="${KN_CACHE:-/tmp/kn_cache}"   # ROME/MEMIT statistics, computed once per run
PY="${PYTHON:-python3}"
START=$SECONDS

if ! "$PY" -c "import nbclient, ipykernel, ipywidgets" 2>/dev/null; then
  echo "== installing the notebook runner wheels"
  "$PY" -m pip install -q --no-deps .whl/notebooks/*.whl 2>&1 | grep -v "^WARNING: Location" | tail -n 3
fi
"$PY" -c "import nbclient, ipykernel, ipywidgets; print('nbclient', nbclient.__version__, '| ipykernel', ipykernel.__version__, '| ipywidgets', ipywidgets.__version__)" || exit 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== setup took $((SECONDS - START)) s"

ARGS=(--out "$OUT" --summary "$OUT/gpu_suite.txt" --jobs "${JOBS:-1}")
[[ "${REQUIRE_CUDA:-1}" == 1 ]] && ARGS+=(--require-cuda)
"$PY" scripts/run_notebooks.py "${ARGS[@]}" "$@"
status=$?
echo "== gpu_suite: $((SECONDS - START)) s in all, exit $status" | tee -a "$OUT/gpu_suite.txt"
exit $status
