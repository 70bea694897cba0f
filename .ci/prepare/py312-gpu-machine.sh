#!/usr/bin/env bash
# Background preparation for lane 50-gpu-rehearsal: a Python 3.12 venv holding only what the lent
# GPU machine has (tests/gpu/machine_packages.txt: torch 2.11.0, the machine's exact version, whose
# CUDA build runs on the CPU; transformers, accelerate, ... and their dependencies), so neither
# megatron-core nor pytest: the rehearsal must get them from the carried wheels, as that machine does.
# About 5 min with an empty pip cache (~2.5 GB of torch and NVIDIA wheels, part from local disk),
# a 4.9 GB venv; I/O bound, so .ci/run starts it at CI begin, overlapping lane 10.
#   bash .ci/prepare/py312-gpu-machine.sh    # reuses the venv while the package list is unchanged
#                                            # (CI=true builds it fresh)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${GPU_MACHINE_VENV:-${CI_WORK:-/tmp/ci-work}/py312-gpu-machine}"
py312="${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12}"
[ -x "$py312" ] || { echo "py312-gpu-machine: no Python 3.12 at $py312 (pyenv install 3.12.1)" >&2; exit 1; }
stamp="$(sha256sum tests/gpu/machine_packages.txt | cut -d' ' -f1)"
if [ "${CI:-}" != true ] && [ "$(cat "$venv/.machine_packages" 2>/dev/null)" = "$stamp" ]; then
    echo "py312-gpu-machine: $venv is up to date"
    exit 0
fi
rm -rf "$venv"
"$py312" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/gpu/machine_packages.txt
echo "$stamp" > "$venv/.machine_packages"
"$venv/bin/python" - <<'PY'
import importlib.util, sys, torch
absent = [m for m in ("megatron", "pytest", "transformer_engine", "apex", "deepspeed") if importlib.util.find_spec(m)]
assert not absent, f"the GPU machine has none of {absent}"
print("py312-gpu-machine ready: Python", sys.version.split()[0], "torch", torch.__version__)
PY
