#!/usr/bin/env bash
# A Python 3.11 base image made from Debian's packages, for machines that reach no image registry
# (only Debian's apt mirror and PyPI): debootstrap a minimal bookworm with python3, venv, pip and
# ca-certificates, keep it as a tarball in a cache, and `docker import` it. Stands in for the
# Dockerfile's default CPU base, python:3.11-slim-bookworm (Python 3.11 either way).
#   bash docker/base_image.sh              # print the image name, making it first if missing
#   bash docker/base_image.sh --rootfs     # only make the cached tarball (no Docker engine needed)
# Environment: BASE_IMAGE (default megatron-patch-base:bookworm), BASE_CACHE (directory of the
# tarball, default /var/cache/megatron-patch), DEBIAN_MIRROR (default: this machine's apt mirror).
# Needs root and debootstrap (apt-get install debootstrap). ~3 min to make, 2 s to import.
set -euo pipefail
image="${BASE_IMAGE:-megatron-patch-base:bookworm}"
cache="${BASE_CACHE:-/var/cache/megatron-patch}"
tarball="$cache/debian-bookworm-python3.tar"
packages=python3,python3-venv,python3-pip,ca-certificates

apt_mirror() {  # the first Debian mirror this machine's apt uses (deb822 or one-line sources)
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'; } | grep -m1 '/debian/\?$' || true
}

make_tarball() {
    [ -s "$tarball" ] && return 0
    command -v debootstrap >/dev/null || { echo "base_image.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    mkdir -p "$cache"
    local mirror="${DEBIAN_MIRROR:-$(apt_mirror)}" root
    root="$(mktemp -d "$cache/rootfs.XXXXXX")"
    chmod 755 "$root"  # the image's /: mktemp makes it 0700, which locks out non-root users
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"  # no half-written cache
    rm -rf "$root"; trap - EXIT
}

make_tarball
[ "${1:-}" = --rootfs ] && exit 0
if ! docker image inspect "$image" >/dev/null 2>&1; then
    docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' "$tarball" "$image" >/dev/null
fi
echo "$image"
