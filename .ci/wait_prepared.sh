#!/usr/bin/env bash
# Wait for a background preparation started by .ci/run (or run it now, when the lane runs alone).
#   bash .ci/wait_prepared.sh NAME     # NAME = basename of .ci/prepare/NAME.sh
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?preparation name}"
dir="${CI_WORK:-/tmp/ci-work}/prepare"
mkdir -p "$dir"
if [ ! -e "$dir/$name.done" ] && [ ! -e "$dir/$name.failed" ] && ! pgrep -f ".ci/prepare/$name.sh" >/dev/null; then
    bash ".ci/prepare/$name.sh" > "$dir/$name.log" 2>&1 && touch "$dir/$name.done" || touch "$dir/$name.failed"
fi
while [ ! -e "$dir/$name.done" ] && [ ! -e "$dir/$name.failed" ]; do sleep 2; done
if [ -e "$dir/$name.failed" ]; then
    echo "preparation $name failed; its log:" >&2; tail -40 "$dir/$name.log" >&2; exit 1
fi
