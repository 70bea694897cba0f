#!/usr/bin/env bash
# Python 3.12 with the newest megatron-core 0.19.x (.venv312, from .ci/prepare/py312-venv.sh):
# the unit tests, the releases side by side against lane 10's Python 3.11 / megatron-core 0.16.1
# .venv (tests/cross_version: option losses, a 0.16.1 checkpoint resumed, a 0.19 one refused by
# 0.16.1), and the torchrun mixed-precision test (DP=2 with the distributed optimizer, fp16 and
# bf16, TP=2, an fp16 resume). Run alone, it builds what it needs:  bash .ci/lanes/20-py312.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/wait_prepared.sh py312-venv
.venv312/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .  # see the preparation
[ -x .venv/bin/python ] || bash tools/setup_env.sh dev  # lane 10 leaves it behind
.venv312/bin/python -c '
import sys
from packaging.version import Version
from megatron_patch import upstream
assert sys.version_info[:2] == (3, 12) and upstream.VERSION >= Version("0.19"), (sys.version, upstream.VERSION)
print("lane 20: Python", sys.version.split()[0], "megatron-core", upstream.VERSION)'
MEGATRON_PATCH_REFERENCE_PYTHON="$PWD/.venv/bin/python" \
    .venv312/bin/python -m pytest -q -rs -p no:cacheprovider tests/unit tests/cross_version \
    tests/distributed/test_mixed_precision_parallel.py
