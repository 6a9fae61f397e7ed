"""Numpy reference of NystromAttention (float64, one (batch, head) at a time, straight from the
semantics in attnexport/ops/nystrom_attention.py). Kept beside reference.py, not in it, because it
is long and has its own helpers (landmarks, the three solvers)."""

from __future__ import annotations

import math

import numpy as np

from attnexport.linalg import lstsq
from attnexport.ops.reference import default_scale

LANDMARK_METHODS = ("segment_means", "kmeans")
SOLVERS = ("sketch", "newton_schulz", "direct")


def segment_of(n: int, count: int) -> np.ndarray:
    """Landmark of each of n rows: row r is in segment c iff floor(c·n/count) <= r < floor((c+1)·n/count),
    i.e. c = ((r + 1)·count − 1) // n (integer arithmetic, the same in every form)."""
    return ((np.arange(n, dtype=np.int64) + 1) * count - 1) // n


def landmarks(x: np.ndarray, count: int, method: str = "segment_means", iterations: int = 0) -> np.ndarray:
    """[count, D] landmarks of the rows x [n, D] (count <= n).

    segment_means: the mean of each segment. kmeans: `iterations` Lloyd steps from the rows
    floor(c·n/count); a row joins the centre with the smallest |μ|² − 2 x·μ (= squared distance minus
    |x|², the form every implementation computes), ties to the lowest index; an empty cluster keeps
    its centre."""
    n = x.shape[0]
    if count == 0:
        return np.zeros((0, x.shape[1]))
    if method == "segment_means":
        seg = segment_of(n, count)
        return np.stack([x[seg == c].mean(axis=0) for c in range(count)])
    if method != "kmeans":
        raise ValueError(f"landmarks={method!r} is not one of {', '.join(LANDMARK_METHODS)}")
    centres = x[(np.arange(count) * n) // count].copy()
    for _ in range(iterations):
        score = (centres * centres).sum(axis=1)[None, :] - 2.0 * (x @ centres.T)  # [n, count]
        nearest = np.argmin(score, axis=1)
        for c in range(count):
            members = nearest == c
            if members.any():
                centres[c] = x[members].mean(axis=0)
    return centres


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def newton_schulz_inverse(m: np.ndarray, iterations: int) -> np.ndarray:
    """Nyströmformer's iterative pseudo-inverse: Z₀ = Mᵀ / (‖M‖₁‖M‖∞), then
    Z ← ¼ Z (13I − MZ (15I − MZ (7I − MZ))) a fixed number of times."""
    eye = np.eye(m.shape[0])
    z = m.T / (np.abs(m).sum(axis=0).max() * np.abs(m).sum(axis=1).max())
    for _ in range(iterations):
        mz = m @ z
        z = 0.25 * z @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z


def solve_landmark_system(m: np.ndarray, rhs: np.ndarray, solver: str, *, newton_iterations: int = 6,
                          ridge: float = 1e-2) -> np.ndarray:
    """X for the landmark system M X ≈ rhs (M [m_q, m_k], rhs [m_q, Dv]).

    sketch: argmin ‖M X − rhs‖² + ridge‖X‖², the stacked tall system [M; √ridge·I] solved by the
    sketch-preconditioned solver; direct: the same X from the Cholesky factor of MᵀM + ridge·I;
    newton_schulz: Z_T rhs with Z_T the Newton–Schulz pseudo-inverse of M after T iterations."""
    if solver == "newton_schulz":
        return newton_schulz_inverse(m, newton_iterations) @ rhs
    if solver not in ("sketch", "direct"):
        raise ValueError(f"solver={solver!r} is not one of {', '.join(SOLVERS)}")
    if not ridge > 0:
        raise ValueError(f"solver {solver} needs ridge > 0, got {ridge}")
    if solver == "sketch":
        stacked = np.concatenate([m, math.sqrt(ridge) * np.eye(m.shape[1])])
        padded = np.concatenate([rhs, np.zeros((m.shape[1], rhs.shape[1]))])
        return lstsq(stacked, padded)[0]
    factor = np.linalg.cholesky(m.T @ m + ridge * np.eye(m.shape[1]))
    return np.linalg.solve(factor.T, np.linalg.solve(factor, m.T @ rhs))


def nystrom_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_padding_mask: np.ndarray | None = None,
    *,
    scale: float | None = None,
    causal: int = 0,
    num_landmarks: int = 64,
    landmarks_method: str = "segment_means",
    iterations: int = 3,
    solver: str = "sketch",
    newton_iterations: int = 6,
    ridge: float = 1e-2,
) -> np.ndarray:
    """NystromAttention in float64: per (batch, query head) with kv head h // (Hq/Hkv), over the n_v
    visible keys (in order), m_k = min(num_landmarks, n_v) key and m_q = min(num_landmarks, Sq) query
    landmarks: Y = softmax(s·Q L_kᵀ) · X with X solving softmax(s·L_q L_kᵀ) X ≈ softmax(s·L_q K_visᵀ) V_vis
    (see solve_landmark_system); a batch row with no visible key gives zeros."""
    if causal:
        raise ValueError("NystromAttention is non-causal only: a landmark averages future tokens")
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if scale is None or (isinstance(scale, float) and math.isnan(scale)):
        scale = default_scale(head_dim)
    if num_landmarks < 1:
        raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
    group = q_heads // kv_heads
    keep = np.ones((batch, kv_len), dtype=bool) if key_padding_mask is None else np.asarray(key_padding_mask, bool)
    y = np.zeros((batch, q_heads, q_len, v.shape[3]))
    q_count = min(num_landmarks, q_len)
    for b in range(batch):
        visible = np.flatnonzero(keep[b])
        k_count = min(num_landmarks, visible.size)
        if k_count == 0 or q_count == 0:
            continue
        for h in range(q_heads):
            keys, values = k[b, h // group, visible], v[b, h // group, visible]
            lk = landmarks(keys, k_count, landmarks_method, iterations)
            lq = landmarks(q[b, h], q_count, landmarks_method, iterations)
            f1 = softmax_rows(scale * q[b, h] @ lk.T)
            kernel = softmax_rows(scale * lq @ lk.T)
            f3v = softmax_rows(scale * lq @ keys.T) @ values
            x = solve_landmark_system(kernel, f3v, solver, newton_iterations=newton_iterations, ridge=ridge)
            y[b, h] = f1 @ x
    return y
