"""An attention whose output is itself a graph output (no projection after it): the replacement takes
over the output's name, and the converted model keeps the declared type and shape of that output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import attnexport
from attnexport.methods import MethodOptions


def bare_attention(causal: bool) -> onnx.ModelProto:
    dims = ["batch", 2, "seq", 8]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("q", "k", "v")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["ss"])]
    inits = [numpy_helper.from_array(np.array(8 ** -0.5, np.float32), "scale")]
    logits = "ss"
    if causal:
        inits.append(numpy_helper.from_array(np.triu(np.full((64, 64), -1e9, np.float32), 1), "tri"))
        nodes += [helper.make_node("Shape", ["q"], ["qs"], start=2, end=3),
                  helper.make_node("Slice", ["tri", "zero", "qs", "zero"], ["tri_r"]),
                  helper.make_node("Slice", ["tri_r", "zero", "qs", "one"], ["tri_rc"]),
                  helper.make_node("Add", ["ss", "tri_rc"], ["sm"])]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
        logits = "sm"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["y"])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, "bare", inputs, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("method", ["linear", "sparse"])
def test_attention_output_is_a_graph_output(method, causal, tmp_path, op_library):
    src = tmp_path / "bare.onnx"
    onnx.save(bare_attention(causal), src)
    (site,) = attnexport.inspect(src)
    assert site.replaceable, site.reason
    options = MethodOptions(window=-1) if method == "sparse" else None
    result = attnexport.convert(src, tmp_path / f"bare.{method}.onnx", method=method, options=options)
    converted = onnx.load(result.output_path)
    (y,) = converted.graph.output
    assert y.name == "y" and y.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["batch", 2, "seq", 8]
    report = attnexport.verify(src, result.output_path)
    assert report.passed, report
