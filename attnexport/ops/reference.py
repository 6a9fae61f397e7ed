"""Numpy references of the attnexport operators.

These are the third, independent form of every operator (beside the ONNX function and the C++/CUDA
kernels). They are written for clarity, not speed: quadratic, float64, straight from the semantics in
DESIGN.md, so that tests can compare the other two forms against them.
"""

from __future__ import annotations

import math

import numpy as np

FEATURE_MAPS = ("elu1", "relu", "taylor2", "favor")
EXPANSION_POINTS = ("zero", "mean", "max")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def expand_kv_heads(x: np.ndarray, num_q_heads: int) -> np.ndarray:
    """[B, Hkv, S, D] -> [B, Hq, S, D]: query head h reads kv head h // (Hq / Hkv)."""
    num_kv_heads = x.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    return np.repeat(x, num_q_heads // num_kv_heads, axis=1)


def visibility(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    key_padding_mask: np.ndarray | None,
) -> np.ndarray:
    """Boolean [B, 1, Sq, Skv]: may query i see key j?

    Causal is bottom-right aligned (the KV-cache convention): i sees j iff j <= i + (Skv - Sq).
    """
    vis = np.ones((batch, 1, q_len, kv_len), dtype=bool)
    if causal:
        i = np.arange(q_len)[:, None]
        j = np.arange(kv_len)[None, :]
        vis &= (j <= i + (kv_len - q_len))[None, None]
    if key_padding_mask is not None:
        vis &= np.asarray(key_padding_mask, dtype=bool)[:, None, None, :]
    return vis


def elu1(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _favor_log_features(x: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """log φ(x) for Performer's positive random features, φ(x) = exp(Wᵀx − |x|²/2) / √F."""
    num_features = projection.shape[1]
    return x @ projection - 0.5 * np.sum(x * x, axis=-1, keepdims=True) - 0.5 * math.log(num_features)


def linear_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    projection: np.ndarray | None = None,
    past_state: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    expansion_point: str = "zero",
    return_state: bool = False,
):
    """LinearAttention, quadratic form, float64.

    y_i = Σ_j A_ij v_j / (Σ_j A_ij + eps) over visible j, A_ij = φ(q̃_i)·φ(k̃_j), q̃ = √scale·q, k̃ = √scale·k.
    For taylor2, A_ij = 1 + (s_ij − c_i) + (s_ij − c_i)²/2 with s = scale·q·k and c_i the expansion
    point of row i (0, the mean or the maximum of its visible logits).

    State (`past_state` in; with return_state, returns (y, present_state)): [B, Hkv, F, Dv + 2] per
    feature f of `linear_features`: [S_f (Dv) | z_f | m_f], the keys it holds summed as
    S_f = Σ_j e^{log φ(k̃_j)_f - m_f} v_j, z_f = Σ_j e^{log φ(k̃_j)_f - m_f}; m_f is favor's running
    shift (the largest log φ(k̃_j)_f; a feature with z_f = 0 holds no key) and 0 for the other feature
    maps, whose rows are plain sums. Query i also sees every key the past state holds:
    y_i = (Σ_j A_ij v_j + φ(q̃_i)·S) / (Σ_j A_ij + φ(q̃_i)·z + eps). The present state adds every key
    of the call that key_padding_mask keeps. taylor2 carries a state only with expansion_point zero.
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAPS}")
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, num_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(head_dim)
    k_kv, v_kv = k, v
    k = expand_kv_heads(k, num_q_heads)
    v = expand_kv_heads(v, num_q_heads)
    vis = visibility(batch, q_len, kv_len, causal=bool(causal), key_padding_mask=key_padding_mask)
    root = math.sqrt(scale)

    row_log_scale = np.zeros((batch, num_q_heads, q_len, 1))
    if feature_map in ("elu1", "relu"):
        phi = elu1 if feature_map == "elu1" else relu
        weights = phi(root * q) @ np.swapaxes(phi(root * k), -1, -2)
    elif feature_map == "taylor2":
        logits = scale * (q @ np.swapaxes(k, -1, -2))
        center = _expansion_center(logits, vis, expansion_point)
        shifted = logits - center
        weights = 1.0 + shifted + 0.5 * shifted * shifted
    else:
        if projection is None:
            raise ValueError("feature_map 'favor' needs the projection input W [Dk, F]")
        w = np.asarray(projection, dtype=np.float64)
        log_q = _favor_log_features(root * q, w)  # [B, H, Sq, F]
        log_k = _favor_log_features(root * k, w)  # [B, H, Skv, F]
        # log A_ij = logsumexp_f(log_q_if + log_k_jf), evaluated stably and exactly in float64
        pair = log_q[:, :, :, None, :] + log_k[:, :, None, :, :]
        pair_max = pair.max(axis=-1, keepdims=True)
        log_weights = (pair_max + np.log(np.exp(pair - pair_max).sum(axis=-1, keepdims=True)))[..., 0]
        # Rows are rescaled by their largest visible weight; eps is rescaled with them, so this is exact.
        masked = np.where(vis, log_weights, -np.inf)
        row_max = masked.max(axis=-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        weights = np.exp(log_weights - row_max)
        row_log_scale = row_max

    weights = np.where(vis, weights, 0.0)
    numerator = weights @ v
    state_den = np.zeros_like(row_log_scale)
    if (past_state is not None or return_state) and feature_map == "taylor2" and expansion_point != "zero":
        raise ValueError("taylor2 carries a state only with expansion_point 'zero'")
    if past_state is not None:
        s_past, z_past, m_past = linear_state_parts(past_state, v.shape[3], favor=feature_map == "favor")
        group = num_q_heads // s_past.shape[1]
        s_full, z_full = np.repeat(s_past, group, axis=1), np.repeat(z_past, group, axis=1)
        m_full = np.repeat(m_past, group, axis=1)
        if feature_map == "favor":
            # The row's reference grows to the largest past term; the call's weights follow it.
            past_logits = log_q + m_full[:, :, None, :]  # [B, H, Sq, F]
            top = np.maximum(row_log_scale, past_logits.max(axis=-1, keepdims=True, initial=-np.inf))
            weights = weights * np.exp(row_log_scale - top)
            numerator = numerator * np.exp(row_log_scale - top)
            row_log_scale = top
            past_weights = np.exp(past_logits - top)
        else:
            past_weights = linear_features(root * q, feature_map, projection)
        numerator = numerator + past_weights @ s_full
        state_den = (past_weights * z_full[:, :, None, :]).sum(axis=-1, keepdims=True)
    # eps rescaled with the row (favor); eps = 0 must stay 0 even where exp(-row_log_scale) overflows.
    eps_row = np.zeros_like(row_log_scale) if eps == 0 else eps * np.exp(-row_log_scale)
    denominator = weights.sum(axis=-1, keepdims=True) + state_den + eps_row
    # A row whose weights are all zero (no visible key, or relu features that vanish) gives 0, not 0/0.
    safe = np.where(denominator > 0, denominator, 1.0)
    y = np.where(denominator > 0, numerator / safe, 0.0)
    if not return_state:
        return y
    return y, linear_state_update(k_kv, v_kv, key_padding_mask, past_state, scale=scale, feature_map=feature_map,
                                  projection=projection)


def linear_features(x: np.ndarray, feature_map: str, projection: np.ndarray | None = None, *, log: bool = False
                    ) -> np.ndarray:
    """φ(x) [.., F] as the state stores it (x already √scale-scaled): elu1 / relu elementwise; taylor2
    [1, x, the upper triangle of x xᵀ row by row, diagonal / √2] (F = 1 + D + D(D+1)/2); favor
    exp(Wᵀx - |x|²/2) / √F (with log=True: its logarithm)."""
    if feature_map == "elu1":
        return elu1(x)
    if feature_map == "relu":
        return relu(x)
    if feature_map == "taylor2":
        d = x.shape[-1]
        rows, cols = np.triu_indices(d)
        quad = x[..., rows] * x[..., cols] * np.where(rows == cols, 1 / math.sqrt(2), 1.0)
        return np.concatenate([np.ones(x.shape[:-1] + (1,)), x, quad], axis=-1)
    if projection is None:
        raise ValueError("feature_map 'favor' needs the projection input W [Dk, F]")
    logs = _favor_log_features(x, np.asarray(projection, np.float64))
    return logs if log else np.exp(logs)


def linear_state_parts(state: np.ndarray, value_dim: int, *, favor: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S [.., F, Dv], z [.., F], m [.., F]) of a LinearAttention state, float64. favor: a feature with
    z_f = 0 holds no key (S row 0, m -inf); other feature maps: m = 0."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1] != value_dim + 2:
        raise ValueError(f"LinearAttention state has {state.shape[-1]} columns, expected Dv + 2 = {value_dim + 2}")
    s, z, m = state[..., :value_dim], state[..., value_dim], state[..., value_dim + 1]
    if not favor:
        return s, z, np.zeros_like(z)
    held = z > 0
    return np.where(held[..., None], s, 0.0), np.where(held, z, 0.0), np.where(held, m, -np.inf)


def linear_state_update(k: np.ndarray, v: np.ndarray, key_padding_mask, past_state, *, scale: float, feature_map: str,
                        projection=None) -> np.ndarray:
    """The present state: past_state (zeros if None) plus the keys [B, Hkv, Skv, Dk] that key_padding_mask keeps."""
    batch, kv_heads, kv_len, _ = k.shape
    value_dim = v.shape[3]
    keep = np.ones((batch, kv_len), bool) if key_padding_mask is None else np.asarray(key_padding_mask, bool)
    x = math.sqrt(scale) * k
    favor = feature_map == "favor"
    features = linear_features(x, feature_map, projection, log=favor)  # [B, Hkv, Skv, F]
    num_features = features.shape[-1]
    if past_state is None:
        past_state = np.zeros((batch, kv_heads, num_features, value_dim + 2))
    s, z, m = linear_state_parts(past_state, value_dim, favor=favor)
    if favor:
        kept = np.where(keep[:, None, :, None], features, -np.inf)
        m_new = np.maximum(m, kept.max(axis=2, initial=-np.inf))
        m_safe = np.where(np.isfinite(m_new), m_new, 0.0)
        e = np.exp(kept - m_safe[:, :, None, :])
        factor = np.exp(m - m_safe)
        s, z, m = s * factor[..., None] + np.swapaxes(e, -1, -2) @ v, z * factor + e.sum(axis=2), m_safe
    else:
        e = np.where(keep[:, None, :, None], features, 0.0)
        s, z = s + np.swapaxes(e, -1, -2) @ v, z + e.sum(axis=2)
    return np.concatenate([s, z[..., None], m[..., None]], axis=-1)


def _expansion_center(logits: np.ndarray, vis: np.ndarray, expansion_point: str) -> np.ndarray:
    if expansion_point not in EXPANSION_POINTS:
        raise ValueError(f"unknown expansion_point {expansion_point!r}; expected one of {EXPANSION_POINTS}")
    if expansion_point == "zero":
        return np.zeros(logits.shape[:-1] + (1,))
    count = vis.sum(axis=-1, keepdims=True)
    if expansion_point == "mean":
        total = np.where(vis, logits, 0.0).sum(axis=-1, keepdims=True)
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)
    peak = np.where(vis, logits, -np.inf).max(axis=-1, keepdims=True)
    return np.where(count > 0, peak, 0.0)


# -- LseAttention ------------------------------------------------------------------------------


def lse_state_parts(state: np.ndarray, value_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S [.., Dk, Dv], z [.., Dk], m [.., Dk]) of an LseAttention state [.., Dk, Dv + 2], float64.

    A key dimension d with z_d = 0 holds no key: its S row is read as 0 and its maximum as -inf, so
    an all-zeros state is the empty state.
    """
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1] != value_dim + 2:
        raise ValueError(f"LseAttention state has {state.shape[-1]} columns, expected Dv + 2 = {value_dim + 2}")
    z = state[..., value_dim]
    held = z > 0
    s = np.where(held[..., None], state[..., :value_dim], 0.0)
    m = np.where(held, state[..., value_dim + 1], -np.inf)
    return s, np.where(held, z, 0.0), m


def lse_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    past_state: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    return_state: bool = False,
):
    """LseAttention (Heinsen 2024), quadratic form, float64, straight from the definition:

        l_ij = log Σ_d exp(q̃_id + k̃_jd),  q̃ = √scale·q, k̃ = √scale·k,
        y_i  = Σ_j e^{l_ij} v_j / Σ_j e^{l_ij}  over the keys j query i sees (signed V),

    evaluated in log space (max-shifted), so it is exact for inputs of any magnitude. Query i sees
    every key held by `past_state` and the keys j of this call that key_padding_mask keeps and, when
    causal, j <= i + (Skv - Sq). A row that sees no key gives 0.

    State [B, Hkv, Dk, Dv + 2] (float): per key dimension d, columns [:Dv] hold
    S_d = Σ_j exp(k̃_jd - m_d) v_j, column Dv holds z_d = Σ_j exp(k̃_jd - m_d) and column Dv + 1 holds
    m_d = max_j k̃_jd, over the keys it holds (see `lse_state_parts`; zeros = empty). With
    return_state, returns (y, present_state): the past keys plus every key of this call that
    key_padding_mask keeps (the causal attribute only says which of them each query sees).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(head_dim)
    root = math.sqrt(scale)
    qt, kt = root * q, root * k
    kt_full, v_full = expand_kv_heads(kt, num_q_heads), expand_kv_heads(v, num_q_heads)
    vis = visibility(batch, q_len, kv_len, causal=bool(causal), key_padding_mask=key_padding_mask)

    pair = qt[:, :, :, None, :] + kt_full[:, :, None, :, :]  # [B, H, Sq, Skv, Dk]
    peak = pair.max(axis=-1, keepdims=True) if head_dim else np.zeros(pair.shape[:-1] + (1,))
    logits = (peak + np.log(np.exp(pair - peak).sum(axis=-1, keepdims=True)))[..., 0]
    logits = np.where(vis, logits, -np.inf)

    if past_state is None:
        past_state = np.zeros((batch, num_kv_heads, head_dim, value_dim + 2))
    s_past, z_past, m_past = lse_state_parts(past_state, value_dim)
    s_full = expand_kv_heads(s_past, num_q_heads)  # [B, H, Dk, Dv]
    z_full = expand_kv_heads(z_past[..., None], num_q_heads)[..., 0]  # [B, H, Dk]
    m_full = expand_kv_heads(m_past[..., None], num_q_heads)[..., 0]
    state_logits = qt + m_full[:, :, None, :]  # [B, H, Sq, Dk]: log weight of key dimension d of the past

    row_max = np.maximum(logits.max(axis=-1, keepdims=True, initial=-np.inf),
                         state_logits.max(axis=-1, keepdims=True, initial=-np.inf))
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)
    past_weights = np.exp(state_logits - row_max)
    numerator = weights @ v_full + past_weights @ s_full
    denominator = weights.sum(axis=-1, keepdims=True) + (past_weights * z_full[:, :, None, :]).sum(axis=-1, keepdims=True)
    y = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    if not return_state:
        return y

    keep = np.ones((batch, kv_len), dtype=bool) if key_padding_mask is None else np.asarray(key_padding_mask, dtype=bool)
    kept = np.where(keep[:, None, :, None], kt, -np.inf)  # [B, Hkv, Skv, Dk]
    m_new = np.maximum(m_past, kept.max(axis=2, initial=-np.inf))
    m_safe = np.where(np.isfinite(m_new), m_new, 0.0)
    e = np.exp(kept - m_safe[:, :, None, :])
    factor = np.exp(m_past - m_safe)  # 0 for dimensions that held nothing
    s_new = s_past * factor[..., None] + np.swapaxes(e, -1, -2) @ v
    z_new = z_past * factor + e.sum(axis=2)
    return y, np.concatenate([s_new, z_new[..., None], m_safe[..., None]], axis=-1)


def softmax_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    attn_bias: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Exact softmax attention in float64; rows that see no key give zeros.

    `allowed` ([B or 1, 1 or H, Sq, Skv] bool) restricts the pattern further (sparse attention).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, num_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if scale is None:
        scale = default_scale(head_dim)
    k = expand_kv_heads(k, num_q_heads)
    v = expand_kv_heads(v, num_q_heads)
    vis = visibility(batch, q_len, kv_len, causal=bool(causal), key_padding_mask=key_padding_mask)
    if allowed is not None:
        vis = vis & allowed
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if attn_bias is not None:
        logits = logits + np.asarray(attn_bias, dtype=np.float64)
    logits = np.where(vis, logits, -np.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, (weights @ v) / np.where(total > 0, total, 1.0), 0.0)


# -- SparseAttention ---------------------------------------------------------------------------

# BigBird random blocks are a hash of (seed, query block, r) taken modulo the number of key blocks,
# computed in integer arithmetic that never leaves [0, 2^62) (so numpy, the ONNX function's int64
# ops and the C++ kernel agree bit for bit, with no overflow): M = 2^31 - 1 (a prime), A = 48271,
#   round(h, v) = A * ((((h + v) mod M)^2) mod M) mod M
#   random_key_block(seed, qb, r, nkb) = round(round(seed mod M, qb + 1), r + 1) mod nkb.
RANDOM_BLOCK_MODULUS = 2147483647
RANDOM_BLOCK_MULTIPLIER = 48271


def _random_round(h, v):
    m = RANDOM_BLOCK_MODULUS
    t = (h + v) % m
    return (RANDOM_BLOCK_MULTIPLIER * ((t * t) % m)) % m


def random_key_block(seed, query_block, r, num_key_blocks):
    """The r-th random key block of query block `query_block` (ints or int64 arrays, broadcast)."""
    h = np.asarray(seed, dtype=np.int64) % RANDOM_BLOCK_MODULUS
    h = _random_round(_random_round(h, np.asarray(query_block, dtype=np.int64) + 1), np.asarray(r, dtype=np.int64) + 1)
    return h % np.int64(num_key_blocks)


def sparse_pattern(
    q_len: int,
    kv_len: int,
    *,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    dilation: int = 1,
    num_global: int = 0,
    block_size: int = 0,
    num_random_blocks: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Boolean [Sq, Skv]: is key j in SparseAttention's pattern for query i (key padding aside)?

    With i' = i + (Skv - Sq) (the query's position, bottom-right aligned) and o = j - i':
      causal (if set) and (window or global or random), where
      window:  (window_left < 0 or o >= -window_left) and (window_right < 0 or o <= window_right)
               and o % dilation == 0;
      global:  j < num_global (a global key) or 0 <= i' < num_global (a global query);
      random:  block_size > 0, i' >= 0 and j // block_size is one of random_key_block(seed, i' // block_size,
               r, ceil(Skv / block_size)) for r < num_random_blocks.
    Dilation thins the window only; global and random keys are visible whatever their offset.
    """
    _check_sparse(window_left, window_right, dilation, num_global, block_size, num_random_blocks, seed)
    pos = np.arange(q_len, dtype=np.int64)[:, None] + (kv_len - q_len)  # i'
    key = np.arange(kv_len, dtype=np.int64)[None, :]
    offset = key - pos
    window = offset % dilation == 0
    if window_left >= 0:
        window &= offset >= -window_left
    if window_right >= 0:
        window &= offset <= window_right
    visible = window | (key < num_global) | ((pos >= 0) & (pos < num_global))
    if block_size > 0 and num_random_blocks > 0 and kv_len > 0:
        num_key_blocks = -(-kv_len // block_size)
        query_block = np.where(pos >= 0, pos // block_size, 0)  # [Sq, 1]
        key_block = key // block_size
        for r in range(num_random_blocks):
            chosen = random_key_block(seed, query_block, r, num_key_blocks)  # [Sq, 1]
            visible |= (pos >= 0) & (key_block == chosen)
    if causal:
        visible &= offset <= 0
    return visible


def _check_sparse(window_left, window_right, dilation, num_global, block_size, num_random_blocks, seed) -> None:
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window_left/window_right must be >= -1 (-1 = unbounded), got {window_left}/{window_right}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if num_global < 0 or block_size < 0 or num_random_blocks < 0 or seed < 0:
        raise ValueError("num_global, block_size, num_random_blocks and seed must be >= 0")


def sparse_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    attn_bias: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    dilation: int = 1,
    num_global: int = 0,
    block_size: int = 0,
    num_random_blocks: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """SparseAttention, dense masked form, float64: softmax over the keys of `sparse_pattern` (and
    key_padding_mask) of scale * q.k + attn_bias; rows with no visible key (or only -inf logits) give 0."""
    q_len, kv_len = np.shape(q)[2], np.shape(k)[2]
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(np.shape(q)[3])
    pattern = sparse_pattern(q_len, kv_len, causal=causal, window_left=window_left, window_right=window_right,
                             dilation=dilation, num_global=num_global, block_size=block_size,
                             num_random_blocks=num_random_blocks, seed=seed)
    return softmax_attention(q, k, v, key_padding_mask, scale=scale, attn_bias=attn_bias,
                             allowed=pattern[None, None])
