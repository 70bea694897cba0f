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

# The tests stop what they start and remove their namespaces, also when a test fails. Should
# pytest itself be killed, this removes what it left: every process it started runs inside one
# of the two namespaces named after this tag.
export MULTIHOST_TAG="mpci$$"
cleanup() {
    local ns pid
    for ns in "${MULTIHOST_TAG}n1" "${MULTIHOST_TAG}n2"; do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT
mkdir -p "${CI_WORK:-/tmp/ci-work}"
MULTIHOST=1 .venv/bin/python -m pytest -q -p no:cacheprovider -rs --durations=0 --basetemp "${CI_WORK:-/tmp/ci-work}/two-hosts" \
    tests/multihost
