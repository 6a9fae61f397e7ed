"""ONNX Runtime sessions for attnexport models: with the op library (kernels) or without it (ORT
inlines the model-local functions), from a path, a proto or an onnx_ir model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import onnxruntime as ort

from attnexport.library import library_path

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

ort.set_default_logger_severity(3)


def session_options(*, with_library: bool, threads: int | None = None, optimize: bool = True,
                    external_data_dir: str | None = None, quiet: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        # Keep the graph as written (probing reads values that fusions would remove).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if with_library:
        options.register_custom_ops_library(library_path())
    if external_data_dir:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_data_dir)
    return options


def external_data_dir(model: ir.Model) -> str | None:
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return os.path.abspath(str(value.const_value.base_dir) or ".")
    return None


def create_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, *, with_library: bool,
                   providers: Sequence[str] | None = None, threads: int | None = None,
                   optimize: bool = True, base_dir: str | None = None, quiet: bool = False) -> ort.InferenceSession:
    """A session on `model`. Paths load as ORT loads them (external data beside the file); in-memory
    models keep pointing at their external data through `base_dir` (or the model's own base dir)."""
    providers = list(providers or DEFAULT_PROVIDERS)
    from attnexport import gpu

    gpu.prepare(providers)
    if isinstance(model, (str, os.PathLike)):
        options = session_options(with_library=with_library, threads=threads, optimize=optimize, quiet=quiet)
        return ort.InferenceSession(str(model), options, providers=providers)
    if isinstance(model, ir.Model):
        base_dir = base_dir or external_data_dir(model)
        model = ir.serde.serialize_model(model)
    options = session_options(with_library=with_library, threads=threads, optimize=optimize,
                              external_data_dir=base_dir, quiet=quiet)
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
