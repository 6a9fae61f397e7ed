"""Run a candidate replacement op on recorded Q, K, V: a one-node model per candidate (the op with its
attributes and initializers), in ONNX Runtime with the kernels — exactly what the converted model
will run — or, without the op library, with the op's reference function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from attnexport.calibration.recording import SiteBatch
from attnexport.errors import LibraryNotFoundError
from attnexport.library import library_path
from attnexport.methods import Replacement
from attnexport.ops.functions import attach_functions
from attnexport.ops.schema import DOMAIN, DOMAIN_VERSION
from attnexport.runtime import create_session

OPSET = 18


def library_available() -> bool:
    try:
        library_path()
        return True
    except LibraryNotFoundError:
        return False


class OpRunner:
    """Evaluates one Replacement on SiteBatches; the session is built once per candidate."""

    def __init__(self, replacement: Replacement, batch: SiteBatch, *, threads: int | None = None):
        self.replacement = replacement
        schema = replacement.op
        dtype = onnx.helper.np_dtype_to_tensor_dtype(batch.q.dtype)
        feeds = {"Q": batch.q, "K": batch.k, "V": batch.v}
        if batch.key_padding_mask is not None:
            feeds["key_padding_mask"] = batch.key_padding_mask
        self.input_names = [spec.name for spec in schema.inputs if spec.name in feeds]
        graph_inputs = [onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.BOOL if name == "key_padding_mask" else dtype,
            [None] * feeds[name].ndim) for name in self.input_names]
        initializers = [onnx.numpy_helper.from_array(np.asarray(array), name)
                        for name, array in replacement.extra_inputs.items()]
        wanted = {spec.name for spec in schema.inputs if spec.name in feeds or spec.name in replacement.extra_inputs}
        ordered = [spec.name if spec.name in wanted else "" for spec in schema.inputs]
        while ordered and not ordered[-1]:
            ordered.pop()
        outputs = ["Y"] + [f"unused_{spec.name}" for spec in schema.outputs[1:] if not spec.optional]
        node = onnx.helper.make_node(schema.name, ordered, outputs, domain=DOMAIN, **replacement.attributes)
        graph = onnx.helper.make_graph([node], "calibration_candidate", graph_inputs,
                                       [onnx.helper.make_tensor_value_info("Y", dtype, None)], initializers)
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                             onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
        model = ir.serde.deserialize_model(proto)
        with_library = library_available()
        if not with_library:
            attach_functions(model)
        self.session = create_session(model, with_library=with_library, threads=threads, quiet=True)

    def __call__(self, batch: SiteBatch) -> np.ndarray:
        feeds = {"Q": batch.q, "K": batch.k, "V": batch.v, "key_padding_mask": batch.key_padding_mask}
        (y,) = self.session.run(["Y"], {name: feeds[name] for name in self.input_names})
        if self.replacement.output_map is not None:
            weight, bias = self.replacement.output_map
            y = y @ weight + bias
        return y
