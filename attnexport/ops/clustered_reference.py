"""Numpy reference of ClusteredAttention: the deterministic k-means and the operator, float64.

Written straight from the semantics (schema.CLUSTERED_ATTENTION, README "ClusteredAttention"), for
clarity, not speed: the far sums are formed set by set from the cluster assignments, quadratic in the
sequence, so that the ONNX function (which replaces far keys by their centres in a dense softmax) and
the C++ kernel (per-cluster totals minus the near keys' share) are checked against an independent form.
"""

from __future__ import annotations

import math

import numpy as np

from attnexport.ops.reference import default_scale, softmax_attention, sparse_pattern, visibility

CLUSTER_MODES = ("keys", "queries")


def kmeans(x: np.ndarray, visible: np.ndarray | None, num_clusters: int, iterations: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means of the rows of x [n, d] that `visible` [n] keeps (all when None).

    Centre c starts at visible row number floor(c * n_v / M) (in position order; when M > n_v
    centres repeat and the duplicates stay empty). Then `iterations` times: assign every visible row
    to its nearest centre (squared Euclidean distance, ties to the lowest index), move each centre to
    the mean of its rows (an empty cluster keeps its centre). Returns (centres [M, d], assignment [n]
    int64 of the final centres, -1 for rows that are not visible). With no visible row the centres
    are zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    visible = np.ones(n, dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    if num_clusters < 1 or iterations < 0:
        raise ValueError(f"kmeans needs num_clusters >= 1 and iterations >= 0, got {num_clusters}, {iterations}")
    rows = np.flatnonzero(visible)
    n_v = rows.size
    if n_v == 0:
        return np.zeros((num_clusters, d)), np.full(n, -1, dtype=np.int64)
    points = x[rows]
    centres = points[[c * n_v // num_clusters for c in range(num_clusters)]].copy()
    for _ in range(iterations):
        assign = nearest(points, centres)
        for c in range(num_clusters):
            members = points[assign == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = nearest(points, centres)
    return centres, out


def nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of every point (squared Euclidean distance; ties: lowest index)."""
    distance = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return np.argmin(distance, axis=1)  # argmin returns the first of equal minima


def check_clustered(*, causal: int, window_left: int, window_right: int, dilation: int, num_global: int,
                    num_clusters: int, iterations: int, cluster: str, has_centroids: bool) -> str | None:
    """The one-line reason these ClusteredAttention attributes are invalid, or None (shapes aside)."""
    if cluster not in CLUSTER_MODES:
        return f"cluster={cluster!r} is not one of {', '.join(CLUSTER_MODES)}"
    if num_clusters < 1:
        return f"num_clusters={num_clusters}: must be >= 1"
    if iterations < 0:
        return f"iterations={iterations}: must be >= 0"
    if window_left < -1 or window_right < -1:
        return f"window_left/window_right={window_left}/{window_right}: must be >= -1 (-1 = unbounded)"
    if dilation < 1:
        return f"dilation={dilation}: must be >= 1"
    if num_global < 0:
        return f"num_global={num_global}: must be >= 0"
    if cluster == "queries":
        if causal or (window_left, window_right, dilation, num_global) != (-1, -1, 1, 0):
            return ("cluster='queries' is non-causal with no near pattern: causal, window_left, window_right, "
                    "dilation and num_global must stay at their defaults (0, -1, -1, 1, 0)")
        if has_centroids:
            return "cluster='queries' takes no centroids input (the queries are clustered per call)"
    elif causal and not has_centroids:
        return ("causal ClusteredAttention needs the centroids input [Hkv, M, Dk]: k-means over all keys would make "
                "a query's output depend on later keys")
    return None


def clustered_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    dilation: int = 1,
    num_global: int = 0,
    num_clusters: int = 32,
    iterations: int = 10,
    cluster: str = "keys",
) -> np.ndarray:
    """ClusteredAttention, float64 (see the module and schema docs). Raises ValueError on invalid
    attributes or a centroids input whose shape is not [Hkv, num_clusters, Dk]."""
    problem = check_clustered(causal=causal, window_left=window_left, window_right=window_right, dilation=dilation,
                              num_global=num_global, num_clusters=num_clusters, iterations=iterations,
                              cluster=cluster, has_centroids=centroids is not None)
    if problem:
        raise ValueError(f"ClusteredAttention {problem}")
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(head_dim)
    keep = np.ones((batch, kv_len), bool) if key_padding_mask is None else np.asarray(key_padding_mask, bool)
    if cluster == "queries":
        return _clustered_queries(q, k, v, keep, scale=scale, num_clusters=num_clusters, iterations=iterations)

    if centroids is not None:
        centroids = np.asarray(centroids, dtype=np.float64)
        if centroids.shape != (kv_heads, num_clusters, head_dim):
            raise ValueError(f"ClusteredAttention centroids have shape {list(centroids.shape)}, expected "
                             f"[Hkv, num_clusters, Dk] = {[kv_heads, num_clusters, head_dim]}")
    centres = np.zeros((batch, kv_heads, num_clusters, head_dim))
    assign = np.full((batch, kv_heads, kv_len), -1, dtype=np.int64)
    for b in range(batch):
        for h in range(kv_heads):
            if centroids is None:
                centres[b, h], assign[b, h] = kmeans(k[b, h], keep[b], num_clusters, iterations)
            else:
                centres[b, h] = centroids[h]
                assign[b, h] = np.where(keep[b], nearest(k[b, h], centroids[h]), -1)

    near_pattern = sparse_pattern(q_len, kv_len, causal=causal, window_left=window_left, window_right=window_right,
                                  dilation=dilation, num_global=num_global)  # [Sq, Skv]
    seen = visibility(batch, q_len, kv_len, causal=bool(causal), key_padding_mask=keep)[:, 0]  # [B, Sq, Skv]
    near = seen & near_pattern[None]
    far = seen & ~near_pattern[None]
    group = q_heads // kv_heads
    y = np.zeros((batch, q_heads, q_len, v.shape[3]))
    for b in range(batch):
        for h in range(q_heads):
            kh = h // group
            onehot = (assign[b, kh][:, None] == np.arange(num_clusters)[None, :]).astype(np.float64)  # [Skv, M]
            far_count = far[b].astype(np.float64) @ onehot  # |F_c(i)|  [Sq, M]
            far_sum = np.einsum("ij,jc,jd->icd", far[b].astype(np.float64), onehot, v[b, kh])  # [Sq, M, Dv]
            near_logits = np.where(near[b], scale * q[b, h] @ k[b, kh].T, -np.inf)  # [Sq, Skv]
            centre_logits = np.where(far_count > 0, scale * q[b, h] @ centres[b, kh].T, -np.inf)  # [Sq, M]
            top = np.maximum(near_logits.max(axis=1, initial=-np.inf), centre_logits.max(axis=1, initial=-np.inf))
            top = np.where(np.isfinite(top), top, 0.0)[:, None]
            near_w, centre_w = np.exp(near_logits - top), np.exp(centre_logits - top)
            numerator = near_w @ v[b, kh] + np.einsum("ic,icd->id", centre_w, far_sum)
            denominator = near_w.sum(axis=1) + (centre_w * far_count).sum(axis=1)
            y[b, h] = np.where(denominator[:, None] > 0, numerator / np.where(denominator > 0, denominator, 1.0)[:, None],
                               0.0)
    return y


def clustered_state_shape(batch: int, kv_heads: int, head_dim: int, value_dim: int, *, window_left: int,
                          num_global: int, num_clusters: int) -> tuple[int, int, int, int]:
    """[B, Hkv, G + R + M + 1, Dk + Dv + 1]: global rows, R = window_left + 1 window rows, cluster rows, counter."""
    return (batch, kv_heads, num_global + window_left + 1 + num_clusters + 1, head_dim + value_dim + 1)


def check_state_mode(*, causal: int, window_left: int, dilation: int, cluster: str, has_centroids: bool,
                     q_len: int, kv_len: int) -> str | None:
    """The one-line reason ClusteredAttention cannot carry a state with these attributes, or None."""
    if cluster != "keys":
        return "a state needs cluster='keys' (query clustering attends to every key)"
    if not causal:
        return "a state needs causal=1 (later calls add later keys)"
    if not has_centroids:
        return "a state needs the centroids input (the far keys' clusters are summed as they leave the window)"
    if window_left < 0:
        return "a state needs a finite window_left >= 0 (the window rows are the bounded KV cache)"
    if dilation != 1:
        return f"a state needs dilation=1, got {dilation} (a dilated window moves keys in and out of the clusters)"
    if q_len != kv_len:
        return f"a state needs as many queries as new keys (the call's tokens), got Sq={q_len}, Skv={kv_len}"
    return None


def clustered_attention_step(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
    past_state: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 1,
    window_left: int = 0,
    window_right: int = -1,
    dilation: int = 1,
    num_global: int = 0,
    num_clusters: int = 32,
    iterations: int = 10,
    cluster: str = "keys",
) -> tuple[np.ndarray, np.ndarray]:
    """ClusteredAttention in state mode, float64: (Y [B, Hq, S, Dv], present_state float32).

    Written token list by token list from the state's meaning (schema.CLUSTERED_ATTENTION, README): the
    state's global and window rows and the call's tokens are keys with positions, the cluster rows are
    per-cluster (sum v, count) of older keys. Query i (position p = P + i) sees the kept keys at positions
    <= p; near: position < G or >= p - W; far: the rest, plus everything summed in the cluster rows.
    Running a sequence in one call or in any split gives the full causal op's output (the tests' point).
    `window_right`, `iterations` are unused (causal; fixed centres)."""
    problem = check_clustered(causal=causal, window_left=window_left, window_right=window_right, dilation=dilation,
                              num_global=num_global, num_clusters=num_clusters, iterations=iterations,
                              cluster=cluster, has_centroids=centroids is not None)
    problem = problem or check_state_mode(causal=causal, window_left=window_left, dilation=dilation, cluster=cluster,
                                          has_centroids=centroids is not None, q_len=q.shape[2], kv_len=k.shape[2])
    if problem:
        raise ValueError(f"ClusteredAttention {problem}")
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, q_heads, new, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[3]
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.shape != (kv_heads, num_clusters, head_dim):
        raise ValueError(f"ClusteredAttention centroids have shape {list(centroids.shape)}, expected "
                         f"[Hkv, num_clusters, Dk] = {[kv_heads, num_clusters, head_dim]}")
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(head_dim)
    g_rows, r_rows, m_rows = num_global, window_left + 1, num_clusters
    shape = clustered_state_shape(batch, kv_heads, head_dim, value_dim, window_left=window_left,
                                  num_global=num_global, num_clusters=num_clusters)
    state = np.zeros(shape) if past_state is None else np.asarray(past_state, dtype=np.float64)
    if state.shape != shape:
        raise ValueError(f"ClusteredAttention past_state has shape {list(state.shape)}, expected {list(shape)}")
    keep = np.ones((batch, new), bool) if key_padding_mask is None else np.asarray(key_padding_mask, bool)
    present = np.zeros(shape)
    y = np.zeros((batch, q_heads, new, value_dim))
    group = q_heads // kv_heads
    window0, cluster0 = g_rows, g_rows + r_rows
    for b in range(batch):
        for h in range(kv_heads):
            rows = state[b, h]
            seen = int(rows[-1, 0])  # P
            # (position, key, value, kept) of every key the state holds exactly, then of the call's tokens.
            keys = [(g, rows[g, :head_dim], rows[g, head_dim:-1], rows[g, -1] > 0) for g in range(g_rows)]
            keys += [(seen - r_rows + r, rows[window0 + r, :head_dim], rows[window0 + r, head_dim:-1],
                      rows[window0 + r, -1] > 0) for r in range(r_rows)]
            keys += [(seen + i, k[b, h, i], v[b, h, i], bool(keep[b, i])) for i in range(new)]
            sums = rows[cluster0:cluster0 + m_rows, head_dim:-1].copy()  # [M, Dv]
            counts = rows[cluster0:cluster0 + m_rows, -1].copy()  # [M]
            mu = centroids[h]
            for qh in range(h * group, (h + 1) * group):
                for i in range(new):
                    p = seen + i
                    far_sum, far_count = sums.copy(), counts.copy()
                    near_k, near_v = [], []
                    for pos, key, value, kept in keys:
                        if not kept or pos > p:  # a window row at a position < G is never flagged
                            continue
                        if pos < g_rows or pos >= p - window_left:
                            near_k.append(key)
                            near_v.append(value)
                        else:
                            c = int(nearest(key[None], mu)[0])
                            far_sum[c] += value
                            far_count[c] += 1
                    y[b, qh, i] = _combine(q[b, qh, i], near_k, near_v, mu, far_sum, far_count, scale, value_dim)
            # The next state: globals, the last R positions, the evicted kept keys summed into their clusters.
            end = seen + new
            out = present[b, h]
            out[cluster0:cluster0 + m_rows, head_dim:-1] = sums
            out[cluster0:cluster0 + m_rows, -1] = counts
            out[:g_rows] = rows[:g_rows]
            for pos, key, value, kept in keys[g_rows:]:  # the window rows, then the call's tokens
                row = np.concatenate([key, value, [1.0]]) if kept else 0.0  # an unflagged row is zeros
                if 0 <= pos < g_rows and pos >= seen:
                    out[pos] = row
                elif pos >= max(g_rows, end - r_rows):
                    out[window0 + pos - (end - r_rows)] = row
                elif kept and pos >= g_rows:  # leaves the window in this call (window rows are flagged >= G only)
                    c = int(nearest(key[None], mu)[0])
                    out[cluster0 + c, head_dim:-1] += value
                    out[cluster0 + c, -1] += 1
            out[-1, 0] = end
    return y, present.astype(np.float32)


def _combine(q_row, near_k, near_v, mu, far_sum, far_count, scale, value_dim) -> np.ndarray:
    """One row of the clustered formula: near keys exact, cluster c as far_count[c] copies of mu[c] with
    values summing to far_sum[c]; max-stabilised; 0 when nothing is visible."""
    logits = [scale * float(q_row @ key) for key in near_k]
    logits += [scale * float(q_row @ mu[c]) for c in range(len(mu)) if far_count[c] > 0]
    if not logits:
        return np.zeros(value_dim)
    top = max(logits)
    num, den = np.zeros(value_dim), 0.0
    for key, value in zip(near_k, near_v):
        w = math.exp(scale * float(q_row @ key) - top)
        num += w * value
        den += w
    for c in range(len(mu)):
        if far_count[c] > 0:
            w = math.exp(scale * float(q_row @ mu[c]) - top)
            num += w * far_sum[c]
            den += w * far_count[c]
    return num / den


def _clustered_queries(q, k, v, keep, *, scale, num_clusters, iterations) -> np.ndarray:
    """cluster=queries: each centre of the (batch, query head)'s queries attends exactly; members share its row."""
    batch, q_heads, q_len, head_dim = q.shape
    centres = np.zeros((batch, q_heads, num_clusters, head_dim))
    assign = np.zeros((batch, q_heads, q_len), dtype=np.int64)
    for b in range(batch):
        for h in range(q_heads):
            centres[b, h], assign[b, h] = kmeans(q[b, h], None, num_clusters, iterations)
    rows = softmax_attention(centres, k, v, keep, scale=scale)  # [B, Hq, M, Dv]
    return np.take_along_axis(rows, assign[..., None], axis=2)


__all__ = ["CLUSTER_MODES", "check_clustered", "check_state_mode", "clustered_attention", "clustered_attention_step",
           "clustered_state_shape", "kmeans", "nearest"]
