"""NystromAttention: the ONNX function (ONNX Runtime without the library, and onnx.reference), the
CPU kernel and the numpy reference agree on random shapes (GQA, padding masks with fully masked rows,
Sq = 1, more landmarks than keys or queries, float16, huge logits), for both landmark choices and
every solver; with a landmark per key it is softmax attention to float32 round-off; bad attributes
and causal=1 give one-line errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import nystrom_attention as nys
from attnexport.ops.functions import attach_functions, reference_evaluator
from attnexport.ops.reference import softmax_attention
from ortutil import session


@dataclass(frozen=True)
class Node:
    mask: bool = False
    scale: float = float("nan")
    num_landmarks: int = 4
    landmarks: str = "segment_means"
    iterations: int = 3
    solver: str = "sketch"
    newton_iterations: int = 6
    ridge: float = 1e-2

    def attributes(self) -> dict:
        return {"scale": self.scale, "num_landmarks": self.num_landmarks, "landmarks": self.landmarks,
                "iterations": self.iterations, "solver": self.solver, "newton_iterations": self.newton_iterations,
                "ridge": self.ridge}


def build(nodes: list[Node], opset: int = 18, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(n, elem, ["b", f"h{n}", f"s{n}", f"d{n}"]) for n in "QKV"]
    if any(n.mask for n in nodes):
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
    graph_nodes, outputs = [], []
    for i, n in enumerate(nodes):
        names = ["Q", "K", "V"] + (["M"] if n.mask else [])
        graph_nodes.append(helper.make_node("NystromAttention", names, [f"Y{i}"], domain="attnexport",
                                            name=f"node{i}", **n.attributes()))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", elem, ["b", "hQ", "sQ", "dV"]))
    model = helper.make_model(helper.make_graph(graph_nodes, "test", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return attach_functions(model)


def reference(node: Node, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return nys.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"] if node.mask else None,
                         scale=None if math.isnan(node.scale) else node.scale, num_landmarks=node.num_landmarks,
                         landmarks_method=node.landmarks, iterations=node.iterations, solver=node.solver,
                         newton_iterations=node.newton_iterations, ridge=node.ridge)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], form: str) -> list[np.ndarray]:
    names = {i.name for i in model.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in names}
    if form == "kernel":  # without the functions: only the kernel can run the node
        bare = onnx.ModelProto()
        bare.CopyFrom(model)
        del bare.functions[:]
        return session(bare, with_library=True).run(None, feeds)
    if form == "function":
        return session(model, with_library=False).run(None, feeds)
    return reference_evaluator(model).run(None, feeds)


@dataclass(frozen=True)
class Shape:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 9
    kv_len: int = 11
    head_dim: int = 6
    value_dim: int = 3


def feeds_for(shape: Shape, *, seed: int = 0, magnitude: float = 1.0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = shape
    mask = rng.random((s.batch, s.kv_len)) < 0.7
    mask[0, 0] = True
    if s.batch > 1:
        mask[-1, :] = False  # a fully padded batch row
    return {"Q": (magnitude * rng.normal(size=(s.batch, s.q_heads, s.q_len, s.head_dim))).astype(dtype),
            "K": (magnitude * rng.normal(size=(s.batch, s.kv_heads, s.kv_len, s.head_dim))).astype(dtype),
            "V": rng.normal(size=(s.batch, s.kv_heads, s.kv_len, s.value_dim)).astype(dtype), "M": mask}


def tolerance(node: Node, feeds) -> float:
    """float32 round-off of the landmarks and factors, amplified by the landmark system's conditioning
    (|M⁻¹| <= 1/ridge with the ridge; Newton–Schulz's iterate is bounded likewise)."""
    conditioning = 1.0 if node.solver == "newton_schulz" else min(1.0 / node.ridge, 1e4) ** 0.5
    size = float(np.abs(feeds["Q"].astype(np.float64)).max() * np.abs(feeds["K"].astype(np.float64)).max())
    return 2e-5 * (1.0 + size) * conditioning * max(1.0, float(np.abs(feeds["V"].astype(np.float64)).max()))


def assert_close(got, expected, tol, what):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert np.isfinite(got).all(), f"{what}: not finite"
    err = float(np.max(np.abs(got - expected))) if got.size else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


FORMS = ["function", "evaluator", "kernel"]

CASES = [
    (Node(), Shape()),
    (Node(mask=True), Shape()),
    (Node(mask=True, landmarks="kmeans"), Shape()),
    (Node(mask=True, solver="newton_schulz"), Shape()),
    (Node(mask=True, solver="direct"), Shape()),
    (Node(mask=True, landmarks="kmeans", solver="newton_schulz", iterations=0), Shape(q_len=13, kv_len=7)),
    (Node(num_landmarks=3, scale=0.3), Shape(q_len=1, kv_len=8)),  # Sq = 1
    (Node(mask=True, num_landmarks=40), Shape(q_len=6, kv_len=10)),  # m > n
    (Node(mask=True, num_landmarks=5, landmarks="kmeans", iterations=4), Shape(batch=3, q_heads=3, kv_heads=1,
                                                                                 q_len=17, kv_len=23, head_dim=8)),
    (Node(num_landmarks=1), Shape(kv_len=1, q_len=3)),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forms_agree_with_reference(case, form):
    node, shape = CASES[case]
    feeds = feeds_for(shape, seed=case)
    (got,) = run(build([node]), feeds, form)
    assert_close(got, reference(node, feeds), tolerance(node, feeds), f"{form} case {case}")


@pytest.mark.parametrize("form", FORMS)
def test_one_function_serves_nodes_of_every_kind(form):
    nodes = [Node(), Node(mask=True, landmarks="kmeans", solver="direct"), Node(solver="newton_schulz", num_landmarks=2)]
    feeds = feeds_for(Shape(), seed=11)
    outs = run(build(nodes), feeds, form)
    for node, got in zip(nodes, outs):
        assert_close(got, reference(node, feeds), tolerance(node, feeds), f"{form} {node}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("solver", ["sketch", "direct"])
def test_a_landmark_per_key_is_softmax_attention(form, solver):
    node = Node(mask=True, num_landmarks=64, solver=solver, ridge=1e-12)
    feeds = feeds_for(Shape(q_len=12, kv_len=12), seed=5)
    (got,) = run(build([node]), feeds, form)
    exact = softmax_attention(feeds["Q"], feeds["K"], feeds["V"], feeds["M"])
    assert_close(got, exact, 2e-5, f"{form} m = n")


@pytest.mark.parametrize("form", FORMS)
def test_float16(form):
    node = Node(mask=True)
    feeds = feeds_for(Shape(), seed=3, dtype=np.float16)
    (got,) = run(build([node], dtype=np.float16), feeds, form)
    assert got.dtype == np.float16
    assert_close(got, reference(node, feeds), 2e-2, f"{form} float16")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("solver", ["sketch", "newton_schulz"])
def test_huge_logits_stay_finite(form, solver):
    node = Node(mask=True, solver=solver, ridge=1e-2)
    feeds = feeds_for(Shape(), seed=4, magnitude=30.0)
    (got,) = run(build([node]), feeds, form)
    expected = reference(node, feeds)
    assert np.isfinite(got).all()
    assert_close(got, expected, 1e-2 * max(1.0, float(np.abs(expected).max())), f"{form} huge logits")


def test_fully_masked_rows_give_zeros():
    feeds = feeds_for(Shape(), seed=6)
    (got,) = run(build([Node(mask=True)]), feeds, "function")
    assert not feeds["M"][-1].any() and np.all(got[-1] == 0)


@pytest.mark.parametrize(
    "node, message",
    [
        (Node(num_landmarks=0), "num_landmarks=0: must be >= 1"),
        (Node(ridge=0.0), "needs ridge > 0"),
        (Node(iterations=-1), "iterations=-1: must be >= 0"),
        (Node(solver="cholesky"), "solver='cholesky' is not one of"),
    ],
)
def test_bad_attributes_are_refused_in_one_line(node, message):
    with pytest.raises((UnsupportedError, ValueError), match=message) as info:
        build([node])
    assert "\n" not in str(info.value)


def test_causal_is_refused_with_the_reason():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("NystromAttention", ["Q", "K", "V"], ["Y"], domain="attnexport", causal=1)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in "QKV"],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1, 4, 4])]),
        opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedError, match="landmark averages future tokens"):
        attach_functions(model)
    with pytest.raises(ValueError, match="non-causal only"):
        nys.reference(*(np.zeros((1, 1, 4, 4)),) * 3, causal=1)
