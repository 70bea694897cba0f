#!/usr/bin/env bash
# Start a private one-node Slurm (munged, slurmctld, slurmd) for the launcher tests.
#   bash tests/slurm/start.sh --state-dir DIR     # prints SLURM_CONF=DIR/slurm.conf when the node is idle
#   bash tests/slurm/start.sh --state-dir DIR --stop
# Everything lives in DIR (config, key, socket, logs, pid files) on free ports; --stop ends only the
# daemons whose pid files are in DIR. Needs root (slurmd starts job steps as the submitting user)
# and Debian's slurmctld, slurmd, slurm-client and munge (tests/slurm/install.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="" stop=0
while [ $# -gt 0 ]; do
    case "$1" in
        --state-dir) state="${2:?}"; shift 2 ;;
        --stop) stop=1; shift ;;
        *) echo "start.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$state" ] || { echo "start.sh: --state-dir is required" >&2; exit 2; }
mkdir -p "$state"
state="$(cd "$state" && pwd)"

stop_daemons() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -f "$state/$name.pid" ] || continue
        pid="$(cat "$state/$name.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.3; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$state/$name.pid"
    done
}
if [ "$stop" = 1 ]; then stop_daemons; exit 0; fi

fail() { echo "start.sh: $*" >&2; stop_daemons; exit 1; }
for cmd in munged slurmctld slurmd sbatch sinfo; do
    command -v "$cmd" >/dev/null || fail "$cmd not installed (bash tests/slurm/install.sh)"
done
[ "$(id -u)" = 0 ] || fail "needs root to run slurmd"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

chmod 700 "$state"
mkdir -p "$state/ctld" "$state/slurmd"
: > "$state/plugstack.conf"
host="$(hostname -s)"
sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@USER@|$(id -un)|g" \
    -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
    "$here/slurm.conf.in" > "$state/slurm.conf"
export SLURM_CONF="$state/slurm.conf"

dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge.key"
munged --force --key-file="$state/munge.key" --socket="$state/munge.socket" \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munged.seed" \
    || fail "munged did not start: $(tail -n 1 "$state/munged.log" 2>/dev/null)"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -n 1 "$state/slurmctld.log" 2>/dev/null)"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start: $(tail -n 1 "$state/slurmd.log" 2>/dev/null)"
for _ in $(seq 1 60); do
    if [ "$(sinfo -h -n "$host" -o %T 2>/dev/null)" = idle ]; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
fail "node $host did not become idle: $(sinfo -h -o '%T %E' 2>&1 | head -n 1); $(tail -n 1 "$state/slurmd.log")"
