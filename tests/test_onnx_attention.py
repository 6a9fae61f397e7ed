"""ONNX's standard Attention op (opset 23+), built by hand: 4-D and 3-D (packed heads) inputs, is_causal,
boolean and additive masks, grouped KV heads, and the forms no attnexport op reproduces (softcap, a read
qk_matmul_output, is_causal with Sq != Skv, which ORT aligns top-left)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import attnexport
from attnexport.methods import METHODS

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def attention_model(*, layout="4d", causal=0, mask=None, kv_heads=HEADS, opset=23, softcap=0.0,
                    read_qk=False, cross=False) -> onnx.ModelProto:
    """x [B, S, 32] → projections → Attention → output projection. mask: None, "bool" (padding from
    attention_mask) or "additive" (a learned [H, S, S]-broadcastable bias on top of padding)."""
    rng = np.random.default_rng(0)
    hidden = HEADS * HEAD_DIM
    inits, nodes = [], []

    def weight(name, cols):
        inits.append(numpy_helper.from_array((rng.standard_normal((hidden, cols)) / np.sqrt(hidden)).astype(np.float32), name))
        return name

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    kv_source = "enc" if cross else "x"
    nodes += [helper.make_node("MatMul", ["x", weight("wq", hidden)], ["q3"]),
              helper.make_node("MatMul", [kv_source, weight("wk", kv_heads * HEAD_DIM)], ["k3"]),
              helper.make_node("MatMul", [kv_source, weight("wv", kv_heads * HEAD_DIM)], ["v3"])]
    if layout == "4d":
        for name, heads in (("q", HEADS), ("k", kv_heads), ("v", kv_heads)):
            nodes += [helper.make_node("Reshape", [f"{name}3", const(f"{name}_shape", np.array([0, 0, heads, HEAD_DIM], np.int64))], [f"{name}_bshd"]),
                      helper.make_node("Transpose", [f"{name}_bshd"], [name], perm=[0, 2, 1, 3])]
        q, k, v = "q", "k", "v"
        attrs = {}
    else:
        q, k, v = "q3", "k3", "v3"
        attrs = {"q_num_heads": HEADS, "kv_num_heads": kv_heads}
    inputs = [q, k, v]
    if mask is not None:
        # [B, 1, Sq, Skv], as exporters give it (ORT's Attention does not broadcast a [B, 1, 1, Skv] mask)
        nodes += [helper.make_node("Unsqueeze", ["attention_mask", const("axes12", np.array([1, 2], np.int64))], ["m11"]),
                  helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Shape", ["attention_mask"], ["ms"]),
                  helper.make_node("Gather", ["xs", const("i0", np.array([0], np.int64))], ["bdim"], axis=0),
                  helper.make_node("Gather", ["xs", const("i1", np.array([1], np.int64))], ["qdim"], axis=0),
                  helper.make_node("Gather", ["ms", const("i1m", np.array([1], np.int64))], ["kdim"], axis=0),
                  helper.make_node("Concat", ["bdim", const("one1", np.array([1], np.int64)), "qdim", "kdim"], ["mshape"], axis=0),
                  helper.make_node("Expand", ["m11", "mshape"], ["m4"]),
                  helper.make_node("Cast", ["m4"], ["mbool"], to=TensorProto.BOOL)]
        if mask == "bool":
            inputs.append("mbool")
        else:
            bias = (rng.standard_normal((1, HEADS, 1, 1)) * 0.5).astype(np.float32)
            nodes += [helper.make_node("Where", ["mbool", const("zero", np.array(0, np.float32)),
                                                 const("lowest", np.array(-1e9, np.float32))], ["madd"]),
                      helper.make_node("Add", ["madd", const("head_bias", bias)], ["mbias"])]
            inputs.append("mbias")
    outputs = ["y4", "", "", "qk"] if read_qk else ["y4"]
    attrs |= {"is_causal": causal}
    if softcap:
        attrs["softcap"] = softcap
    if read_qk:
        attrs["qk_matmul_output_mode"] = 0
    nodes.append(helper.make_node("Attention", inputs, outputs, **attrs))
    if layout == "4d":
        nodes += [helper.make_node("Transpose", ["y4"], ["y_bshd"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["y_bshd", const("merge", np.array([0, 0, -1], np.int64))], ["y3"])]
    else:
        nodes.append(helper.make_node("Identity", ["y4"], ["y3"]))
    nodes.append(helper.make_node("MatMul", ["y3", weight("wo", hidden)], ["y"]))
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "kv_sequence" if cross else "sequence"])]
    if cross:
        graph_inputs.append(helper.make_tensor_value_info("enc", TensorProto.FLOAT, ["batch", "kv_sequence", hidden]))
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])]
    if read_qk:
        graph_outputs.append(helper.make_tensor_value_info("qk", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", graph_inputs, graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def padded_feeds(seq=9, batch=2):
    rng = np.random.default_rng(2)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0
    mask[1, :3] = 0
    return {"x": rng.standard_normal((batch, seq, HEADS * HEAD_DIM)).astype(np.float32), "attention_mask": mask}


CASES = {
    "4d": dict(),
    "3d": dict(layout="3d"),
    "4d-causal": dict(causal=1),
    "3d-causal-gqa": dict(layout="3d", causal=1, kv_heads=KV_HEADS),
    "4d-bool-mask-gqa": dict(mask="bool", kv_heads=KV_HEADS),
    "3d-causal-bool-mask": dict(layout="3d", causal=1, mask="bool"),
    "opset24": dict(opset=24, mask="bool"),
}
EXPECTED_MASK = {"4d": "none", "3d": "none", "4d-causal": "causal", "3d-causal-gqa": "causal",
                 "4d-bool-mask-gqa": "key_padding", "3d-causal-bool-mask": "causal+key_padding", "opset24": "key_padding"}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_op_converts_and_verifies(case, tmp_path):
    kwargs = CASES[case]
    path = tmp_path / "m.onnx"
    onnx.save(attention_model(**kwargs), path)
    (site,) = attnexport.inspect(path)
    assert site.source == "onnx.Attention" and site.replaceable, site.reason
    assert site.mask.describe() == EXPECTED_MASK[case]
    assert site.num_kv_heads == kwargs.get("kv_heads", HEADS)
    out = tmp_path / "linear.onnx"
    attnexport.convert(path, out)
    assert attnexport.verify(path, out, seq_len=8).passed
    if "sparse" in METHODS:
        exact = tmp_path / "sparse.onnx"
        attnexport.convert(path, exact, method="sparse")
        for feeds in (None, padded_feeds()):
            report = attnexport.verify(path, exact, feeds=feeds, seq_len=8)
            assert report.exact and report.passed, [p for c in report.comparisons for p in c.problems]


def test_additive_mask_is_a_bias(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(attention_model(mask="additive"), path)
    (site,) = attnexport.inspect(path)
    assert site.replaceable and site.mask.kind == "bias"
    with pytest.raises(attnexport.AttnExportError, match="position bias"):
        attnexport.convert(path, tmp_path / "linear.onnx")
    if "sparse" in METHODS:
        attnexport.convert(path, tmp_path / "sparse.onnx", method="sparse")
        report = attnexport.verify(path, tmp_path / "sparse.onnx", feeds=padded_feeds())
        assert report.exact and report.passed, [p for c in report.comparisons for p in c.problems]


@pytest.mark.parametrize("kwargs,reason", [
    (dict(softcap=30.0), "softcap"),
    (dict(read_qk=True), "qk_matmul_output"),
    (dict(causal=1, cross=True), "top-left"),
])
def test_forms_that_are_left_alone(kwargs, reason, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(attention_model(**kwargs), path)
    (site,) = attnexport.inspect(path)
    assert not site.replaceable and reason in site.reason
    with pytest.raises(attnexport.AttnExportError, match="nothing written"):
        attnexport.convert(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
