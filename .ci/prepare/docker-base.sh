#!/usr/bin/env bash
# Background preparation of lane 40-docker (overlaps lane 10): the Debian base image's tarball
# (docker/base_image.sh --rootfs, debootstrap, ~3 min) and Debian's Docker engine (docker.io).
# Lane 10 installs Slurm with apt right at its start and does not wait for apt's lock, so this
# takes no dpkg lock before debootstrap is done: debootstrap, when missing, is unpacked from its
# .deb (apt-get download, no lock) instead of installed; docker.io is installed afterwards,
# waiting for the lock if need be.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${CI_WORK:-/tmp/ci-work}/docker-base"
mkdir -p "$work"
start=$SECONDS
if ! command -v debootstrap > /dev/null; then
    (cd "$work" && apt-get download -q debootstrap)
    dpkg -x "$work"/debootstrap_*.deb "$work/debootstrap"
    export DEBOOTSTRAP_DIR="$work/debootstrap/usr/share/debootstrap" PATH="$work/debootstrap/usr/sbin:$PATH"
fi
bash docker/base_image.sh --rootfs
echo "base tarball ready after $((SECONDS - start)) s"
if ! command -v dockerd > /dev/null || ! command -v docker > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -q -o DPkg::Lock::Timeout=600)
    "${apt[@]}" install -y docker.io || { "${apt[@]}" update && "${apt[@]}" install -y docker.io; }
fi
echo "docker.io ready after $((SECONDS - start)) s"
