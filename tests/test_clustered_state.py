"""ClusteredAttention's state mode (past_state / present_state): a bounded KV cache (the globals and the last
W + 1 keys and values) plus per-cluster sums of the older values. Whatever the split of a sequence into
calls, the calls' outputs are the full causal op's on the whole sequence (numpy reference, ONNX function
and kernel), and the last state is the one-call state."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from attnexport.ops.functions import attach_functions
from attnexport.ops.clustered_reference import clustered_attention, clustered_attention_step, clustered_state_shape
from ortutil import session

# (batch, q heads, kv heads, Dk, Dv, global, window, clusters, length)
CASES = [
    (1, 2, 2, 4, 3, 0, 0, 2, 9),
    (2, 4, 2, 5, 3, 1, 3, 3, 17),
    (2, 3, 1, 4, 6, 2, 1, 4, 12),
    (1, 2, 1, 3, 2, 0, 7, 5, 23),
    (2, 2, 2, 4, 4, 2, 3, 6, 4),  # clusters > tokens, sequence shorter than the window
]


def _inputs(rng, batch, q_heads, kv_heads, dk, dv, length, clusters, padding: str):
    q = rng.normal(size=(batch, q_heads, length, dk)).astype(np.float32)
    k = rng.normal(size=(batch, kv_heads, length, dk)).astype(np.float32)
    v = rng.normal(size=(batch, kv_heads, length, dv)).astype(np.float32)
    mask = np.ones((batch, length), bool)
    if padding == "left":
        mask[-1, : length // 3] = False
    elif padding == "random":
        mask &= rng.random((batch, length)) > 0.3
    centroids = rng.normal(size=(kv_heads, clusters, dk)).astype(np.float32)
    return q, k, v, mask, centroids


def _splits(rng, length: int) -> list[list[int]]:
    chunks = []
    left = length
    while left:
        size = int(rng.integers(1, min(left, 6) + 1))
        chunks.append(size)
        left -= size
    return [[length], [1] * length, chunks, [length - 1, 1] if length > 1 else [1]]


def run_in_calls(step, q, k, v, mask, centroids, sizes, attrs, shape):
    """Feeds the sequence in calls of `sizes`, carrying the state; returns (Y of all calls, last state)."""
    state, outputs, start = np.zeros(shape, np.float32), [], 0
    for size in sizes:
        part = slice(start, start + size)
        y, state = step(q[:, :, part], k[:, :, part], v[:, :, part], mask[:, part], centroids, state, **attrs)
        outputs.append(y)
        start += size
    return np.concatenate(outputs, axis=2), state


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padding", ["none", "left", "random"])
def test_reference_calls_match_the_full_causal_op(case, padding):
    batch, q_heads, kv_heads, dk, dv, num_global, window, clusters, length = case
    rng = np.random.default_rng(hash((case, padding)) % 2**32)
    q, k, v, mask, centroids = _inputs(rng, batch, q_heads, kv_heads, dk, dv, length, clusters, padding)
    attrs = dict(causal=1, window_left=window, num_global=num_global, num_clusters=clusters)
    expected = clustered_attention(q, k, v, mask, centroids, **attrs)
    shape = clustered_state_shape(batch, kv_heads, dk, dv, window_left=window, num_global=num_global,
                                  num_clusters=clusters)
    whole_state = None
    for sizes in _splits(rng, length):
        got, state = run_in_calls(clustered_attention_step, q, k, v, mask, centroids, sizes, attrs, shape)
        # (the state is float32: its sums round)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=str(sizes))
        if whole_state is None:
            whole_state = state
        np.testing.assert_allclose(state, whole_state, rtol=1e-6, atol=1e-6, err_msg=str(sizes))
    # What the state holds: the counter, every kept key older than the window in exactly one cluster.
    assert np.all(whole_state[:, :, -1, 0] == length)
    cluster_rows = slice(num_global + window + 1, num_global + window + 1 + clusters)
    older = mask[:, num_global:max(num_global, length - window - 1)].sum(axis=1)
    np.testing.assert_array_equal(whole_state[:, :, cluster_rows, -1].sum(axis=2), older[:, None].repeat(kv_heads, 1))


def test_reference_state_rows():
    """The layout itself: global rows, window rows oldest first (zeros before the first token), counter."""
    rng = np.random.default_rng(7)
    q, k, v, mask, centroids = _inputs(rng, 1, 1, 1, 2, 2, 3, 2, "none")
    _, state = clustered_attention_step(q, k, v, mask, centroids, None, window_left=2, num_global=1, num_clusters=2)
    assert state.shape == (1, 1, 1 + 3 + 2 + 1, 5)
    np.testing.assert_allclose(state[0, 0, 0], np.r_[k[0, 0, 0], v[0, 0, 0], 1])  # global row: position 0
    np.testing.assert_array_equal(state[0, 0, 1], 0)  # window row of position 0 (< G): zeros
    np.testing.assert_allclose(state[0, 0, 2], np.r_[k[0, 0, 1], v[0, 0, 1], 1])
    np.testing.assert_allclose(state[0, 0, 3], np.r_[k[0, 0, 2], v[0, 0, 2], 1])
    np.testing.assert_array_equal(state[0, 0, 4:6], 0)  # nothing has left the window
    np.testing.assert_array_equal(state[0, 0, 6], [3, 0, 0, 0, 0])


@pytest.mark.parametrize("attrs, message", [
    (dict(causal=0, window_left=2), "causal=1"),
    (dict(causal=1, window_left=-1), "finite window_left"),
    (dict(causal=1, window_left=4, dilation=2), "dilation=1"),
])
def test_reference_refuses_what_has_no_state(attrs, message):
    rng = np.random.default_rng(0)
    q, k, v, mask, centroids = _inputs(rng, 1, 1, 1, 2, 2, 3, 2, "none")
    with pytest.raises(ValueError, match=message):
        clustered_attention_step(q, k, v, mask, centroids, None, num_clusters=2, **attrs)
    with pytest.raises(ValueError, match="centroids"):
        clustered_attention_step(q, k, v, mask, None, None, causal=1, window_left=2, num_clusters=2)
    with pytest.raises(ValueError, match="Sq=2, Skv=3"):
        clustered_attention_step(q[:, :, :2], k, v, mask, centroids, None, causal=1, window_left=2, num_clusters=2)


# -- the ONNX function and the kernel ------------------------------------------------------------


def state_model(dtype=TensorProto.FLOAT, *, mask: bool = True, past: bool = True, opset: int = 18, **attrs):
    """One ClusteredAttention node in state mode: Q, K, V, [M], C, [S] -> Y, present_state."""
    inputs = [helper.make_tensor_value_info(n, dtype, ["b", f"h{n}", "s", f"d{n}"]) for n in "QKV"]
    names = ["Q", "K", "V", "M" if mask else "", "C", "S" if past else ""]
    if mask:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "s"]))
    inputs.append(helper.make_tensor_value_info("C", dtype, ["hK", "m", "dQ"]))
    if past:
        inputs.append(helper.make_tensor_value_info("S", TensorProto.FLOAT, ["b", "hK", "r", "c"]))
    while not names[-1]:
        names.pop()
    node = helper.make_node("ClusteredAttention", names, ["Y", "P"], domain="attnexport", name="clustered_state",
                            causal=1, **attrs)
    graph = helper.make_graph([node], "clustered_state", inputs,
                              [helper.make_tensor_value_info("Y", dtype, ["b", "hQ", "s", "dV"]),
                               helper.make_tensor_value_info("P", TensorProto.FLOAT, ["b", "hK", "r", "c"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("attnexport", 1)],
                              ir_version=8)
    return attach_functions(model)


def ort_step(with_library: bool, dtype=np.float32, **attrs):
    """A step function like clustered_attention_step, run by ONNX Runtime (kernel or function)."""
    model = state_model(TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT, **attrs)
    sess = session(model, with_library=with_library)

    def step(q, k, v, mask, centroids, state, **_):
        feeds = {"Q": q.astype(dtype), "K": k.astype(dtype), "V": v.astype(dtype), "M": mask,
                 "C": centroids.astype(dtype), "S": state}
        y, present = sess.run(None, feeds)
        return y.astype(np.float64), present

    return step


@pytest.mark.parametrize("with_library", [False, True], ids=["function", "kernel"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padding", ["none", "left", "random"])
def test_function_and_kernel_match_the_reference(with_library, case, padding):
    batch, q_heads, kv_heads, dk, dv, num_global, window, clusters, length = case
    rng = np.random.default_rng(hash((case, padding, 1)) % 2**32)
    q, k, v, mask, centroids = _inputs(rng, batch, q_heads, kv_heads, dk, dv, length, clusters, padding)
    attrs = dict(window_left=window, num_global=num_global, num_clusters=clusters)
    shape = clustered_state_shape(batch, kv_heads, dk, dv, window_left=window, num_global=num_global,
                                  num_clusters=clusters)
    step = ort_step(with_library, **attrs)
    for sizes in _splits(rng, length)[:3]:
        want_y, want_state = run_in_calls(clustered_attention_step, q, k, v, mask, centroids, sizes,
                                          dict(causal=1, **attrs), shape)
        got_y, got_state = run_in_calls(step, q, k, v, mask, centroids, sizes, attrs, shape)
        np.testing.assert_allclose(got_y, want_y, rtol=2e-5, atol=2e-5, err_msg=str(sizes))
        np.testing.assert_allclose(got_state, want_state, rtol=2e-5, atol=2e-5, err_msg=str(sizes))


@pytest.mark.parametrize("with_library", [False, True], ids=["function", "kernel"])
def test_float16_huge_logits_and_empty_rows(with_library):
    """float16 inputs (the state stays float32), logits in the hundreds (max-stabilised), and a batch row
    whose tokens are all padded (its outputs are zeros, its state only counts positions)."""
    rng = np.random.default_rng(11)
    batch, q_heads, kv_heads, dk, dv, length, clusters = 2, 2, 1, 8, 4, 11, 3
    q, k, v, mask, centroids = _inputs(rng, batch, q_heads, kv_heads, dk, dv, length, clusters, "none")
    q, k, centroids = q * 6, k * 6, centroids * 6
    mask[0] = False
    attrs = dict(window_left=2, num_global=1, num_clusters=clusters)
    shape = clustered_state_shape(batch, kv_heads, dk, dv, window_left=2, num_global=1, num_clusters=clusters)
    as16 = [x.astype(np.float16) for x in (q, k, v, centroids)]
    want_y, want_state = run_in_calls(clustered_attention_step, as16[0], as16[1], as16[2], mask, as16[3],
                                      [4, 1, 6], dict(causal=1, **attrs), shape)
    got_y, got_state = run_in_calls(ort_step(with_library, np.float16, **attrs), *as16[:3], mask, as16[3],
                                    [4, 1, 6], attrs, shape)
    assert np.isfinite(got_y).all()
    np.testing.assert_array_equal(got_y[0], 0)
    np.testing.assert_allclose(got_y, want_y, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-3, atol=1e-3)
    assert np.all(got_state[0, :, :-1] == 0) and np.all(got_state[:, :, -1, 0] == length)
