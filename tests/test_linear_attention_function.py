"""LinearAttention's three forms agree: the ONNX function (ONNX Runtime without the op library, and
onnx.reference), the CPU kernel (ONNX Runtime with the library) and the numpy reference.

Models are built here from hand-written nodes and completed by `attach_functions`, at every opset
from 13 to 23 that matters (argument changes at 13, 15, 18; newer op versions at 17, 21, 23).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnexport.errors import UnsupportedError
from attnexport.ops import linear_attention as la
from attnexport.ops.functions import attach_functions, reference_evaluator
from ortutil import session

OPSETS = (13, 15, 17, 18, 21, 23)
CONFIGS = [("elu1", "zero"), ("relu", "zero"), ("taylor2", "zero"), ("taylor2", "mean"), ("taylor2", "max"),
           ("favor", "zero")]
NUM_FEATURES = 6
BHSD = ["b", "h", "s", "d"]


@dataclass(frozen=True)
class Node:
    """One LinearAttention node of a test model; `attributes` None writes every attribute."""

    feature_map: str = "elu1"
    expansion_point: str = "zero"
    causal: int = 0
    mask: bool = False
    scale: float = float("nan")
    eps: float = 1e-6
    omit: tuple[str, ...] = ()  # attributes left off the node

    def attributes(self) -> dict:
        values = dict(feature_map=self.feature_map, expansion_point=self.expansion_point, causal=self.causal,
                      scale=self.scale, eps=self.eps)
        return {k: v for k, v in values.items() if k not in self.omit}

    def reference(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return la.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"] if self.mask else None,
                            feeds.get("W") if self.feature_map == "favor" else None, causal=self.causal,
                            feature_map=self.feature_map, expansion_point=self.expansion_point, scale=self.scale,
                            eps=self.eps)


@dataclass(frozen=True)
class Shape:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 1
    q_len: int = 3
    kv_len: int = 5
    head_dim: int = 4
    value_dim: int = 3


SHAPES = {
    "gqa4_sq<skv": Shape(q_heads=4, kv_heads=1, q_len=3, kv_len=6),
    "sq>skv_dk!=dv": Shape(q_heads=4, kv_heads=2, q_len=5, kv_len=3, head_dim=5, value_dim=2),
    "sq1": Shape(q_heads=2, kv_heads=2, q_len=1, kv_len=4),
}


@dataclass
class Case:
    model: onnx.ModelProto
    nodes: list[Node]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

    def references(self) -> list[np.ndarray]:
        return [n.reference(self.feeds) for n in self.nodes]


def build(nodes: list[Node], opset: int, dtype=np.float32, *, attach: bool = True, **opsets: int) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(name, elem, ["b", f"h{name}", f"s{name}", f"d{name}"]) for name in "QKV"]
    if any(n.mask for n in nodes):
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
    if any(n.feature_map == "favor" for n in nodes):
        inputs.append(helper.make_tensor_value_info("W", elem, ["dQ", "f"]))
    graph_nodes, outputs = [], []
    for i, n in enumerate(nodes):
        names = ["Q", "K", "V", "M" if n.mask else "", "W" if n.feature_map == "favor" else ""]
        while not names[-1]:
            names.pop()
        graph_nodes.append(helper.make_node("LinearAttention", names, [f"Y{i}"], domain="attnexport", name=f"node{i}",
                                            **n.attributes()))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", elem, ["b", "hQ", "sQ", "dV"]))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d.replace("_", "."), v) for d, v in opsets.items()]
    model = helper.make_model(helper.make_graph(graph_nodes, "test", inputs, outputs), opset_imports=imports,
                              ir_version=8)
    return attach_functions(model) if attach else model


def feeds_for(shape: Shape, dtype=np.float32, *, magnitude: tuple[float, float] | None = None,
              seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(*dims):
        if magnitude is None:
            return rng.normal(size=dims)
        return rng.choice([-1.0, 1.0], size=dims) * rng.uniform(*magnitude, size=dims)

    s = shape
    mask = rng.random((s.batch, s.kv_len)) < 0.7
    mask[0, 0] = True
    mask[-1, :] = False  # a fully padded batch row
    return {
        "Q": draw(s.batch, s.q_heads, s.q_len, s.head_dim).astype(dtype),
        "K": draw(s.batch, s.kv_heads, s.kv_len, s.head_dim).astype(dtype),
        "V": rng.normal(size=(s.batch, s.kv_heads, s.kv_len, s.value_dim)).astype(dtype),
        "M": mask,
        "W": rng.normal(size=(s.head_dim, NUM_FEATURES)).astype(dtype),
    }


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, with_library: bool) -> list[np.ndarray]:
    sess = session(model, with_library=with_library)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def run_reference_evaluator(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = {i.name for i in model.graph.input}
    return reference_evaluator(model).run(None, {k: v for k, v in feeds.items() if k in names})


def assert_matches(outputs, nodes, references, *, form: str, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    assert len(outputs) == len(nodes)
    for node, out, ref in zip(nodes, outputs, references):
        assert out.shape == ref.shape, f"{form}: {node}: shape {out.shape} != {ref.shape}"
        assert np.all(np.isfinite(out)), f"{form}: {node}: not finite"
        scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{form} disagrees with the numpy reference for {node}")


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


# -- every configuration, every opset -----------------------------------------------------------

ALL_NODES = [Node(f, e, causal, mask) for (f, e), causal, mask in itertools.product(CONFIGS, (0, 1), (False, True))]


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("opset", OPSETS)
def test_three_forms_agree(opset, shape_name, op_library):
    """One model per opset and shape with every feature map x expansion point x causal x padding
    (so it also mixes feature maps, causal and non-causal nodes, nodes with and without a mask):
    the function in ONNX Runtime and in onnx.reference, and the kernel, match the numpy reference."""
    model = build(ALL_NODES, opset)
    check(model)
    feeds = feeds_for(SHAPES[shape_name])
    refs = [n.reference(feeds) for n in ALL_NODES]
    assert_matches(run_ort(model, feeds, with_library=False), ALL_NODES, refs, form=f"function (ORT, opset {opset})")
    assert_matches(run_reference_evaluator(model, feeds), ALL_NODES, refs,
                   form=f"function (onnx.reference, opset {opset})")
    assert_matches(run_ort(model, feeds, with_library=True), ALL_NODES, refs, form="kernel")


def test_rows_without_visible_keys_are_zero(op_library):
    """Causal with Sq > Skv hides every key from the first rows; a fully padded batch row too."""
    shape = Shape(batch=2, q_heads=2, kv_heads=1, q_len=6, kv_len=3)
    nodes = [Node(f, e, causal=1, mask=True) for f, e in CONFIGS]
    model = build(nodes, 18)
    feeds = feeds_for(shape)
    for form, outs in (("function", run_ort(model, feeds, with_library=False)),
                       ("kernel", run_ort(model, feeds, with_library=True)),
                       ("reference evaluator", run_reference_evaluator(model, feeds))):
        for node, y in zip(nodes, outs):
            assert np.all(y[1] == 0), f"{form} {node}: fully padded batch row is not 0"
            assert np.all(y[0, :, :3] == 0), f"{form} {node}: rows before the first key are not 0"


# -- float16 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", (15, 18, 23))
def test_float16(opset, op_library):
    """float16 in and out, float32 inside: both forms match the reference on the rounded inputs."""
    nodes = [Node(f, e, causal, mask=True) for (f, e), causal in zip(CONFIGS, itertools.cycle((0, 1)))]
    model = build(nodes, opset, np.float16)
    check(model)
    feeds = feeds_for(SHAPES["gqa4_sq<skv"], np.float16)
    refs = [n.reference(feeds) for n in nodes]
    for with_library, form in ((False, "function"), (True, "kernel")):
        outs = run_ort(model, feeds, with_library=with_library)
        assert all(y.dtype == np.float16 for y in outs)
        assert_matches(outs, nodes, refs, form=f"{form} (float16, opset {opset})", rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("opset", (13, 14))
def test_float16_below_opset_15_casts_to_the_nodes_dtype(opset):
    """No CastLike before opset 15: the function casts its result to the dtype all nodes share."""
    nodes = [Node(), Node(causal=1)]
    model = build(nodes, opset, np.float16)
    feeds = feeds_for(SHAPES["gqa4_sq<skv"], np.float16)
    refs = [n.reference(feeds) for n in nodes]
    for with_library, form in ((False, "function"), (True, "kernel")):
        outs = run_ort(model, feeds, with_library=with_library)
        assert all(y.dtype == np.float16 for y in outs)
        assert_matches(outs, nodes, refs, form=f"{form} (float16, opset {opset})", rtol=2e-3, atol=2e-3)


# -- large magnitudes -----------------------------------------------------------------------------


def large_inputs(shape: Shape) -> dict[str, np.ndarray]:
    feeds = feeds_for(shape, magnitude=(30.0, 100.0), seed=3)
    feeds["M"][-1, 1:] = True  # no fully padded row: with eps = 0 the reference divides 0 by 0 there
    feeds["W"] = feeds_for(shape, seed=4)["W"]  # the projection keeps its usual scale
    return feeds


LARGE_TOLERANCE = dict(rtol=1e-2, atol=1e-3)  # float32 round-off of logits ~1e4 or log-features ~1e3


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("favor", "taylor2")], ids="-".join)
def test_large_magnitude_inputs(config, op_library):
    """|q|, |k| in 30..100: finite, and the float32 forms match the float64 reference.

    (For favor, A_ij = phi(q_i).phi(k_j) ~ exp(-|q|^2/2 - |k|^2/2) is then far below any eps > 0 and
    the exact output is ~0; see test_large_magnitude_favor_without_eps for the non-trivial case.)"""
    feature_map, expansion_point = config
    eps_values = (1e-6,) if feature_map == "favor" else (1e-6, 0.0)
    nodes = [Node(feature_map, expansion_point, causal, mask=True, eps=eps) for causal in (0, 1) for eps in eps_values]
    model = build(nodes, 18)
    feeds = large_inputs(SHAPES["gqa4_sq<skv"])
    with np.errstate(over="ignore"):
        refs = [n.reference(feeds) for n in nodes]
    assert all(np.all(np.isfinite(r)) for r in refs)
    assert_matches(run_ort(model, feeds, with_library=False), nodes, refs, form="function", **LARGE_TOLERANCE)
    with np.errstate(over="ignore"):
        assert_matches(run_reference_evaluator(model, feeds), nodes, refs, form="reference evaluator",
                       **LARGE_TOLERANCE)
    assert_matches(run_ort(model, feeds, with_library=True), nodes, refs, form="kernel", **LARGE_TOLERANCE)


def favor_exact(feeds: dict[str, np.ndarray], node: Node) -> np.ndarray:
    """favor in float64 and log space, for any eps including 0 (the reference's semantics; reference.py
    itself computes eps * exp(-row max) = 0 * inf there)."""
    from attnexport.ops import reference as ref

    q, k, v, w = (feeds[n].astype(np.float64) for n in "QKVW")
    k, v = ref.expand_kv_heads(k, q.shape[1]), ref.expand_kv_heads(v, q.shape[1])
    root = (ref.default_scale(q.shape[-1]) if np.isnan(node.scale) else node.scale) ** 0.5
    pair = ref._favor_log_features(root * q, w)[..., :, None, :] + ref._favor_log_features(root * k, w)[..., None, :, :]
    peak = pair.max(axis=-1)
    log_weights = peak + np.log(np.exp(pair - peak[..., None]).sum(axis=-1))
    vis = ref.visibility(q.shape[0], q.shape[2], k.shape[2], causal=bool(node.causal),
                         key_padding_mask=feeds["M"] if node.mask else None)
    log_weights = np.where(vis, log_weights, -np.inf)
    row_max = log_weights.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(log_weights - row_max)
    den = weights.sum(axis=-1, keepdims=True) + (np.exp(np.log(node.eps) - row_max) if node.eps > 0 else 0.0)
    return np.where(den > 0, (weights @ v) / np.where(den > 0, den, 1.0), 0.0)


LARGE_FAVOR = [Node("favor", causal=causal, mask=True, eps=0.0) for causal in (0, 1)]


def test_large_magnitude_favor_without_eps():
    """eps = 0, |q|, |k| in 30..100: the weights span thousands of orders of magnitude and only their
    ratios are representable; the function's exact stabilisation keeps them."""
    model = build(LARGE_FAVOR, 18)
    feeds = large_inputs(SHAPES["gqa4_sq<skv"])
    expected = [favor_exact(feeds, n) for n in LARGE_FAVOR]
    assert all(np.max(np.abs(e)) > 0.1 for e in expected), "the case should not be trivially 0"
    assert_matches(run_ort(model, feeds, with_library=False), LARGE_FAVOR, expected, form="function",
                   **LARGE_TOLERANCE)
    with np.errstate(over="ignore"):
        assert_matches(run_reference_evaluator(model, feeds), LARGE_FAVOR, expected, form="reference evaluator",
                       **LARGE_TOLERANCE)


def test_large_magnitude_favor_without_eps_kernel(op_library):
    model = build(LARGE_FAVOR, 18)
    feeds = large_inputs(SHAPES["gqa4_sq<skv"])
    expected = [favor_exact(feeds, n) for n in LARGE_FAVOR]
    assert_matches(run_ort(model, feeds, with_library=True), LARGE_FAVOR, expected, form="kernel", **LARGE_TOLERANCE)


def test_large_magnitude_favor_without_eps_reference():
    feeds = large_inputs(SHAPES["gqa4_sq<skv"])
    with np.errstate(over="ignore", invalid="ignore"):
        got = [n.reference(feeds) for n in LARGE_FAVOR]
    for node, y in zip(LARGE_FAVOR, got):
        np.testing.assert_allclose(y, favor_exact(feeds, node), rtol=1e-9, atol=1e-12)


# -- attributes, defaults, placeholders ---------------------------------------------------------


def test_nodes_omitting_attributes_are_completed(op_library):
    """Hand-written nodes that leave attributes off get every attribute written by attach_functions,
    so every runtime reads the same values."""
    nodes = [Node(omit=("feature_map", "expansion_point", "causal", "scale", "eps")),
             Node("taylor2", "mean", causal=1, omit=("scale", "eps")),
             Node("favor", omit=("expansion_point",)),
             Node("relu", scale=2, causal=True, eps=1)]  # int scale and eps, bool causal: retyped
    model = build(nodes, 17)
    check(model)
    kinds = {"float": onnx.AttributeProto.FLOAT, "int": onnx.AttributeProto.INT, "string": onnx.AttributeProto.STRING}
    for node in (n for n in model.graph.node if n.op_type == "LinearAttention"):
        assert {a.name: a.type for a in node.attribute} == {a.name: kinds[a.kind] for a in la.SCHEMA.attributes}
        assert len(node.input) == len(la.SCHEMA.inputs)
    feeds = feeds_for(SHAPES["sq1"])
    refs = [n.reference(feeds) for n in nodes]
    assert_matches(run_ort(model, feeds, with_library=False), nodes, refs, form="function")
    assert_matches(run_reference_evaluator(model, feeds), nodes, refs, form="reference evaluator")
    assert_matches(run_ort(model, feeds, with_library=True), nodes, refs, form="kernel")


def _with_function_only(nodes: list[Node], opset: int, variants) -> onnx.ModelProto:
    """The nodes as written (no completion), plus a function built directly."""
    model = build(nodes, opset, attach=False)
    model.functions.append(la.build_function(opset, variants))
    model.opset_import.extend([helper.make_opsetid("attnexport", 1), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 9
    return model


def test_function_attribute_defaults():
    """ONNX Runtime applies the function's attribute defaults to a node that omits an attribute;
    plain onnx.reference does not (reference_evaluator() fills them in, attach_functions writes them)."""
    nodes = [Node(omit=("feature_map", "expansion_point", "causal", "scale", "eps"))]
    model = _with_function_only(nodes, 18, [{}])
    feeds = feeds_for(SHAPES["sq1"])
    refs = [n.reference(feeds) for n in nodes]
    assert_matches(run_ort(model, feeds, with_library=False), nodes, refs, form="function (ORT, defaults)")
    assert_matches(reference_evaluator(model).run(None, {k: feeds[k] for k in "QKV"}), nodes, refs,
                   form="reference_evaluator (defaults)")
    from onnx.reference import ReferenceEvaluator

    with pytest.raises(Exception):  # noqa: B017 - onnx.reference: LinearAttention-27's schema, or no defaults
        ReferenceEvaluator(model).run(None, {k: feeds[k] for k in "QKV"})


def test_absent_projection_beside_a_favor_branch_needs_a_placeholder():
    """Why attach_functions gives projection-less nodes a placeholder when another node uses favor:
    ONNX Runtime rejects the model otherwise, although the favor branch is never taken for that node."""
    nodes = [Node("favor"), Node("elu1")]
    model = _with_function_only(nodes, 18, [{"feature_map": "favor", "projection": True},
                                            {"feature_map": "elu1", "projection": True}])
    with pytest.raises(Exception, match="empty string|invalid|Invalid"):
        session(model, with_library=False)
    attached = build(nodes, 18)
    elu_node = [n for n in attached.graph.node if n.op_type == "LinearAttention"][1]
    assert elu_node.input[4], "the elu1 node got no placeholder projection"
    feeds = feeds_for(SHAPES["sq1"])
    assert_matches(run_ort(attached, feeds, with_library=False), nodes, [n.reference(feeds) for n in nodes],
                   form="function")


def test_only_used_branches_are_built():
    single = la.build_function(18, [{"feature_map": "relu"}])
    assert not any(n.op_type in ("If", "LabelEncoder") for n in single.node)
    assert all(o.domain != "ai.onnx.ml" for o in single.opset_import)
    mixed = la.build_function(18, [{"feature_map": "relu"}, {"feature_map": "taylor2", "expansion_point": "max"}])
    assert any(n.op_type == "LabelEncoder" for n in mixed.node)
    assert not any(n.op_type == "Loop" for n in _all_nodes(mixed.node))  # no favor branch


def _all_nodes(nodes):
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g.node)


# -- where nodes live, representations, model plumbing -----------------------------------------


def test_nodes_in_subgraphs(op_library):
    """A LinearAttention inside an If branch gets the function (and its placeholder) too."""
    inner = build([Node("taylor2", "max", causal=1)], 18, attach=False).graph.node[0]
    inner.output[0] = "Y_inner"
    outer = build([Node("favor", mask=True)], 18, attach=False)
    then_graph = helper.make_graph([inner], "then", [], [helper.make_tensor_value_info("Y_inner", TensorProto.FLOAT, BHSD)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["Q"], ["Z"])], "else", [],
                                   [helper.make_tensor_value_info("Z", TensorProto.FLOAT, BHSD)])
    outer.graph.input.append(helper.make_tensor_value_info("C", TensorProto.BOOL, []))
    outer.graph.node.append(helper.make_node("If", ["C"], ["Y1"], then_branch=then_graph, else_branch=else_graph))
    outer.graph.output.append(helper.make_tensor_value_info("Y1", TensorProto.FLOAT, BHSD))
    attach_functions(outer)
    check(outer)
    assert [f.name for f in outer.functions] == ["LinearAttention"]
    feeds = feeds_for(SHAPES["gqa4_sq<skv"])
    feeds["C"] = np.array(True)
    nodes = [Node("favor", mask=True), Node("taylor2", "max", causal=1)]
    refs = [n.reference(feeds) for n in nodes]
    assert_matches(run_ort(outer, feeds, with_library=False), nodes, refs, form="function")
    assert_matches(run_ort(outer, feeds, with_library=True), nodes, refs, form="kernel")


def test_onnx_ir_model_gives_the_same_model_as_the_proto():
    nodes = [Node("elu1", mask=True), Node("taylor2", "mean", causal=1), Node("favor", causal=1)]
    proto = build(nodes, 17)
    model = ir.serde.deserialize_model(build(nodes, 17, attach=False))
    assert attach_functions(model) is model
    from_ir = ir.serde.serialize_model(model)
    check(from_ir)
    assert len(from_ir.functions) == 1
    assert from_ir.functions[0].SerializeToString() == proto.functions[0].SerializeToString()
    assert {(o.domain, o.version) for o in from_ir.opset_import} == {(o.domain, o.version) for o in proto.opset_import}
    feeds = feeds_for(SHAPES["sq1"])
    for a, b in zip(run_ort(from_ir, feeds, with_library=False), run_ort(proto, feeds, with_library=False)):
        np.testing.assert_array_equal(a, b)


def test_external_data_not_loaded(tmp_path):
    """Initializers stored outside the model, not loaded: attach_functions never reads them."""
    nodes = [Node("favor", causal=1), Node("relu", mask=True)]
    model = build(nodes, 18, attach=False)
    feeds = feeds_for(SHAPES["sq1"])
    w = model.graph.input.pop(4)  # W becomes an external initializer
    assert w.name == "W"
    model.graph.initializer.append(numpy_helper.from_array(feeds["W"], "W"))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0,
              location="m.data")
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    attach_functions(lazy)
    onnx.save(lazy, tmp_path / "m2.onnx")
    onnx.checker.check_model(str(tmp_path / "m2.onnx"), full_check=True)
    out = session(str(tmp_path / "m2.onnx"), with_library=False).run(None, {k: feeds[k] for k in "QKVM"})
    assert_matches(out, nodes, [n.reference(feeds) for n in nodes], form="function (external data)")


def test_attach_is_idempotent_and_replaces_its_function():
    model = build([Node("relu")], 18)
    first = model.functions[0].SerializeToString()
    attach_functions(model)
    assert len(model.functions) == 1 and model.functions[0].SerializeToString() == first
    # A new node with another feature map: the function is rebuilt with both branches.
    extra = helper.make_node("LinearAttention", ["Q", "K", "V"], ["Y9"], domain="attnexport", feature_map="taylor2")
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("Y9", TensorProto.FLOAT, BHSD))
    attach_functions(model)
    assert len(model.functions) == 1
    assert any(n.op_type == "LabelEncoder" for n in model.functions[0].node)
    check(model)


def test_model_ml_opset_is_used():
    """A model importing ai.onnx.ml 3 gets a function importing ml 3 (the checker wants them equal)."""
    nodes = [Node("relu"), Node("elu1")]
    model = build(nodes, 18, ai_onnx_ml=3)
    check(model)
    assert {(o.domain, o.version) for o in model.functions[0].opset_import} == {("", 18), ("ai.onnx.ml", 3)}
    feeds = feeds_for(SHAPES["sq1"])
    assert_matches(run_ort(model, feeds, with_library=False), nodes, [n.reference(feeds) for n in nodes],
                   form="function (ml 3)")


@pytest.mark.parametrize("problem, nodes, opset, match", [
    ("old opset", [Node()], 12, "opset >= 13"),
    ("favor without projection", None, 18, "projection"),
    ("bad feature map", None, 18, "feature_map"),
    ("unknown op", None, 18, "no ONNX function"),
    ("ml opset 1", [Node("relu"), Node("elu1")], 18, "ai.onnx.ml opset 1"),
])
def test_refusals(problem, nodes, opset, match):
    model = build(nodes or [Node()], opset, attach=False, **({"ai_onnx_ml": 1} if problem == "ml opset 1" else {}))
    node = model.graph.node[0]
    if problem == "favor without projection":
        node.attribute[[a.name for a in node.attribute].index("feature_map")].s = b"favor"
    elif problem == "bad feature map":
        node.attribute[[a.name for a in node.attribute].index("feature_map")].s = b"softmax"
    elif problem == "unknown op":
        node.op_type = "NoSuchAttention"
    before = model.SerializeToString()
    with pytest.raises(UnsupportedError, match=match):
        attach_functions(model)
    assert model.SerializeToString() == before, "a refused model must be left as it was"
