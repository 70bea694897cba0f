#!/usr/bin/env bash
# Create (or reuse) the virtualenv .venv with this package and its extras installed.
# Usage: bash tools/setup_env.sh [EXTRAS]      (EXTRAS default: dev; e.g. "dev,wandb")
# A CPU machine must not pull torch's multi-GB CUDA build: if torch is missing we install the
# CPU wheel from TORCH_WHEEL_DIR (default /opt/wheels) when it is there, else from
# TORCH_INDEX_URL (default: PyTorch's CPU index).
# With the extra dev or deepspeed, DeepSpeed (the version pinned in setup.py) is built against
# that torch: pip install --no-build-isolation, since an isolated build has no torch to import
# (and would fetch a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# Done before with the same setup.py, extras and checkout: nothing to install (a second run, e.g.
# the main job run again, costs a second instead of pip's minute and needs no package index).
stamp="$venv/.megatron_patch_setup"
want="$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16) $extras $PWD"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import megatron_patch, torch" 2>/dev/null; then
    echo "environment ready: $venv (unchanged since its set-up)"
    exit 0
fi
rm -f "$stamp"
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
    wheel_dir="${TORCH_WHEEL_DIR:-/opt/wheels}"
    if ls "$wheel_dir"/torch-2.13.0*.whl >/dev/null 2>&1; then
        pip_install --find-links "$wheel_dir" "torch==2.13.0"
    elif [ -n "${TORCH_INDEX_URL:-}" ] || ! command -v nvidia-smi >/dev/null; then
        pip_install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" torch
    else
        pip_install torch
    fi
fi
pip_extras="$extras"
case ",$extras," in
    *,dev,*|*,deepspeed,*)
        deepspeed_pin="$(grep -o '"deepspeed==[0-9.]*"' setup.py | tr -d '"')"
        [ -n "$deepspeed_pin" ] || { echo "setup_env.sh: no deepspeed==X pin in setup.py" >&2; exit 1; }
        pip_install "setuptools>=70.1"  # builds the wheel without the separate wheel package
        pip_install --no-build-isolation "$deepspeed_pin"
        pip_extras="$(echo ",$extras," | sed 's/,deepspeed,/,/g; s/^,//; s/,$//')" ;;
esac
pip_install -e ".${pip_extras:+[$pip_extras]}"
echo "$want" > "$stamp"
echo "environment ready: $venv ($("$py" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
