# Sourced by scripts/demo and scripts/test: make .venv and install ckptviz with its test tools.
# Idempotent: re-installs only when pyproject.toml or requirements-dev.txt changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.ckptviz-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    echo "ckptviz: installing into .venv (the first time downloads PyTorch, a few minutes)..." >&2
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements-dev.txt
    python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
