#!/usr/bin/env bash
# Creates .venv and installs attnexport with what the demo, the tests and the benchmarks use.
# `pip install .` builds the op library (CMake; ONNX Runtime's C API headers are fetched from Debian's
# libonnxruntime-dev) into the installed package. Safe to run again: it reuses the venv and the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNEXPORT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch 2.13.0 is the CPU build that lies on this machine's disk; an unpinned torch pulls a
# multi-GB CUDA build. Installed first, so the extras below find it satisfied.
"${PIP[@]}" install -q "torch==2.13.0"
echo "setup: installing attnexport (builds the op library)"
"${PIP[@]}" install -q "$ROOT[test,bench]"
"$VENV/bin/python" -P -c "import attnexport; print('setup: attnexport', attnexport.__version__, 'with', attnexport.library_path())"
