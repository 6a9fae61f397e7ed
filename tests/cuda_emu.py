"""Runs the attnexport CUDA kernels on the CPU, in the host emulator of custom_ops/cuda/emu/.

The kernels are written against custom_ops/cuda/common/device.cuh, which has a PTX implementation
(GPU) and a host emulation (threads and barriers for the CUDA execution model; ldmatrix, mma.sync and
cp.async from the PTX ISA's fragment tables). custom_ops/cuda/emu/runner.cc builds the real kernel
code and the real launch code (plans, segment splits, scans) against the emulation; this module
compiles it once per source version (with AddressSanitizer and UBSan: out-of-bounds reads of inputs,
shared-memory overruns, integer overflow abort the run) and runs it on numpy inputs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "custom_ops"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def unavailable() -> str | None:
    """Why the emulator cannot be built here (None: it can)."""
    if not (SOURCES / "cuda" / "emu" / "runner.cc").is_file():
        return f"no CUDA kernel sources at {SOURCES / 'cuda'} (tests run outside a source checkout)"
    if not (CUDA_HOME / "include" / "cuda_fp16.h").is_file():
        return f"no CUDA toolkit headers at {CUDA_HOME}/include (set CUDA_HOME); the emulator needs cuda_fp16.h"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX) for the CUDA emulator"
    return None


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((SOURCES / "cuda").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(SOURCES)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build() -> Path:
    """The emulator runner binary for the current sources (compiled on first use, then cached)."""
    cache = Path(os.environ.get("ATTNEXPORT_EMU_CACHE", ROOT / "build" / "cuda-emu")) / _source_hash()
    binary = cache / "attnexport_cuda_emu"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        cxx = os.environ.get("CXX", "g++")
        tmp = cache / "attnexport_cuda_emu.tmp"
        cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-DATTNEXPORT_CUDA_EMULATION", f"-I{SOURCES}", f"-I{CUDA_HOME / 'include'}", "-pthread",
               str(SOURCES / "cuda" / "emu" / "runner.cc"), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}")
        tmp.rename(binary)
    return binary


# -- dtypes ---------------------------------------------------------------------------------------

def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw array as the kernel reads it, float64 values it represents). bfloat16: round to nearest even."""
    x = np.asarray(x)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        finite = np.isfinite(x)
        rounded = np.where(finite, rounded, (bits >> 16).astype(np.uint16))
        return rounded, decode(rounded, "bfloat16")
    raw = x.astype({"float32": np.float32, "float16": np.float16}[dtype])
    return raw, raw.astype(np.float64)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def raw_dtype(dtype: str):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]


@dataclass
class EmuResult:
    y: np.ndarray  # float64 values of the output
    facts: dict[str, str]  # what the runner reports (path, segments, launches)
    present: np.ndarray | None = None  # LseAttention: present_state (float32 values as float64)


def run(binary: Path, op: str, arrays: dict[str, np.ndarray], params: dict[str, object], out_shape, dtype: str,
        present_shape=None, schedule_seed: int | None = None) -> EmuResult:
    """Runs `op`; threads between barriers run in an order drawn from schedule_seed (default: one
    derived from the parameters, so each case runs under its own interleaving; 0: thread order)."""
    if schedule_seed is None:
        schedule_seed = zlib.crc32(repr(sorted(params.items())).encode()) | 1
    params = dict(params, schedule_seed=schedule_seed)
    with tempfile.TemporaryDirectory() as d:
        for name, arr in arrays.items():
            np.ascontiguousarray(arr).tofile(os.path.join(d, f"{name}.bin"))
        args = [str(binary), op, d] + [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode:
            raise AssertionError(f"emulator run failed ({result.returncode}): {' '.join(args[3:])}\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
        raw = np.fromfile(os.path.join(d, "y.bin"), dtype=raw_dtype(dtype)).reshape(out_shape)
        present = None
        if present_shape is not None:
            present = np.fromfile(os.path.join(d, "present.bin"), dtype=np.float32).reshape(present_shape)
    facts = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return EmuResult(decode(raw, dtype), facts, None if present is None else present.astype(np.float64))
