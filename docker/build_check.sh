#!/usr/bin/env bash
# The image's check (CPU only, no GPU needed): versions, the trainer's --help, a paper dry run,
# and the CPU unit tests (not the torchrun/Slurm/GPU ones).
#   docker run --rm IMAGE bash docker/build_check.sh
#   bash docker/build_check.sh          # PYTHON (default python3) must have megatron_patch installed
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHON="$python"
bash docker/install.sh --check  # the pinned megatron-core, and the versions the image has
"$python" pretrain_gpt.py --help > /dev/null
NNODES=1 GPUS_PER_NODE=8 bash examples/paper/pretrain.sh --size 350m --method scaled_embed --dry-run
"$python" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" tests/unit
