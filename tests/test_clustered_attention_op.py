"""ClusteredAttention's three forms agree: the CPU kernel (ONNX Runtime with the op library), the ONNX
function (ONNX Runtime without it, and onnx.reference) and the numpy reference, on random shapes and
on the edge cases: GQA, padding masks (a fully padded row), ragged lengths, fewer keys than clusters,
Sq = 1, huge logits, float16, causal with given centroids, both exact limits, the query mode and its
exact limit, and clear errors for invalid nodes.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnexport.ops import clustered_reference as cref
from attnexport.ops import reference as ref


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
