# shellcheck shell=bash
# Sourced by the launch scripts: which Python has megatron_patch installed.
#   source tools/find_python.sh; python="$(find_python "$repo_root")"
# PYTHON when set (containers and clusters set it), else the repository's .venv that
# tools/setup_env.sh makes (the README's first command), else python3 on PATH.
find_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x "$1/.venv/bin/python" ]; then
        echo "$1/.venv/bin/python"
    else
        echo python3
    fi
}
