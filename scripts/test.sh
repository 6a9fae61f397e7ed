#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite against the installed package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNEXPORT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# pytest (not `python -m pytest`) keeps the source tree off sys.path, so the tests import the
# installed package and its built library, as a user's code does.
unset ATTNEXPORT_LIBRARY
exec "$VENV/bin/pytest" -n "${ATTNEXPORT_TEST_WORKERS:-2}" --dist loadfile "$@"
