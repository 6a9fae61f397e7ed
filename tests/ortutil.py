"""Shared helpers for tests: ONNX Runtime sessions with and without the attnexport op library."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

import attnexport


def session(model: onnx.ModelProto | bytes | str, *, with_library: bool, threads: int = 2,
            providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """A session on `model`; with_library registers the op library (kernels), otherwise ORT inlines
    the model-local functions (reference semantics)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if with_library:
        options.register_custom_ops_library(attnexport.library_path())
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=list(providers))


def run(model, feeds: dict[str, np.ndarray], *, with_library: bool, threads: int = 2) -> list[np.ndarray]:
    return session(model, with_library=with_library, threads=threads).run(None, feeds)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0
