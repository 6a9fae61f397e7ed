#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build attnexport with its CUDA kernels, install onnxruntime-gpu,
# run the CUDA tests (GPU and emulated) and the GPU benchmark. One command:
#
#     bash scripts/gpu_check.sh            # everything (the benchmark takes ~10-20 min on an H100)
#     bash scripts/gpu_check.sh --quick    # tests, compute-sanitizer on a few cases, benchmark --quick
#
# Writes benchmarks/results/gpu_check_<gpu>_<date>/ (build log with ptxas register/spill report,
# test log + junit xml, sanitizer log) and benchmarks/results/cuda_<gpu>.{md,json} (benchmark).
#
# Environment:
#   ATTNEXPORT_GPU_VENV   venv to create/use (default .venv-gpu). With a python that already has torch
#                         (a CUDA image) the venv sees its packages (--system-site-packages).
#   ATTNEXPORT_WHEELS     a folder of wheels for an offline machine (pip --no-index --find-links);
#                         it must hold onnxruntime-gpu and whatever else is not installed.
#   ORT_GPU_SPEC          default "onnxruntime-gpu[cuda,cudnn]>=1.27" (CUDA 13 builds on PyPI)
#   CUDACXX               nvcc to build with (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#   ATTNEXPORT_CUDA_ARCHITECTURES   default: the local GPU's, plus 80-real;90
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PYTHON="${PYTHON:-python3}"
VENV="${ATTNEXPORT_GPU_VENV:-$ROOT/.venv-gpu}"
ORT_GPU_SPEC="${ORT_GPU_SPEC:-onnxruntime-gpu[cuda,cudnn]>=1.27}"
say() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" || die "nvidia-smi sees no GPU"
CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"
SLUG="$(echo "$GPU_NAME" | tr -c 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z' | sed 's/__*/_/g; s/_$//')"
OUTDIR="$ROOT/benchmarks/results/gpu_check_${SLUG}_$(date +%Y%m%d_%H%M)"
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
say "GPU: $GPU_NAME (compute capability $CC)"
nvidia-smi

if [ -z "${CUDACXX:-}" ]; then
  if command -v nvcc >/dev/null; then CUDACXX="$(command -v nvcc)"; elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDACXX=/usr/local/cuda/bin/nvcc; fi
fi
[ -n "${CUDACXX:-}" ] || die "no nvcc (set CUDACXX): the CUDA kernels cannot be built"
export CUDACXX
"$CUDACXX" --version | tail -2
export ATTNEXPORT_CUDA=ON  # fail the build rather than silently build the CPU library alone
export ATTNEXPORT_CUDA_ARCHITECTURES="${ATTNEXPORT_CUDA_ARCHITECTURES:-80-real;90}"
case ";$ATTNEXPORT_CUDA_ARCHITECTURES;" in *";$CC"*) ;; *) ATTNEXPORT_CUDA_ARCHITECTURES="$ATTNEXPORT_CUDA_ARCHITECTURES;$CC-real";; esac

say "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV" || die "venv"
  else
    "$PYTHON" -m venv "$VENV" || die "venv"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
OFFLINE=()
INSTALL=("$ROOT[test,bench]")
if [ -n "${ATTNEXPORT_WHEELS:-}" ]; then
  # Offline: the build backend and the dependencies must already be installed (a CUDA image has them).
  OFFLINE=(--no-index --find-links "$ATTNEXPORT_WHEELS")
  INSTALL=(--no-build-isolation --no-deps "$ROOT")
fi

say "build and install attnexport with its CUDA kernels (ptxas report in $OUTDIR/build.log)"
# -Xptxas=-v prints registers, shared memory and spills of every kernel into the build log (CUDAFLAGS
# seeds CMAKE_CUDA_FLAGS); pyproject.toml passes ATTNEXPORT_CUDA and ATTNEXPORT_CUDA_ARCHITECTURES on.
export CUDAFLAGS="${CUDAFLAGS:-} -Xptxas=-v"
export ATTNEXPORT_CUDA_ARCHITECTURES
start=$(date +%s)
if ! "${PIP[@]}" install -v "${OFFLINE[@]}" "${INSTALL[@]}" >"$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; die "pip install failed (see $OUTDIR/build.log)"
fi
echo "pip install: $(( $(date +%s) - start )) s"
grep -E "attnexport: CUDA kernels|Used [0-9]+ registers|spill" "$OUTDIR/build.log" | head -80

say "onnxruntime-gpu ($ORT_GPU_SPEC) in place of onnxruntime (both install the onnxruntime module)"
"${PIP[@]}" uninstall -y onnxruntime onnxruntime-gpu >/dev/null 2>&1
"${PIP[@]}" install -q "${OFFLINE[@]}" "$ORT_GPU_SPEC" || die "installing $ORT_GPU_SPEC failed"
"$VENV/bin/python" - <<'EOF' || die "onnxruntime-gpu cannot run the CUDA execution provider here"
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers()
import attnexport
from attnexport import gpu
print("attnexport", attnexport.__version__, "library", attnexport.library_path(), "status:", gpu.status() or "CUDA ready")
EOF

cd "$ROOT"
unset ATTNEXPORT_LIBRARY  # the installed package's library, as a user gets it
say "CUDA tests (GPU) and the emulated kernel tests"
"$VENV/bin/python" -m pytest -p no:cacheprovider -rs -q tests/test_cuda_ops.py tests/test_cuda_emulated.py \
  --junitxml="$OUTDIR/tests.xml" 2>&1 | tee "$OUTDIR/tests.log"
TESTS=${PIPESTATUS[0]}

if command -v compute-sanitizer >/dev/null; then
  say "compute-sanitizer (memcheck, racecheck) on a few GPU tests"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 "$VENV/bin/python" -m pytest -p no:cacheprovider -q -x \
      tests/test_cuda_ops.py -k "gqa_64 and float16 or causal_window_globals and float16 or causal_past and float32" \
      >"$OUTDIR/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? (log $OUTDIR/sanitizer_$tool.log)"
    tail -3 "$OUTDIR/sanitizer_$tool.log"
  done
fi

say "CPU test suite with the CUDA-enabled library (CPU-only sessions must be unaffected)"
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -x tests/test_linear_attention_function.py \
  tests/test_sparse_attention_op.py tests/test_lse_attention.py 2>&1 | tail -3

say "benchmark"
BENCH_ARGS=()
[ "$QUICK" = 1 ] && BENCH_ARGS=(--quick)
PYTHONUNBUFFERED=1 "$VENV/bin/python" benchmarks/bench_cuda.py "${BENCH_ARGS[@]}" 2>&1 | tee "$OUTDIR/bench.log"

say "done: tests exit $TESTS; results in $OUTDIR and benchmarks/results/cuda_${SLUG}.md"
exit "$TESTS"
