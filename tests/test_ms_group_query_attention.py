"""com.microsoft GroupQueryAttention (no KV cache): causal, seqlens_k as right padding, local windows,
packed QKV. Linear conversion verifies; sparse conversion reproduces the op exactly, padded inputs
included."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import attnexport
from attnexport.methods import METHODS

HIDDEN, HEADS, KV_HEADS = 32, 4, 2
HEAD_DIM = HIDDEN // HEADS


def gqa_model(*, packed: bool = False, local_window: int = -1, opset: int = 18) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HEAD_DIM
    inits, nodes = [], []

    def weight(name, cols):
        inits.append(numpy_helper.from_array((rng.standard_normal((HIDDEN, cols)) / np.sqrt(HIDDEN)).astype(np.float32), name))
        return name

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    # seqlens_k = sum(attention_mask) - 1 (int32), total_sequence_length = S (int32), as fusions compute them
    nodes += [helper.make_node("ReduceSum", ["attention_mask", const("axis1", np.array([1], np.int64))], ["count"], keepdims=0),
              helper.make_node("Sub", ["count", const("one", np.array(1, np.int64))], ["seqlens64"]),
              helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32),
              helper.make_node("Shape", ["x"], ["x_shape"]),
              helper.make_node("Gather", ["x_shape", const("one_idx", np.array(1, np.int64))], ["total64"], axis=0),
              helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32)]
    if packed:
        nodes.append(helper.make_node("MatMul", ["x", weight("w_qkv", HIDDEN + 2 * kv)], ["qkv"]))
        gqa_inputs = ["qkv", "", ""]
    else:
        nodes += [helper.make_node("MatMul", ["x", weight("w_q", HIDDEN)], ["q"]),
                  helper.make_node("MatMul", ["x", weight("w_k", kv)], ["k"]),
                  helper.make_node("MatMul", ["x", weight("w_v", kv)], ["v"])]
        gqa_inputs = ["q", "k", "v"]
    nodes.append(helper.make_node("GroupQueryAttention", gqa_inputs + ["", "", "seqlens_k", "total"],
                                  ["attn", "present_key", "present_value"], domain="com.microsoft",
                                  num_heads=HEADS, kv_num_heads=KV_HEADS, local_window_size=local_window))
    nodes.append(helper.make_node("MatMul", ["attn", weight("w_o", HIDDEN)], ["y"]))
    graph = helper.make_graph(nodes, "gqa",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def right_padded():
    rng = np.random.default_rng(1)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    return {"x": rng.standard_normal((2, 9, HIDDEN)).astype(np.float32), "attention_mask": mask}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("local_window", [-1, 3])
def test_group_query_attention(packed, local_window, tmp_path):
    path = tmp_path / "gqa.onnx"
    onnx.save(gqa_model(packed=packed, local_window=local_window), path)
    (site,) = attnexport.inspect(path)
    assert site.source == "com.microsoft.GroupQueryAttention" and site.replaceable, site.reason
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert site.mask.key_padding_kind == "end_positions" and site.mask.key_padding_offset == 1
    if local_window > 0:
        assert site.mask.describe() == f"window[-{local_window - 1},+0]+key_padding"
    else:
        assert site.mask.describe() == "causal+key_padding"
        out = tmp_path / "linear.onnx"
        attnexport.convert(path, out)
        assert attnexport.verify(path, out, seq_len=8).passed
    if "sparse" in METHODS:
        exact = tmp_path / "sparse.onnx"
        attnexport.convert(path, exact, method="sparse")
        for feeds in (None, right_padded()):
            report = attnexport.verify(path, exact, feeds=feeds, seq_len=8)
            assert report.exact and report.passed, [p for c in report.comparisons for p in c.problems]


def test_kv_cache_and_rotary_are_reported(tmp_path):
    model = gqa_model()
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    node.attribute.append(helper.make_attribute("do_rotary", 1))
    path = tmp_path / "rotary.onnx"
    onnx.save(model, path)
    (site,) = attnexport.inspect(path)
    assert not site.replaceable and "do_rotary" in site.reason
