#!/usr/bin/env bash
# ruff (its version pinned in setup.py's dev extra) over the whole tree, with ruff.toml's rules.
# Lane 10 leaves .venv with the dev extra installed; run alone, the lane creates it.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/ruff ] || bash tools/setup_env.sh dev
.venv/bin/ruff --version
.venv/bin/ruff check .
