#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on the bundled example: export a small GPT-2,
# inspect it, convert its attention to LinearAttention, verify, and benchmark both models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNEXPORT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
unset ATTNEXPORT_LIBRARY
exec "$VENV/bin/python" "$ROOT/examples/demo.py" "$@"
