#!/usr/bin/env bash
# Set up .venv (see tools/setup_env.sh) and run the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
exec .venv/bin/python -m pytest -q "$@"
