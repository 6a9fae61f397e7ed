"""ONNX Runtime's CUDA execution provider for attnexport sessions.

onnxruntime (CPU) and onnxruntime-gpu both install the `onnxruntime` module; a GPU install has exactly
one of them, onnxruntime-gpu (README, "GPU"):

    pip install "attnexport[cuda]"            # attnexport, onnxruntime-gpu[cuda,cudnn] (CUDA 13 wheels)
    pip uninstall -y onnxruntime              # attnexport depends on onnxruntime; remove the CPU build,
    pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.27"   # and restore the files it shared

onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels only after
`onnxruntime.preload_dlls()`; `prepare(providers)` calls it once when a session asks for CUDA, and
says (one line) why a CUDA request would end up on the CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from collections.abc import Sequence

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def status() -> str | None:
    """None when ONNX Runtime can run the CUDA execution provider here, else why not (one line)."""
    if CUDA not in ort.get_available_providers():
        cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
        if cpu and gpu:
            return (f"onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed and the CPU build's files won: "
                    "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu")
        return (f"this onnxruntime ({ort.__version__}) has no CUDA execution provider: "
                'pip install "attnexport[cuda]", then remove onnxruntime (README, "GPU")')
    return None


@functools.lru_cache(maxsize=1)
def _preload() -> None:
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - a failed preload only means the system paths are used
            warnings.warn(f"onnxruntime.preload_dlls() failed ({e}); CUDA libraries are looked up on the system paths",
                          stacklevel=3)


def prepare(providers: Sequence | None) -> None:
    """Before creating a session with `providers`: load the CUDA libraries of the nvidia-* wheels when
    CUDA is asked for, and warn (once per reason) when ONNX Runtime cannot provide it."""
    names = [p[0] if isinstance(p, tuple) else p for p in (providers or [])]
    if CUDA not in names:
        return
    why = status()
    if why:
        warnings.warn(f"CUDAExecutionProvider requested but unavailable: {why}", stacklevel=3)
        return
    _preload()
