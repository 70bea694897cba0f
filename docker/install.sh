#!/usr/bin/env bash
# Install megatron_patch in the image (the Dockerfile's RUN step; also runnable on a bare machine).
#   bash docker/install.sh --variant cpu [--wheel-dir DIR] [--ca-bundle FILE]
#       plain Python 3.11 (Debian based): g++ and the Python headers (apt, for the fused-kernel
#       JIT paths), then tools/setup_env.sh: CPU torch (a torch-2.13.0 wheel in DIR, else
#       TORCH_INDEX_URL) and the package with its dev extras in VENV
#   bash docker/install.sh --variant gpu [--wheel-dir DIR] [--ca-bundle FILE]
#       NGC PyTorch image: keep its torch, apex, Transformer Engine
#   bash docker/install.sh --check       # assert and print the versions (docker/build_check.sh;
#                                        # the variant: gpu where torch is a CUDA build, else cpu)
# --any-user (the Dockerfile): make the source tree, its .venv and HOME writable to every user.
# --ca-bundle FILE: PEM certificates added to the system's trusted CAs first (an HTTPS proxy that
# re-signs certificates); --wheel-dir DIR: wheels pip may use (PIP_FIND_LINKS).
# gpu: NGC images pin their packages in /etc/pip/constraint.txt. megatron-core (newest 0.19.x) is
# installed without dependencies and outside those pins (its own needs, torch>=2.6, numpy,
# packaging, are in the image); our package without dependencies, then the two small ones it adds
# (sentencepiece, psutil). NGC 25.xx images have Python 3.12, which megatron-core 0.19 needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The megatron-core each image has, as docker/build_check.sh asserts it: the one place to change.
#   gpu: the newest 0.19.x (NGC images have Python 3.12); its CI pins Transformer Engine 2.17.1
#   cpu: setup.py's range, which pip resolves to 0.16.1 on Python 3.11; tested with TE 2.9-2.11
gpu_core_spec="megatron-core>=0.19.2,<0.20" gpu_core=0.19 gpu_te_tested=2.17.1
cpu_core=0.16.1 cpu_te_tested=2.9-2.11

variant="" wheel_dir="" ca_bundle="" check_only=0 any_user=0
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant="${2:?}"; shift 2 ;;
        --wheel-dir) wheel_dir="$2"; shift 2 ;;
        --ca-bundle) ca_bundle="$2"; shift 2 ;;
        --check) check_only=1; shift ;;
        --any-user) any_user=1; shift ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
die() { echo "install.sh: $*" >&2; exit 1; }

check_versions() {  # the installed megatron-core is the variant's; print what the image has
    "${PYTHON:-python3}" -W ignore - "$variant" "$gpu_core" "$gpu_te_tested" "$cpu_core" "$cpu_te_tested" <<'PY'
import importlib.metadata as md
import sys

import torch

from megatron_patch import upstream

variant, gpu_core, gpu_te, cpu_core, cpu_te = sys.argv[1:]
variant = variant or ("gpu" if torch.version.cuda else "cpu")
want, te_tested = {"gpu": (gpu_core, gpu_te), "cpu": (cpu_core, cpu_te)}[variant]
if not f"{upstream.VERSION}.".startswith(f"{want}."):
    sys.exit(f"megatron-core {upstream.VERSION} is installed; docker/install.sh wants {want} in the {variant} image")
found = {}
for name in ("transformer_engine", "apex"):
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        found[name] = "absent"
print(f"megatron-core {upstream.VERSION}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Transformer Engine {found['transformer_engine']} (megatron-core {want} is tested with {te_tested}), "
      f"apex {found['apex']}")
PY
}
if [ "$check_only" = 1 ]; then check_versions; exit 0; fi

if [ -n "$ca_bundle" ]; then
    [ -f "$ca_bundle" ] || die "--ca-bundle $ca_bundle: no such file (give a PEM file inside the build context)"
    command -v update-ca-certificates >/dev/null || die "update-ca-certificates is missing: the base image needs Debian's ca-certificates"
    # The bundle's certificates that the image does not trust yet (a host's bundle repeats the
    # common roots), one per file as update-ca-certificates and its c_rehash expect.
    ca_dir=/usr/local/share/ca-certificates/megatron-patch-build
    mkdir -p "$ca_dir"
    trusted=/etc/ssl/certs/ca-certificates.crt
    awk -v dir="$ca_dir" -v trusted="$trusted" '
        function read(line) {  # the PEM block being read is complete after this line
            if (line ~ /-----BEGIN CERTIFICATE-----/) { pem = ""; inside = 1 }
            if (inside) pem = pem line "\n"
            if (line ~ /-----END CERTIFICATE-----/) { inside = 0; return 1 }
            return 0
        }
        BEGIN { while ((getline line < trusted) > 0) if (read(line)) known[pem] = 1 }
        read($0) { found = 1
            if (!(pem in known)) { known[pem] = 1; out = sprintf("%s/%04d.crt", dir, ++n); printf "%s", pem > out; close(out) } }
        END { if (!found) exit 1 }' "$ca_bundle" || die "--ca-bundle $ca_bundle: no PEM certificate in it"
    echo "--ca-bundle: $(find "$ca_dir" -name '*.crt' | wc -l) certificate(s) the image did not trust yet"
    update-ca-certificates > /dev/null
fi
if [ -n "$wheel_dir" ]; then
    [ -d "$wheel_dir" ] || die "--wheel-dir $wheel_dir: no such directory (give one inside the build context)"
    wheel_dir="$(cd "$wheel_dir" && pwd)"
    export PIP_FIND_LINKS="$wheel_dir${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
fi
export PIP_NO_CACHE_DIR=1  # no pip cache in the image's layers
pip_install() { "$python" -m pip install --disable-pip-version-check -q "$@"; }

case "$variant" in
    gpu)
        python="${PYTHON:-python3}"
        "$python" -c 'import torch; assert torch.version.cuda, "not a CUDA build of torch"'
        PIP_CONSTRAINT="" pip_install --no-deps "$gpu_core_spec"
        pip_install "sentencepiece>=0.2" psutil pytest pytest-timeout
        pip_install --no-deps -e .
        ;;
    cpu)
        # g++ and Python.h: torch's C++ extension JIT (the fused kernels' build checks) needs both.
        missing=()
        command -v g++ > /dev/null || missing+=(g++)
        python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            || missing+=(python3-dev)
        if [ ${#missing[@]} -gt 0 ]; then
            command -v apt-get > /dev/null || die "no apt-get to install ${missing[*]}: use a Debian-based CPU_IMAGE"
            apt-get update -q > /dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null
            rm -rf /var/lib/apt/lists/*
        fi
        export VENV="${VENV:-.venv}"
        # --any-user: every file of the venv and the editable install is made writable to all as
        # it is created, rather than by a chmod -R over 2 GB afterwards.
        [ "$any_user" = 0 ] || umask 0000
        TORCH_WHEEL_DIR="${wheel_dir:-${TORCH_WHEEL_DIR:-/opt/wheels}}" bash tools/setup_env.sh dev
        python="$VENV/bin/python"
        ;;
    *) echo "install.sh: --variant gpu or cpu" >&2; exit 2 ;;
esac
PYTHON="$python" check_versions
if [ "$any_user" = 1 ]; then
    # Any user may run the image (docker run --user "$(id -u):$(id -g)", so that files written to
    # bind mounts belong to the caller): HOME and the source tree's directories (the editable
    # install, test outputs) are writable to all; files copied in are left as they are, so that no
    # layer holds a second copy of them.
    mkdir -p "$HOME"
    chmod 1777 "$HOME"
    find . \( -path ./.venv -o -path ./docker/local \) -prune -o -type d -exec chmod a+rwx {} +
fi
