#!/usr/bin/env bash
# Background preparation for lane 20-py312: a Python 3.12 venv (.venv312) holding torch 2.14.1
# and this package with the newest megatron-core 0.19.x that setup.py's range admits.
# No CPU build of torch exists for 3.12 here, so pip takes the CUDA build (~0.9 GB from the
# index, the NVIDIA wheels from local disk; a 6.4 GB venv, 2.5-5 min). It runs on the CPU.
# I/O bound, so .ci/run starts it at CI begin, overlapping lane 10.
#   bash .ci/prepare/py312-venv.sh          # reuse .venv312 if present; CI=true builds it fresh
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${VENV312:-.venv312}"
py312="${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12}"
[ -x "$py312" ] || { echo "py312-venv: no Python 3.12 at $py312 (pyenv install 3.12.1)" >&2; exit 1; }
[ "${CI:-}" = true ] && rm -rf "$venv"
[ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
venv="$(cd "$venv" && pwd)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1"
# The rest as for .venv: DeepSpeed built against that torch, then this package's dev extra. Lane 10
# installs the package into .venv at the same time, and an editable install writes
# megatron_patch.egg-info into the source tree; so this one runs on a copy of what the install reads,
# and the lane points the install back at the repository (pip install --no-deps -e ., seconds).
src="${CI_WORK:-/tmp/ci-work}/py312-src"
rm -rf "$src" && mkdir -p "$src"
git ls-files -z setup.py tools/setup_env.sh megatron_patch | xargs -0 cp --parents -t "$src"
(cd "$src" && VENV="$venv" bash tools/setup_env.sh dev)
"$venv/bin/python" - <<'PY'
import sys, megatron.core as m
print("py312-venv ready: Python", sys.version.split()[0], "megatron-core", m.__version__)
PY
