#!/usr/bin/env bash
# The CPU Docker image built and used for real (docker/test_image.sh): the README's build, the
# main job and an exact resume in containers, docker/build_check.sh. Debian's dockerd is started
# here (its defaults: overlay2, bridge network) and stopped by PID at the end, also on failure.
# Its preparation (.ci/prepare/docker-base.sh: docker.io, the debootstrapped base) overlaps lane 10.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/wait_prepared.sh docker-base
work="${CI_WORK:-/tmp/ci-work}"
export PATH="$PATH:/usr/sbin"
if docker info > /dev/null 2>&1; then
    echo "a Docker engine is already running; using it"
else
    dockerd > "$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    stop_dockerd() {
        kill "$dockerd_pid" 2> /dev/null || true
        for _ in $(seq 30); do kill -0 "$dockerd_pid" 2> /dev/null || return 0; sleep 1; done
        kill -9 "$dockerd_pid" 2> /dev/null || true
    }
    trap stop_dockerd EXIT
    for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
    docker info > /dev/null 2>&1 || { tail -n 20 "$work/dockerd.log" >&2; echo "dockerd did not come up" >&2; exit 1; }
    echo "dockerd (pid $dockerd_pid) up after ${SECONDS} s"
fi
# CI runs as root; the containers run as an ordinary uid without a passwd entry in the image,
# as a user's would, so the files on the host are checked against that uid.
run_as="${RUN_AS:-$( [ "$(id -u)" = 0 ] && echo 1000:1000 || echo "$(id -u):$(id -g)" )}"
RUN_AS="$run_as" WORK="$work/docker-test" bash docker/test_image.sh
