"""LseAttention: the ONNX function (ONNX Runtime without the library, and onnx.reference), the CPU
kernel and the numpy reference (the quadratic definition, signed V) agree; the kernel matches the
paper's own equations (tests/heinsen_oracle.py, positive V); the state carries a sequence across
calls (one call, chunks, token by token give the same outputs); large magnitudes, fully masked rows,
n = 1, grouped KV heads and Sq != Skv are handled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnexport.ops import lse_attention as lse
from attnexport.ops.functions import attach_functions, reference_evaluator
from heinsen_oracle import HeinsenAttention, heinsen_attention
from ortutil import session


@dataclass(frozen=True)
class Node:
    causal: int = 0
    mask: bool = False
    state: bool = False  # passes past_state
    scale: float = float("nan")


def build(nodes: list[Node], opset: int = 18, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(n, elem, ["b", f"h{n}", f"s{n}", f"d{n}"]) for n in "QKV"]
    if any(n.mask for n in nodes):
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
    if any(n.state for n in nodes):
        inputs.append(helper.make_tensor_value_info("P", TensorProto.FLOAT, ["b", "hK", "dQ", "w"]))
    graph_nodes, outputs = [], []
    for i, n in enumerate(nodes):
        names = ["Q", "K", "V", "M" if n.mask else "", "P" if n.state else ""]
        while not names[-1]:
            names.pop()
        graph_nodes.append(helper.make_node("LseAttention", names, [f"Y{i}", f"S{i}"], domain="attnexport",
                                            name=f"node{i}", causal=n.causal, scale=n.scale))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", elem, ["b", "hQ", "sQ", "dV"]))
        outputs.append(helper.make_tensor_value_info(f"S{i}", TensorProto.FLOAT, ["b", "hK", "dQ", "w"]))
    model = helper.make_model(helper.make_graph(graph_nodes, "test", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return attach_functions(model)


def reference(node: Node, feeds: dict[str, np.ndarray]):
    return lse.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"] if node.mask else None,
                         feeds["P"] if node.state else None, scale=None if math.isnan(node.scale) else node.scale,
                         causal=node.causal, return_state=True)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], form: str) -> list[np.ndarray]:
    names = {i.name for i in model.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in names}
    if form == "kernel":
        return session(model, with_library=True).run(None, feeds)
    if form == "function":
        return session(model, with_library=False).run(None, feeds)
    return reference_evaluator(model).run(None, feeds)


def tolerance(feeds: dict[str, np.ndarray], scale: float = float("nan")) -> float:
    """float32 round-off of the outputs: the logits' absolute error grows with |q̃| + |k̃|."""
    dk = feeds["Q"].shape[-1]
    root = math.sqrt(1 / math.sqrt(dk) if math.isnan(scale) else scale)
    size = root * (np.abs(feeds["Q"].astype(np.float64)).max() + np.abs(feeds["K"].astype(np.float64)).max())
    return 4e-6 * (1.0 + size) * max(1.0, float(np.abs(feeds["V"].astype(np.float64)).max()))


def draw(rng, *shape, magnitude: float | None = None, dtype=np.float32) -> np.ndarray:
    if magnitude is None:
        return rng.normal(size=shape).astype(dtype)
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(magnitude, 1.25 * magnitude, size=shape)).astype(dtype)


@dataclass(frozen=True)
class Shape:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 5
    kv_len: int = 5
    head_dim: int = 6
    value_dim: int = 3


def feeds_for(shape: Shape, *, seed: int = 0, magnitude: float | None = None, dtype=np.float32,
              positive_v: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = shape
    v = draw(rng, s.batch, s.kv_heads, s.kv_len, s.value_dim)
    if positive_v:
        v = np.exp(v).astype(np.float32)
    mask = rng.random((s.batch, s.kv_len)) < 0.7
    mask[0, 0] = True
    if s.batch > 1:
        mask[-1, :] = False  # a fully padded batch row
    _, past = lse.reference(draw(rng, s.batch, s.q_heads, 3, s.head_dim, magnitude=magnitude),
                            draw(rng, s.batch, s.kv_heads, 3, s.head_dim, magnitude=magnitude),
                            draw(rng, s.batch, s.kv_heads, 3, s.value_dim), return_state=True)
    return {"Q": draw(rng, s.batch, s.q_heads, s.q_len, s.head_dim, magnitude=magnitude, dtype=dtype),
            "K": draw(rng, s.batch, s.kv_heads, s.kv_len, s.head_dim, magnitude=magnitude, dtype=dtype),
            "V": v.astype(dtype), "M": mask, "P": past.astype(np.float32)}


def assert_close(got, expected, tol, what):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert np.isfinite(got).all(), f"{what}: not finite"
    err = float(np.max(np.abs(got - expected))) if got.size else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def assert_state_close(got, expected, what):
    """States: S and z relative to their size, m exactly up to round-off."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: state shape {got.shape} != {expected.shape}"
    dv = got.shape[-1] - 2
    big = max(1.0, float(np.abs(expected[..., : dv + 1]).max()))
    assert_close(got[..., : dv + 1], expected[..., : dv + 1], 2e-6 * big, f"{what}: S|z")
    assert_close(got[..., dv + 1], expected[..., dv + 1], 1e-6 * max(1.0, float(np.abs(expected[..., dv + 1]).max())),
                 f"{what}: m")


SHAPES = {
    "gqa_sq=skv": Shape(),
    "gqa_sq<skv": Shape(q_len=3, kv_len=7),
    "sq>skv_dk!=dv": Shape(q_heads=2, kv_heads=2, q_len=6, kv_len=4, head_dim=5, value_dim=4),
    "sq1": Shape(q_heads=3, kv_heads=1, q_len=1, kv_len=4),
    "n1": Shape(q_len=1, kv_len=1),
}
NODES = [Node(causal=c, mask=m, state=s) for c in (0, 1) for m in (False, True) for s in (False, True)]


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("form", ["kernel", "function", "reference evaluator"])
def test_three_forms_agree(form, shape_name, op_library):
    feeds = feeds_for(SHAPES[shape_name])
    model = build(NODES)
    outputs = run(model, feeds, form)
    for i, node in enumerate(NODES):
        y, state = reference(node, feeds)
        assert_close(outputs[2 * i], y, tolerance(feeds), f"{form} {node} Y")
        assert_state_close(outputs[2 * i + 1], state, f"{form} {node}")


@pytest.mark.parametrize("opset", (13, 15, 21, 23))
def test_function_at_other_opsets(opset, op_library):
    nodes = [Node(causal=1, mask=True, state=True), Node(causal=0, scale=0.3)]
    feeds = feeds_for(SHAPES["gqa_sq<skv"], seed=1)
    model = build(nodes, opset)
    onnx.checker.check_model(model, full_check=True)
    for form in ("kernel", "function"):
        outputs = run(model, feeds, form)
        for i, node in enumerate(nodes):
            y, state = reference(node, feeds)
            assert_close(outputs[2 * i], y, tolerance(feeds, node.scale), f"opset {opset} {form} {node}")
            assert_state_close(outputs[2 * i + 1], state, f"opset {opset} {form} {node}")


@pytest.mark.parametrize("causal", (0, 1))
@pytest.mark.parametrize("n", (1, 7, 150))
def test_kernel_matches_the_papers_equations(causal, n, op_library):
    """Positive V: the kernel (stabilised matrix products) against Heinsen's log-space equations."""
    shape = Shape(batch=1, q_heads=4, kv_heads=2, q_len=n, kv_len=n, head_dim=16, value_dim=8)
    feeds = feeds_for(shape, seed=n, positive_v=True)
    model = build([Node(causal=causal, scale=0.5)])
    y = run(model, feeds, "kernel")[0]
    expected = heinsen_attention(feeds["Q"].astype(np.float64), feeds["K"].astype(np.float64),
                                 feeds["V"].astype(np.float64), causal=bool(causal), scale=0.5)
    # relative to the values (positive, up to e^4)
    assert_close(y / np.abs(expected).max(), expected / np.abs(expected).max(), 2e-6, "kernel vs paper")


def test_state_is_the_papers_hidden_state(op_library):
    """present_state decodes to the paper's last hidden states: log S = m + log S_ours, log Z = m + log z."""
    shape = Shape(batch=1, q_heads=1, kv_heads=1, q_len=40, kv_len=40, head_dim=8, value_dim=5)
    feeds = feeds_for(shape, seed=3, positive_v=True)
    model = build([Node(causal=1, scale=1.0)])
    _, state = run(model, feeds, "kernel")
    paper = HeinsenAttention(causal=True)
    paper(feeds["Q"][0, 0].astype(np.float64), feeds["K"][0, 0].astype(np.float64),
          np.log(feeds["V"][0, 0].astype(np.float64)))
    s, z, m = lse.reference.__globals__["lse_state_parts"](state[0, 0], 5)
    np.testing.assert_allclose(np.log(s) + m[:, None], paper.state[0], atol=1e-5)
    np.testing.assert_allclose(np.log(z) + m, paper.state[1], atol=1e-5)


@pytest.mark.parametrize("causal", (0, 1))
def test_signed_values_long_sequence(causal, op_library):
    """Signed V over several chunks, GQA and padding: the kernel is the quadratic definition."""
    shape = Shape(batch=2, q_heads=6, kv_heads=2, q_len=300, kv_len=333, head_dim=32, value_dim=24)
    feeds = feeds_for(shape, seed=5)
    node = Node(causal=causal, mask=True, state=True)
    y, state = run(build([node]), feeds, "kernel")
    y_ref, state_ref = reference(node, feeds)
    assert_close(y, y_ref, tolerance(feeds), "kernel")
    assert_state_close(state, state_ref, "kernel")


def growing_keys(n: int, dk: int, *, low: float, high: float, seed: int) -> np.ndarray:
    """Keys whose every dimension climbs from `low` to `high` along the sequence (with noise): the
    running maxima grow at nearly every chunk, so the carried state is rescaled again and again."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(low, high, n)[:, None]
    return (ramp + rng.normal(scale=2.0, size=(n, dk))).astype(np.float32)


@pytest.mark.parametrize("dtype", (np.float32, np.float16))
@pytest.mark.parametrize("causal", (0, 1))
def test_rescaling_is_exact_for_growing_maxima(causal, dtype, op_library):
    """Keys climbing from -120 to +120 (chunks rescale the state ~100 times by up to e^-5 each, and a
    naive exp overflows): the kernel equals the direct log-space evaluation in float64."""
    n, dk, dv = 257, 8, 4
    rng = np.random.default_rng(7)
    k = growing_keys(n, dk, low=-120, high=120, seed=8)[None, None].astype(dtype)
    q = (rng.normal(size=(1, 2, n, dk)) * 30).astype(dtype)
    v = rng.normal(size=(1, 1, n, dv)).astype(dtype)
    feeds = {"Q": q, "K": k, "V": v}
    node = Node(causal=causal, scale=1.0)
    y, state = run(build([node], dtype=dtype), feeds, "kernel")
    y_ref, state_ref = reference(node, feeds)
    assert_close(y, y_ref, tolerance(feeds, 1.0) if dtype == np.float32 else 2e-3, f"{dtype.__name__} Y")
    assert_state_close(state, state_ref, f"{dtype.__name__} state")


def test_keys_jumping_within_a_chunk(op_library):
    """Within one chunk the keys jump by ~400 (so the chunk's maxima come from keys that early
    queries do not see yet): the early rows must still be their own exact mixtures, not 0 or NaN."""
    n, dk, dv = 64, 4, 3
    k = np.full((1, 1, n, dk), -200.0, np.float32)
    k[0, 0, n // 2:] = 200.0
    k += np.random.default_rng(1).normal(size=k.shape).astype(np.float32)
    q = np.random.default_rng(2).normal(size=(1, 1, n, dk)).astype(np.float32) * 50
    v = np.random.default_rng(3).normal(size=(1, 1, n, dv)).astype(np.float32)
    feeds = {"Q": q, "K": k, "V": v}
    node = Node(causal=1, scale=1.0)
    y, _ = run(build([node]), feeds, "kernel")
    y_ref, _ = reference(node, feeds)
    assert_close(y, y_ref, tolerance(feeds, 1.0), "kernel")
    assert np.abs(y[0, 0, 0] - v[0, 0, 0]).max() < 1e-5  # row 0 sees only key 0


@pytest.mark.parametrize("dtype", (np.float32, np.float16))
@pytest.mark.parametrize("magnitude", (80.0, 300.0))
def test_large_magnitudes_are_finite_and_exact(magnitude, dtype, op_library):
    """Inputs of magnitude 80+ (a naive exp overflows float32 at 88.7): finite, no NaN, and equal to
    the float64 definition up to the round-off such logits carry; every form."""
    shape = Shape(q_len=9, kv_len=11, head_dim=8, value_dim=4)
    feeds = feeds_for(shape, seed=11, magnitude=magnitude, dtype=dtype)
    nodes = [Node(causal=1, mask=True, state=True, scale=1.0), Node(causal=0, scale=1.0)]
    model = build(nodes, dtype=dtype)
    for form in ("kernel", "function"):
        outputs = run(model, feeds, form)
        for i, node in enumerate(nodes):
            y, state = reference(node, feeds)
            tol = tolerance(feeds, 1.0) if dtype == np.float32 else 2e-3 * max(1.0, np.abs(y).max())
            assert_close(outputs[2 * i], y, tol, f"{form} {dtype.__name__} {node}")
            assert np.isfinite(outputs[2 * i + 1]).all()


def test_fully_masked_rows_are_zero(op_library):
    """No visible key (all padded, or causal with Sq > Skv, and no past): zeros, never NaN; the
    present state of a fully padded call is the empty state (zeros)."""
    shape = Shape(batch=2, q_len=6, kv_len=3)
    feeds = feeds_for(shape, seed=2)
    feeds["M"][:] = False
    model = build([Node(causal=0, mask=True), Node(causal=1)])
    for form in ("kernel", "function", "reference evaluator"):
        y0, s0, y1, _ = run(model, feeds, form)
        assert np.array_equal(y0, np.zeros_like(y0)), form
        assert np.array_equal(s0, np.zeros_like(s0)), form
        assert np.array_equal(y1[:, :, :3], np.zeros_like(y1[:, :, :3])), form  # rows before the first key
        assert np.isfinite(y1).all()


def test_mixed_nodes_share_one_function(op_library):
    """A node without past_state beside one with it: attach_functions gives it a [1, 1] zero
    placeholder, which every form reads as the empty state."""
    nodes = [Node(causal=1, state=True), Node(causal=1, state=False), Node(causal=0, mask=True)]
    feeds = feeds_for(SHAPES["gqa_sq=skv"], seed=4)
    model = build(nodes)
    for form in ("kernel", "function", "reference evaluator"):
        outputs = run(model, feeds, form)
        y0, s0 = reference(nodes[0], feeds)
        y1, _ = reference(nodes[1], feeds)
        y2, _ = reference(nodes[2], feeds)
        tol = tolerance(feeds)
        assert_close(outputs[0], y0, tol, form)
        assert_state_close(outputs[1], s0, form)
        assert_close(outputs[2], y1, tol, form)
        assert_close(outputs[4], y2, tol, form)


# -- one call, chunks, token by token ------------------------------------------------------------


def run_in_chunks(sizes: list[int], feeds: dict[str, np.ndarray], form: str, causal: int = 1):
    """Runs the sequence in consecutive chunks of `sizes`, each call's present_state fed to the next."""
    first = build([Node(causal=causal, mask=True)])
    rest = build([Node(causal=causal, mask=True, state=True)])
    sessions = {}
    outputs, state, start = [], None, 0
    for size in sizes:
        part = {"Q": feeds["Q"][:, :, start:start + size], "K": feeds["K"][:, :, start:start + size],
                "V": feeds["V"][:, :, start:start + size], "M": feeds["M"][:, start:start + size]}
        if form == "numpy":
            y, state = lse.reference(part["Q"], part["K"], part["V"], part["M"], state, causal=causal, return_state=True)
        else:
            model = first if state is None else rest
            if state is not None:
                part["P"] = state
            if form == "reference evaluator":
                y, state = run(model, part, form)
            else:
                key = id(model)
                if key not in sessions:
                    sessions[key] = session(model, with_library=form == "kernel")
                y, state = sessions[key].run(None, part)
        outputs.append(y)
        start += size
    return np.concatenate(outputs, axis=2), state


@pytest.mark.parametrize("form", ["kernel", "function", "numpy", "reference evaluator"])
def test_one_call_chunks_and_token_by_token_agree(form, op_library):
    n = 24 if form == "reference evaluator" else 150
    shape = Shape(batch=2, q_heads=4, kv_heads=2, q_len=n, kv_len=n, head_dim=8, value_dim=5)
    feeds = feeds_for(shape, seed=9)
    feeds["M"][:] = True
    feeds["M"][1, : n // 3] = False  # left padding in batch 1
    expected = lse.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"], causal=1)
    _, final = lse.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"], causal=1, return_state=True)
    tol = tolerance(feeds)
    chunkings = {"one call": [n], "chunks": [5, 64, 1, n - 70], "token by token": [1] * n}
    if form == "reference evaluator":
        chunkings = {"one call": [n], "chunks": [5, 1, n - 6], "token by token": [1] * 6 + [n - 6]}
    for name, sizes in chunkings.items():
        y, state = run_in_chunks(sizes, feeds, form)
        assert_close(y, expected, tol, f"{form}, {name}")
        assert_state_close(state, final, f"{form}, {name}")


def test_non_causal_chunks_carry_the_state(op_library):
    """Non-causal calls with a state: each chunk's queries see every earlier chunk and all of their own."""
    shape = Shape(batch=1, q_heads=2, kv_heads=1, q_len=40, kv_len=40, head_dim=8, value_dim=4)
    feeds = feeds_for(shape, seed=12)
    feeds["M"][:] = True
    y, state = run_in_chunks([10, 30], feeds, "kernel", causal=0)
    _, final = lse.reference(feeds["Q"], feeds["K"], feeds["V"], causal=0, return_state=True)
    assert_state_close(state, final, "kernel")
    part = lse.reference(feeds["Q"][:, :, 10:], feeds["K"], feeds["V"], causal=0)  # chunk 2 sees all 40 keys
    assert_close(y[:, :, 10:], part, tolerance(feeds), "kernel, second chunk")


def test_bad_past_state_is_one_error(op_library):
    import onnxruntime as ort

    model = build([Node(causal=1, state=True)])
    feeds = feeds_for(SHAPES["gqa_sq=skv"])
    feeds["P"] = np.zeros((2, 2, 6, 4), np.float32)  # Dv + 1 columns
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="past_state"):
        run(model, feeds, "kernel")
