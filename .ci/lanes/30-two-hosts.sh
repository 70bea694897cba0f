#!/usr/bin/env bash
# Two hosts made on this machine (network namespaces, tests/multihost/hosts.py): torchrun DP/TP/PP
# across the nodes against one host, a resume across them, Slurm with two slurmd's (srun and
# torchrun launchers, scancel and resume), a --save/--load the nodes do not share, a lost node.
# The main suite (lane 10) skips these tests in one line; here MULTIHOST=1 runs them, and a
# missing prerequisite fails the lane instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/slurm/install.sh  # already done by lane 10; quick and idempotent when run alone
[ -x .venv/bin/python ] || bash tools/setup_env.sh dev
MULTIHOST=1 .venv/bin/python -m pytest -q -p no:cacheprovider -rs tests/multihost
