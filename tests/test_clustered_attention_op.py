"""ClusteredAttention's three forms agree: the CPU kernel (ONNX Runtime with the op library), the ONNX
function (ONNX Runtime without it, and onnx.reference) and the numpy reference, on random shapes and
on the edge cases: GQA, padding masks (a fully padded row), ragged lengths, fewer keys than clusters,
Sq = 1, huge logits, float16, causal with given centroids, both exact limits, the query mode and its
exact limit, and clear errors for invalid nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import clustered_reference as cref
from attnexport.ops import reference as ref
from attnexport.ops.functions import attach_functions, reference_evaluator
from ortutil import session


def test_kmeans_follows_the_documented_rules():
    # 1-D points, 2 clusters, visible rows only, position order: starts at rows 0 and floor(1 * 5 / 2) = 2.
    x = np.array([[0.0], [9.0], [1.0], [10.0], [100.0], [11.0]])
    visible = np.array([True, True, True, True, False, True])
    centres, assign = cref.kmeans(x, visible, 2, 0)
    assert centres[:, 0].tolist() == [0.0, 1.0]  # visible rows 0 and 2 (x = 0 and 1)
    assert assign.tolist() == [0, 1, 1, 1, -1, 1]
    centres, assign = cref.kmeans(x, visible, 2, 3)
    assert centres[:, 0].tolist() == [0.5, 10.0]
    assert assign.tolist() == [0, 1, 0, 1, -1, 1]
    # Ties go to the lowest index; more clusters than points: repeated centres, the duplicates stay empty.
    centres, assign = cref.kmeans(np.array([[1.0], [3.0]]), None, 5, 2)
    assert centres[:, 0].tolist() == [1.0, 1.0, 1.0, 3.0, 3.0]
    assert assign.tolist() == [0, 3]
    assert cref.nearest(np.array([[2.0]]), np.array([[1.0], [3.0]])).tolist() == [0]


def test_reference_formula_by_hand():
    # One query, keys 0..3, near = key 3 (window 0 at i' = 3), far = keys 0..2 in clusters given by centroids.
    q = np.array([[[[1.0, 0.0]]]])
    k = np.array([[[[0.0, 0.0], [0.2, 0.0], [5.0, 1.0], [1.0, 1.0]]]])
    v = np.array([[[[1.0], [2.0], [3.0], [4.0]]]])
    centroids = np.array([[[0.0, 0.0], [5.0, 0.0]]])
    y = cref.clustered_attention(q, k, v, None, centroids, scale=1.0, causal=1, window_left=0, num_clusters=2)
    # far: keys 0, 1 -> centre 0 (logit 0), key 2 -> centre 1 (logit 5); near: key 3 (logit 1)
    num = np.exp(1.0) * 4 + np.exp(0.0) * (1 + 2) + np.exp(5.0) * 3
    den = np.exp(1.0) + 2 * np.exp(0.0) + np.exp(5.0)
    assert np.isclose(y[0, 0, 0, 0], num / den)


def _qkv(batch=2, q_heads=4, kv_heads=2, q_len=9, kv_len=11, head_dim=8, value_dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, q_heads, q_len, head_dim)), rng.normal(size=(batch, kv_heads, kv_len, head_dim)),
            rng.normal(size=(batch, kv_heads, kv_len, value_dim)))


def test_reference_exact_limits():
    q, k, v = _qkv()
    exact = ref.softmax_attention(q, k, v)
    assert np.abs(cref.clustered_attention(q, k, v, window_left=11, num_clusters=3) - exact).max() < 1e-12
    assert np.abs(cref.clustered_attention(q, k, v, window_left=2, window_right=1, num_clusters=11, iterations=0)
                  - exact).max() < 1e-12
    assert np.abs(cref.clustered_attention(q, k, v, cluster="queries", num_clusters=9, iterations=0) - exact).max() < 1e-12
    # An approximation otherwise (this is not softmax attention).
    assert np.abs(cref.clustered_attention(q, k, v, window_left=1, window_right=1, num_clusters=2) - exact).max() > 1e-2


@pytest.mark.parametrize("bad, match", [
    (dict(causal=1), "needs the centroids input"),
    (dict(num_clusters=0), "num_clusters=0"),
    (dict(iterations=-1), "iterations=-1"),
    (dict(cluster="values"), "cluster='values'"),
    (dict(cluster="queries", window_left=3), "cluster='queries' is non-causal"),
    (dict(dilation=0), "dilation=0"),
])
def test_reference_refuses_invalid_attributes(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        cref.clustered_attention(q, k, v, **bad)


def test_reference_refuses_wrong_centroid_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"centroids have shape \[2, 3, 8\], expected \[Hkv, num_clusters, Dk\] = \[2, 4, 8\]"):
        cref.clustered_attention(q, k, v, None, np.zeros((2, 3, 8)), causal=1, num_clusters=4)


# -- the three forms ----------------------------------------------------------------------------

ATTRIBUTES = ("scale", "causal", "window_left", "window_right", "dilation", "num_global", "num_clusters", "iterations",
              "cluster")


@dataclass
class Case:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 9
    kv_len: int = 9
    head_dim: int = 8
    value_dim: int = 8
    attrs: dict = field(default_factory=dict)
    mask: bool = False
    pad_all: bool = False  # batch row 0 fully padded
    centroids: bool = False  # pass centroids [Hkv, num_clusters, Dk]
    magnitude: float = 1.0  # scale of the inputs (80: huge logits)

    def feeds(self, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        m = self.magnitude
        out = {
            "Q": (m * rng.normal(size=(self.batch, self.q_heads, self.q_len, self.head_dim))).astype(dtype),
            "K": (m * rng.normal(size=(self.batch, self.kv_heads, self.kv_len, self.head_dim))).astype(dtype),
            "V": rng.normal(size=(self.batch, self.kv_heads, self.kv_len, self.value_dim)).astype(dtype),
        }
        if self.mask:
            keep = rng.random((self.batch, self.kv_len)) < 0.75
            if self.pad_all:
                keep[0] = False
            out["M"] = keep
        if self.centroids:
            clusters = self.attrs.get("num_clusters", 32)
            out["C"] = (m * rng.normal(size=(self.kv_heads, clusters, self.head_dim))).astype(dtype)
        return out

    def reference(self, feeds) -> np.ndarray:
        as64 = {n: x.astype(np.float64) if x.dtype != bool else x for n, x in feeds.items()}
        return cref.clustered_attention(as64["Q"], as64["K"], as64["V"], as64.get("M"), as64.get("C"), **self.attrs)


def build(case: Case, opset: int = 18, dtype=TensorProto.FLOAT, complete: bool = True) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, dtype, ["b", f"h{n}", f"s{n}", f"d{n}"]) for n in "QKV"]
    names = ["Q", "K", "V", "", ""]
    if case.mask:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
        names[3] = "M"
    if case.centroids:
        inputs.append(helper.make_tensor_value_info("C", dtype, ["hK", "m", "dQ"]))
        names[4] = "C"
    while not names[-1]:
        names.pop()
    node = helper.make_node("ClusteredAttention", names, ["Y"], domain="attnexport", name="clustered", **case.attrs)
    graph = helper.make_graph([node], "clustered", inputs,
                              [helper.make_tensor_value_info("Y", dtype, ["b", "hQ", "sQ", "dV"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("attnexport", 1)],
                              ir_version=8)
    return attach_functions(model) if complete else model


def attrs(**values) -> dict:
    out = {"scale": float("nan"), "num_clusters": 4, "iterations": 3}
    out.update(values)
    return out


EDGE_CASES = {
    "window_and_globals": Case(q_len=20, kv_len=20, attrs=attrs(window_left=3, window_right=2, num_global=1)),
    "gqa4_dilated": Case(q_heads=8, kv_heads=2, q_len=30, kv_len=30, attrs=attrs(window_left=6, window_right=6,
                                                                               dilation=2, num_clusters=5)),
    "mqa_sq_lt_skv": Case(q_heads=4, kv_heads=1, q_len=5, kv_len=23, attrs=attrs(window_left=2, window_right=2)),
    "sq_gt_skv": Case(q_len=17, kv_len=6, attrs=attrs(window_left=1, window_right=1, num_clusters=2)),
    "padded_rows": Case(mask=True, pad_all=True, q_len=13, kv_len=13, attrs=attrs(window_left=2, window_right=2,
                                                                                  num_global=1)),
    "n_lt_clusters": Case(q_len=5, kv_len=5, mask=True, attrs=attrs(window_left=0, window_right=0, num_clusters=7)),
    "clusters_gt_keys_iterated": Case(q_len=6, kv_len=6, attrs=attrs(window_left=1, window_right=0, num_clusters=9,
                                                                     iterations=5)),
    "sq_1": Case(q_len=1, kv_len=19, attrs=attrs(window_left=3, window_right=0)),
    "sq_1_skv_1": Case(q_len=1, kv_len=1, attrs=attrs(window_left=0, window_right=0)),
    "zero_iterations": Case(q_len=11, kv_len=15, attrs=attrs(window_left=2, window_right=2, iterations=0)),
    "one_cluster": Case(q_len=12, kv_len=12, mask=True, attrs=attrs(window_left=1, window_right=1, num_clusters=1)),
    "huge_logits": Case(q_len=24, kv_len=24, magnitude=80.0, mask=True, attrs=attrs(window_left=3, window_right=3)),
    "dk_ne_dv_scale": Case(head_dim=5, value_dim=3, q_len=14, kv_len=14, attrs=attrs(scale=0.7, window_left=2,
                                                                                      window_right=2)),
    "causal_centroids": Case(q_len=25, kv_len=25, centroids=True, mask=True,
                             attrs=attrs(causal=1, window_left=4, num_global=1, num_clusters=5)),
    "causal_centroids_sq_lt_skv": Case(q_len=7, kv_len=30, centroids=True, q_heads=4, kv_heads=1,
                                       attrs=attrs(causal=1, window_left=3, num_clusters=3)),
    "causal_centroids_huge": Case(q_len=20, kv_len=20, centroids=True, magnitude=80.0,
                                  attrs=attrs(causal=1, window_left=2, num_clusters=4)),
    "causal_sq_gt_skv_globals": Case(q_len=19, kv_len=8, centroids=True, mask=True,
                                     attrs=attrs(causal=1, window_left=2, num_global=2, num_clusters=3)),
    "centroids_non_causal": Case(q_len=16, kv_len=16, centroids=True, mask=True,
                                 attrs=attrs(window_left=2, window_right=2, num_clusters=3)),
    "long_ragged": Case(batch=1, q_heads=2, kv_heads=1, q_len=203, kv_len=203, head_dim=16, value_dim=12, mask=True,
                        attrs=attrs(window_left=37, window_right=21, num_global=2, num_clusters=13, iterations=4)),
    "long_causal_centroids": Case(batch=1, q_heads=2, kv_heads=2, q_len=150, kv_len=170, head_dim=16, value_dim=16,
                                  centroids=True, mask=True, attrs=attrs(causal=1, window_left=40, dilation=3,
                                                                         num_global=2, num_clusters=6)),
    # Past the kernel's checkpoints of the per-cluster totals (every 256 positions) and its 48-row tiles.
    "checkpoints_causal": Case(batch=1, q_heads=2, kv_heads=1, q_len=700, kv_len=700, head_dim=16, value_dim=8,
                               centroids=True, mask=True, attrs=attrs(causal=1, window_left=20, num_global=1,
                                                                      num_clusters=9)),
    "checkpoints_decode": Case(batch=2, q_heads=2, kv_heads=2, q_len=3, kv_len=900, head_dim=8, value_dim=8,
                               centroids=True, attrs=attrs(causal=1, window_left=30, dilation=2, num_clusters=7)),
    "checkpoints_non_causal": Case(batch=1, q_heads=4, kv_heads=2, q_len=600, kv_len=611, head_dim=16, value_dim=20,
                                   mask=True, attrs=attrs(window_left=16, window_right=16, num_global=2,
                                                          num_clusters=24, iterations=6)),
    "queries": Case(q_len=21, kv_len=17, mask=True, attrs=attrs(cluster="queries", num_clusters=5)),
    "queries_gqa_padded": Case(q_heads=8, kv_heads=2, q_len=30, kv_len=12, mask=True, pad_all=True,
                               attrs=attrs(cluster="queries", num_clusters=6, iterations=2)),
    "queries_more_clusters_than_queries": Case(q_len=3, kv_len=8, attrs=attrs(cluster="queries", num_clusters=5)),
    "queries_sq_1": Case(q_len=1, kv_len=8, attrs=attrs(cluster="queries", num_clusters=2)),
    "queries_huge": Case(q_len=20, kv_len=20, magnitude=80.0, attrs=attrs(cluster="queries", num_clusters=4)),
}


def random_cases(count: int, seed: int = 1) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        kv_heads = int(rng.integers(1, 3))
        q_len = int(rng.integers(1, 90))
        kv_len = q_len if rng.random() < 0.5 else int(rng.integers(1, 90))
        mode = "queries" if rng.random() < 0.2 else "keys"
        causal = int(mode == "keys" and rng.random() < 0.4)
        pattern = {} if mode == "queries" else dict(
            causal=causal, window_left=int(rng.choice([-1, 0, 1, 5, 33])), window_right=int(rng.choice([-1, 0, 2, 7])),
            dilation=int(rng.choice([1, 1, 2, 3])), num_global=int(rng.choice([0, 0, 1, 3])))
        case = Case(
            batch=int(rng.integers(1, 3)), kv_heads=kv_heads, q_heads=kv_heads * int(rng.integers(1, 4)), q_len=q_len,
            kv_len=kv_len, head_dim=int(rng.integers(1, 20)), value_dim=int(rng.integers(1, 20)),
            mask=bool(rng.random() < 0.5), centroids=bool(causal or (mode == "keys" and rng.random() < 0.2)),
            attrs=attrs(cluster=mode, num_clusters=int(rng.integers(1, 12)), iterations=int(rng.integers(0, 6)),
                        **pattern),
        )
        cases.append(case)
    return cases


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if not want.size:
        return 0.0
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, float(np.abs(want).max())))


def three_way(case: Case, *, seed: int = 0) -> tuple[float, float]:
    feeds = case.feeds(seed=seed)
    model = build(case)
    expected = case.reference(feeds)
    kernel = session(model, with_library=True).run(None, feeds)[0]
    function = session(model, with_library=False).run(None, feeds)[0]
    assert np.isfinite(kernel).all() and np.isfinite(function).all()
    return relative_error(kernel, expected), relative_error(function, expected)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_agree(name):
    kernel_err, function_err = three_way(EDGE_CASES[name])
    assert kernel_err < 2e-5, f"kernel vs numpy {kernel_err:.2e}"
    assert function_err < 2e-5, f"function vs numpy {function_err:.2e}"


@pytest.mark.parametrize("index", range(4))
def test_random_shapes_agree(index):
    for case in random_cases(40, seed=200 + index)[index * 10:(index + 1) * 10]:
        kernel_err, function_err = three_way(case, seed=index)
        assert kernel_err < 2e-5 and function_err < 2e-5, f"{case}: kernel {kernel_err:.2e}, function {function_err:.2e}"


def test_fully_padded_row_gives_zeros():
    case = EDGE_CASES["padded_rows"]
    feeds = case.feeds()
    for with_library in (True, False):
        y = session(build(case), with_library=with_library).run(None, feeds)[0]
        assert np.all(y[0] == 0.0) and np.isfinite(y).all() and np.abs(y[1]).max() > 0


@pytest.mark.parametrize("limit", ["window_covers_all", "one_key_per_cluster", "queries_one_per_cluster",
                                   "causal_window_covers_all"])
def test_exact_limits_are_softmax_attention(limit):
    base = Case(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=37, head_dim=16, value_dim=16)
    if limit == "window_covers_all":
        case = Case(**{**base.__dict__, "mask": True, "attrs": attrs(window_left=36, window_right=36, num_clusters=5)})
    elif limit == "one_key_per_cluster":
        case = Case(**{**base.__dict__, "attrs": attrs(window_left=2, window_right=2, num_clusters=37, iterations=0)})
    elif limit == "queries_one_per_cluster":
        case = Case(**{**base.__dict__, "mask": True, "attrs": attrs(cluster="queries", num_clusters=37, iterations=0)})
    else:
        case = Case(**{**base.__dict__, "centroids": True, "attrs": attrs(causal=1, window_left=36, num_clusters=3)})
    feeds = case.feeds(seed=3)
    exact = ref.softmax_attention(feeds["Q"], feeds["K"], feeds["V"], feeds.get("M"),
                                  causal=case.attrs.get("causal", 0))
    model = build(case)
    for y in (session(model, with_library=True).run(None, feeds)[0], session(model, with_library=False).run(None, feeds)[0],
              case.reference(feeds)):
        assert relative_error(y, exact) < 2e-6


def test_causal_output_does_not_depend_on_later_keys():
    case = EDGE_CASES["causal_centroids"]
    feeds = case.feeds()
    later = {n: x.copy() for n, x in feeds.items()}
    later["K"][:, :, 15:] += 3.0
    later["V"][:, :, 15:] -= 2.0
    model = build(case)
    for with_library in (True, False):
        sess = session(model, with_library=with_library)
        a, b = sess.run(None, feeds)[0], sess.run(None, later)[0]
        assert np.array_equal(a[:, :, :15], b[:, :, :15])
        assert not np.allclose(a[:, :, 15:], b[:, :, 15:])


@pytest.mark.parametrize("opset", [13, 15, 21])
def test_function_at_every_opset_and_onnx_reference(opset):
    for case in (EDGE_CASES["padded_rows"], EDGE_CASES["causal_centroids"], EDGE_CASES["queries"]):
        feeds = case.feeds()
        model = build(case, opset=opset)
        onnx.checker.check_model(model, full_check=True)
        expected = case.reference(feeds)
        assert relative_error(session(model, with_library=False).run(None, feeds)[0], expected) < 2e-5
        assert relative_error(reference_evaluator(model).run(None, feeds)[0], expected) < 2e-5


def test_float16_accumulates_in_float32():
    for case in (Case(q_len=64, kv_len=80, head_dim=32, value_dim=32, mask=True,
                      attrs=attrs(window_left=8, window_right=8, num_global=2, num_clusters=6)),
                 Case(q_len=40, kv_len=40, head_dim=16, value_dim=16, centroids=True,
                      attrs=attrs(causal=1, window_left=5, num_clusters=4)),
                 Case(q_len=40, kv_len=33, head_dim=16, value_dim=16, attrs=attrs(cluster="queries", num_clusters=6))):
        feeds = case.feeds(dtype=np.float16)
        model = build(case, dtype=TensorProto.FLOAT16)
        expected = case.reference(feeds)
        kernel = session(model, with_library=True).run(None, feeds)[0]
        function = session(model, with_library=False).run(None, feeds)[0]
        assert kernel.dtype == np.float16 and function.dtype == np.float16
        assert relative_error(kernel, expected) < 2e-3
        assert relative_error(function, expected) < 2e-3


def test_mixed_nodes_share_one_function():
    # keys and queries modes in one model, one node with a mask and one without (placeholder mask).
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "h", "s", "d"]) for n in "QKV"]
    inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "s"]))
    nodes = [helper.make_node("ClusteredAttention", ["Q", "K", "V", "M"], ["Y0"], domain="attnexport",
                              window_left=2, window_right=2, num_clusters=3, iterations=2),
             helper.make_node("ClusteredAttention", ["Q", "K", "V"], ["Y1"], domain="attnexport", cluster="queries",
                              num_clusters=4, iterations=1)]
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("Y0", "Y1")]
    model = attach_functions(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                                               opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    case = Case(batch=2, q_heads=2, kv_heads=2, q_len=10, kv_len=10, mask=True)
    feeds = case.feeds()
    e0 = cref.clustered_attention(feeds["Q"], feeds["K"], feeds["V"], feeds["M"], window_left=2, window_right=2,
                                  num_clusters=3, iterations=2)
    e1 = cref.clustered_attention(feeds["Q"], feeds["K"], feeds["V"], cluster="queries", num_clusters=4, iterations=1)
    for with_library in (False, True):
        y0, y1 = session(model, with_library=with_library).run(None, feeds)
        assert relative_error(y0, e0) < 2e-5 and relative_error(y1, e1) < 2e-5


INVALID = {
    "causal_without_centroids": (dict(causal=1), False, "needs the centroids input"),
    "zero_clusters": (dict(num_clusters=0), False, "num_clusters=0"),
    "negative_iterations": (dict(iterations=-2), False, "iterations=-2"),
    "unknown_mode": (dict(cluster="values"), False, "values"),
    "queries_with_window": (dict(cluster="queries", window_left=3), False, "cluster='queries' is non-causal"),
    "queries_with_centroids": (dict(cluster="queries"), True, "no centroids input"),
    "zero_dilation": (dict(dilation=0), False, "dilation=0"),
    "negative_window": (dict(window_right=-3), False, "window_left/window_right"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_nodes_are_refused_by_every_form(name):
    bad, with_centroids, match = INVALID[name]
    case = Case(q_len=6, kv_len=6, centroids=with_centroids, attrs=attrs(**bad))
    with pytest.raises(UnsupportedError, match=match):
        build(case)
    feeds = case.feeds()
    with pytest.raises(ValueError, match=match):
        case.reference(feeds)
    # The kernel refuses it too (a model written by hand, without attach_functions' checks).
    with pytest.raises(Exception, match=f"ClusteredAttention.*{match}"):
        session(build(case, complete=False), with_library=True).run(None, feeds)


@pytest.mark.parametrize("shape", [(2, 3, 8), (1, 4, 8), (2, 4, 7)])
def test_wrong_centroid_shape_is_refused(shape):
    case = Case(q_len=6, kv_len=6, centroids=True, attrs=attrs(causal=1, window_left=1, num_clusters=4))
    feeds = case.feeds()
    feeds["C"] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="centroids have shape"):
        case.reference(feeds)
    with pytest.raises(Exception, match=r"ClusteredAttention.*centroids"):
        session(build(case), with_library=True).run(None, feeds)
    with pytest.raises(Exception):
        session(build(case), with_library=False).run(None, feeds)


_ISA_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_clustered_attention_op as t
errors = []
for case in list(t.EDGE_CASES.values()) + t.random_cases(12, seed=7):
    feeds = case.feeds()
    y = t.session(t.build(case), with_library=True).run(None, feeds)[0]
    errors.append(t.relative_error(y, case.reference(feeds)))
print(json.dumps(max(errors)))
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_variant_agrees(isa):
    # ATTNEXPORT_CPU_ISA caps the variant (a cap above what the CPU has runs the best it has).
    env = dict(os.environ, ATTNEXPORT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-P", "-c", _ISA_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) < 2e-5
