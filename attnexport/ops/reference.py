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
    *,
    scale: float | None = None,
    causal: int = 0,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    expansion_point: str = "zero",
) -> np.ndarray:
    """LinearAttention, quadratic form, float64.

    y_i = Σ_j A_ij v_j / (Σ_j A_ij + eps) over visible j, A_ij = φ(q̃_i)·φ(k̃_j), q̃ = √scale·q, k̃ = √scale·k.
    For taylor2, A_ij = 1 + (s_ij − c_i) + (s_ij − c_i)²/2 with s = scale·q·k and c_i the expansion
    point of row i (0, the mean or the maximum of its visible logits).
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
    # eps rescaled with the row (favor); eps = 0 must stay 0 even where exp(-row_log_scale) overflows.
    eps_row = np.zeros_like(row_log_scale) if eps == 0 else eps * np.exp(-row_log_scale)
    denominator = weights.sum(axis=-1, keepdims=True) + eps_row
    # A row whose weights are all zero (no visible key, or relu features that vanish) gives 0, not 0/0.
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


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
