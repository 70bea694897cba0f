#!/usr/bin/env bash
# The GPU check: the configuration users launch (bf16/fp16, Transformer Engine layers, export),
# run for real on one CUDA GPU (H100/H200) in under 8 minutes, ending with a summary of the figures.
#
#   bash tests/gpu/run.sh [OUT_DIR]      (default runs/gpu_check; QUICK=1 for fewer iterations)
#
# Python: $PYTHON, else .venv/bin/python where it exists, else python3; it must already have
# megatron-core, torch with CUDA and (for the TE parts) Transformer Engine, as the NGC-based image
# does (Dockerfile): a GPU machine may have no package index, so nothing is installed here.
# Without a CUDA GPU every GPU part is skipped, the summary says so, and it exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/gpu_check}"
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
if ! "$py" -c "import megatron.core, torch" 2>/dev/null; then
    echo "gpu check: $py lacks megatron-core or torch; set PYTHON or run: bash tools/setup_env.sh dev" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
exec "$py" tests/gpu/check.py "$out" "${quick[@]}"
