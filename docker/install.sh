#!/usr/bin/env bash
# Install megatron_patch in the image (the Dockerfile's RUN step; also runnable on a bare machine).
#   bash docker/install.sh --variant gpu   # NGC PyTorch image: keep its torch, apex, Transformer Engine
#   bash docker/install.sh --variant cpu   # plain Python 3.11: CPU torch + the package in VENV (/opt/venv)
# gpu: NGC images pin their packages in /etc/pip/constraint.txt. megatron-core (newest 0.19.x) is installed
# without dependencies and outside those pins (its own needs, torch>=2.6, numpy, packaging, are in
# the image); our package without dependencies, then the two small ones it adds (sentencepiece, psutil).
# NGC 25.xx images have Python 3.12, which megatron-core 0.19 needs and our setup.py accepts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
variant=""
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant="${2:?}"; shift 2 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
pip_install() { "$python" -m pip install --no-cache-dir --disable-pip-version-check -q "$@"; }

case "$variant" in
    gpu)
        python="${PYTHON:-python3}"
        "$python" -c 'import torch; assert torch.version.cuda, "not a CUDA build of torch"'
        # The newest megatron-core the package supports (NGC images have Python 3.12).
        PIP_CONSTRAINT="" pip_install --no-deps "megatron-core>=0.19.2,<0.20"
        pip_install "sentencepiece>=0.2" psutil pytest pytest-timeout
        pip_install --no-deps -e .
        ;;
    cpu)
        export VENV="${VENV:-/opt/venv}"
        bash tools/setup_env.sh dev  # CPU torch wheel (never the CUDA build), then -e .[dev]
        python="$VENV/bin/python"
        ;;
    *) echo "install.sh: --variant gpu or cpu" >&2; exit 2 ;;
esac
VARIANT="$variant" "$python" - <<'PY'
import importlib.metadata as md
import os

import megatron.core
import torch
from megatron_patch import upstream

# gpu: the newest 0.19.x (Python 3.12); cpu: 0.16.1, the newest on Python 3.11.
want, te_tested = {"gpu": ("0.19", "2.17.1"), "cpu": ("0.16.1", "2.9-2.11")}[os.environ["VARIANT"]]
assert f"{upstream.VERSION}.".startswith(f"{want}."), upstream.VERSION
found = {}
for name in ("transformer_engine", "apex"):
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        found[name] = "absent"
print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Transformer Engine {found['transformer_engine']} (megatron-core {want} is tested with {te_tested}), "
      f"apex {found['apex']}")
PY
