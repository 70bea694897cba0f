#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then show the stabilization at work on CPU.
# Today: [SNM]'s per-layer gradient picture at initialisation for every option
# (tools/stability_report.py). The pre-training run on the bundled corpus joins it when the
# trainer lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python tools/stability_report.py "$@"
