#!/usr/bin/env bash
# Install what tests/distributed/test_launchers.py needs for its real-Slurm and shellcheck tests:
# Debian's slurmctld, slurmd, slurm-client, munge and shellcheck. Idempotent and quick: does
# nothing when every command is already there; never fails the caller (the tests skip, with the
# reason, when something is still missing).
# Usage: bash tests/slurm/install.sh
set -uo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
if [ "${#need[@]}" -eq 0 ]; then
    echo "slurm/munge/shellcheck: already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/slurm/install.sh: no apt-get; the Slurm and shellcheck tests will be skipped" >&2
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "tests/slurm/install.sh: not root and no sudo; skipping (${need[*]})" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists are refreshed only when apt has none yet (a fresh container).
if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    "${sudo[@]}" apt-get update -qq || true
fi
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    "${sudo[@]}" apt-get update -qq || true
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || echo "tests/slurm/install.sh: apt-get install ${need[*]} failed; tests will skip" >&2
fi
echo "installed: ${need[*]}"
