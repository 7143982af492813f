#!/usr/bin/env bash
# Sets up everything on a fresh machine (venv, CPU torch, the project, the embedded model, Java 17),
# then runs the test suite. Extra arguments go to pytest. Exit code: pytest's.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=setup_env.sh
source "$(dirname "$0")/setup_env.sh"

exec "$PY" -m pytest "$@"
