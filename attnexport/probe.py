"""Evaluate intermediate values of a model: a copy of the model with the requested values as its
graph outputs runs in ONNX Runtime, which computes only what those outputs need."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from attnexport.errors import AttnExportError
from attnexport.runtime import create_session, external_data_dir


class ProbeError(AttnExportError):
    """The model could not be run on the probe inputs."""


def model_with_outputs(model: ir.Model, names: list[str]) -> onnx.ModelProto:
    """A proto of `model` whose graph outputs are the values `names`; `model` itself is untouched."""
    proto = ir.serde.serialize_model(model)
    value_info = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output)}
    del proto.graph.output[:]
    for name in dict.fromkeys(names):
        proto.graph.output.append(value_info.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return proto


def evaluate(model: ir.Model, names: list[str], feeds: dict[str, np.ndarray], *,
             with_library: bool = False) -> dict[str, np.ndarray]:
    """Values of `names` for `feeds`; graph inputs among `names` come straight from the feeds."""
    input_names = {v.name for v in model.graph.inputs}
    out = {n: feeds[n] for n in names if n in input_names and n in feeds}
    wanted = [n for n in dict.fromkeys(names) if n not in input_names]
    if not wanted:
        return out
    proto = model_with_outputs(model, wanted)
    try:
        # quiet: a failed probe is reported in one line; ORT's own error log would only add noise.
        session = create_session(proto, with_library=with_library, optimize=False,
                                 base_dir=external_data_dir(model), quiet=True)
        accepted = {i.name for i in session.get_inputs()}
        values = session.run(wanted, {k: v for k, v in feeds.items() if k in accepted})
    except Exception as e:  # ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProbeError(f"running the model on probe inputs failed: {first[:300]}") from None
    out.update(zip(wanted, values))
    return out
