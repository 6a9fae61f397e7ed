"""An independent oracle for LseAttention: the equations of Heinsen, "Softmax Attention with Constant
Cost per Token" (arXiv 2404.05843), ported to numpy (float64) as the paper writes them.

For one head, with Q [n_q, d_K], K [n, d_K] and log V [n, d_V] (so V > 0):

    log S = LSE_{d_K}(Q + LSE_{n}(Kᵀ + log V))      [n_q, d_V]     (eq. 5)
    log Z = LSE_{d_K}(Q + LSE_{n}(Kᵀ))              [n_q, 1]
    Y     = exp(log S - log Z)                                        (eq. 2)

Causal: the sums over keys become log-cumulative-sums (eq. 6), the hidden states
H_S [n, d_K, d_V] and H_Z [n, d_K] (materialised, as the paper's code does). Sequential (chunked)
application carries the last hidden states (log S, log Z over the keys seen), starting from −∞
(the empty sum), and combines them with a chunk's states by log-add-exp.

Nothing here shares code with attnexport: it is the paper's formulation, not the operator's
stabilised one (per-dimension running maxima and matrix products). No scale: the caller passes
√scale·Q and √scale·K.
"""

from __future__ import annotations

import numpy as np


def _lse(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis)


def _log_cumsum_exp(x: np.ndarray, axis: int) -> np.ndarray:
    return np.logaddexp.accumulate(x, axis=axis)


class HeinsenAttention:
    """The paper's attention for one head, optionally carrying its hidden state across calls.

    `state` is (H_S [d_K, d_V], H_Z [d_K]): log S and log Z of the keys seen so far, −∞ when none.
    """

    def __init__(self, causal: bool):
        self.causal = causal
        self.state: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, q: np.ndarray, k: np.ndarray, log_v: np.ndarray, *, using_prev_context: bool = False
                 ) -> np.ndarray:
        q = np.asarray(q, np.float64)[:, :, None]  # [n_q, d_K, 1]
        k = np.asarray(k, np.float64)[:, :, None]  # [n, d_K, 1]
        log_v = np.asarray(log_v, np.float64)[:, None, :]  # [n, 1, d_V]
        if self.causal:
            h_s = _log_cumsum_exp(k + log_v, axis=0)  # [n, d_K, d_V]     eq. (6)
            h_z = _log_cumsum_exp(k, axis=0)  # [n, d_K, 1]
        else:
            h_s = _lse(k + log_v, axis=0, keepdims=True)  # [1, d_K, d_V]
            h_z = _lse(k, axis=0, keepdims=True)  # [1, d_K, 1]
        if using_prev_context and self.state is not None:
            h_s = np.logaddexp(self.state[0][None], h_s)
            h_z = np.logaddexp(self.state[1][None, :, None], h_z)
        self.state = (h_s[-1], h_z[-1, :, 0])
        log_s = _lse(q + h_s, axis=1)  # [n_q, d_V]                    eq. (5)
        log_z = _lse(q + h_z, axis=1)  # [n_q, 1]
        return np.exp(log_s - log_z)  # eq. (2)


def heinsen_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, scale: float = 1.0
                      ) -> np.ndarray:
    """[B, Hq, Sq, Dk] x [B, Hkv, S, Dk] x [B, Hkv, S, Dv] (V > 0) -> [B, Hq, Sq, Dv], head h reading kv
    head h // (Hq / Hkv); q̃ = √scale·q, k̃ = √scale·k. Causal needs Sq == S (the paper's setting)."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    if np.any(np.asarray(v) <= 0):
        raise ValueError("the paper's formulation takes log V: V must be positive")
    if causal and q_len != k.shape[2]:
        raise ValueError("the paper's causal form aligns query i with key i")
    root = np.sqrt(scale)
    out = np.empty((batch, q_heads, q_len, v.shape[-1]))
    for b in range(batch):
        for h in range(q_heads):
            g = h // (q_heads // kv_heads)
            out[b, h] = HeinsenAttention(causal)(root * q[b, h], root * k[b, g], np.log(v[b, g]))
    return out
