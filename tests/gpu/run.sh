#!/usr/bin/env bash
# The GPU check (tests/gpu/check.py) on a machine that already has megatron-core: an NGC-based image
# (Dockerfile) or a dev venv. It runs for real on one CUDA GPU (H100/H200) in under 8 minutes and
# ends with a summary of the figures; Transformer Engine's layers where TE is installed, else
# megatron-core's local ones. For the lent GPU machine, which has no megatron-core and no network,
# see docs/gpu_check.md (tests/gpu/prepare_carry.py prints the command to run there).
#
#   bash tests/gpu/run.sh [OUT_DIR]      (default runs/gpu_check; QUICK=1 for fewer iterations)
#
# Python: $PYTHON, else .venv/bin/python where it exists, else python3. Exit status is check.py's:
# 0 passed, 1 a part failed, 2 a package is missing, 3 no CUDA device (nothing measured).
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
    echo "gpu check: $py lacks megatron-core or torch; set PYTHON, run: bash tools/setup_env.sh dev, or see docs/gpu_check.md" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
exec "$py" tests/gpu/check.py "$out" "${quick[@]}"
