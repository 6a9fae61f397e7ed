"""Loading and saving models: clear errors for bad files, external data kept external, atomic writes
that never touch the input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from attnexport.errors import ModelLoadError, OutputPathError

MIN_OPSET = 13


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model as onnx_ir; external tensors stay lazily on disk (any size of model)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph)")
    if not proto.graph.output:
        raise ModelLoadError(f"{path}: the graph has no outputs")
    check_opsets(proto, path)
    _check_external_data_present(proto, path)
    try:
        return _load_ir(path, proto)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be read as an ONNX model ({_first_line(e)})") from None


def _load_ir(path: Path, proto: onnx.ModelProto) -> ir.Model:
    # As ir.load does, without parsing the file a second time: external tensors (memory-mapped on
    # first use) resolve relative to the model's directory.
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        model.graph.meta[_HAD_EXTERNAL_DATA] = True  # the output keeps its data external too
    _load_small_external_tensors(model)
    return model


_HAD_EXTERNAL_DATA = "attnexport.had_external_data"


SMALL_TENSOR_BYTES = 1 << 20


def _load_small_external_tensors(model: ir.Model) -> None:
    """Small external tensors (shapes, axes, scales) are read into memory: ONNX Runtime's shape inference
    cannot read external data of a model given as bytes (as probing and verify give it). Large weights
    stay memory-mapped on disk."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= SMALL_TENSOR_BYTES:
            value.const_value = ir.tensor(tensor.numpy(), name=tensor.name)


def check_opsets(proto: onnx.ModelProto, path: str | os.PathLike = "model") -> None:
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise ModelLoadError(f"{path}: the model imports no default-domain opset")
    version = default[0]
    if version < MIN_OPSET:
        raise ModelLoadError(f"{path}: opset {version} is older than {MIN_OPSET}, the oldest attnexport supports "
                             f"(upgrade it with onnx.version_converter)")
    known = onnx.defs.onnx_opset_version()
    if version > known:
        raise ModelLoadError(f"{path}: opset {version} is newer than the installed onnx {onnx.__version__} knows "
                             f"({known}); upgrade onnx")


def _check_external_data_present(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and not (base / location).is_file():
                raise ModelLoadError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")


def opset_of(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def has_external_data(model: ir.Model) -> bool:
    """Did the model come with external data (or does it hold external tensors now)?"""
    if model.graph.meta.get(_HAD_EXTERNAL_DATA):
        return True
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Refuse to write over the input (or its external data); return the resolved output path."""
    src = Path(input_path).resolve()
    dst = Path(output_path).resolve()
    if dst == src:
        raise OutputPathError(f"output {output_path} is the input model; choose another path (the input is never "
                              "overwritten)")
    if dst.exists() and dst.is_dir():
        raise OutputPathError(f"output {output_path} is a directory")
    if not dst.parent.is_dir():
        raise OutputPathError(f"output directory {dst.parent} does not exist")
    return dst


def save_atomic(model: ir.Model, output_path: str | os.PathLike, *, external_data: bool | None = None,
                size_threshold_bytes: int = 1024, validate=None) -> None:
    """Write `model` to output_path atomically: to temporary files beside it, then renamed into place.

    external_data: True writes initializers to `<name>.data` beside the model; None does so when the
    model already had external data or would exceed protobuf's 2 GB limit.
    validate: called with the temporary model path before anything is renamed; if it raises, nothing
    is written.
    """
    dst = Path(output_path)
    if external_data is None:
        external_data = has_external_data(model) or _estimated_size(model) > 1_800_000_000
    data_name = dst.name + ".data"
    fd, tmp_model = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    # mkstemp makes 0600 files; what we write should carry the user's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    tmp_data = dst.parent / f".{data_name}.tmp{os.getpid()}"
    try:
        if external_data:
            # onnx_ir writes the data file named by `external_data` relative to the model's directory;
            # write under a temporary name, then point the tensors at the final name before renaming.
            ir.save(model, tmp_model, external_data=tmp_data.name, size_threshold_bytes=size_threshold_bytes)
            proto = onnx.load(tmp_model, load_external_data=False)
            for tensor in _all_tensors(proto):
                for entry in tensor.external_data:
                    if entry.key == "location" and entry.value == tmp_data.name:
                        entry.value = data_name
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString())
            if validate is not None:
                _validate_with_data(validate, tmp_model, tmp_data, data_name)
            os.chmod(tmp_data, mode)
            os.replace(tmp_data, dst.parent / data_name)
        else:
            ir.save(model, tmp_model)
            if validate is not None:
                validate(tmp_model)
        os.chmod(tmp_model, mode)
        os.replace(tmp_model, dst)
    except BaseException:
        for leftover in (Path(tmp_model), tmp_data):
            if leftover.exists():
                leftover.unlink()
        raise


def _validate_with_data(validate, tmp_model: str, tmp_data: Path, data_name: str) -> None:
    """Validate before renaming anything: a copy of the model that names the temporary data file."""
    proto = onnx.load(tmp_model, load_external_data=False)
    for tensor in _all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data_name:
                entry.value = tmp_data.name
    fd, check_path = tempfile.mkstemp(prefix=".attnexport-check-", suffix=".onnx", dir=tmp_data.parent)
    os.close(fd)
    try:
        with open(check_path, "wb") as f:
            f.write(proto.SerializeToString())
        validate(check_path)
    finally:
        os.unlink(check_path)


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _estimated_size(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
