#!/usr/bin/env bash
# The README's test command on Python 3.11 with megatron-core 0.16.1, on a fresh .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .venv
bash tests/slurm/install.sh  # Debian slurm, munge, shellcheck for the launcher tests (they skip if absent)
bash tests/run.sh
