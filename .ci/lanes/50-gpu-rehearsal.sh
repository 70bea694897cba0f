#!/usr/bin/env bash
# The GPU check's rehearsal on CPU: build the carry folder for the lent GPU machine (the wheels it
# lacks), then run the prepared command, verbatim, against a Python 3.12 venv holding only that
# machine's packages (.ci/prepare/py312-gpu-machine.sh): it must stop for want of a GPU alone
# (exit 3), and with GPU_CHECK_CPU_REHEARSAL=1 run every part on the CPU. See docs/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/wait_prepared.sh py312-gpu-machine
python3 tests/gpu/prepare_carry.py > /dev/null  # downloads the wheels into .gpu_carry/ and checks them
[ -x .venv/bin/python ] || bash tools/setup_env.sh dev  # pytest runs the rehearsal from the dev venv
export GPU_MACHINE_PYTHON="${GPU_MACHINE_VENV:-${CI_WORK:-/tmp/ci-work}/py312-gpu-machine}/bin/python"
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/unit/test_gpu_check.py -k rehearsal
