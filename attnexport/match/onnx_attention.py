"""ONNX's standard `Attention` op (opset 23+) → AttentionSite.

4-D inputs [B, H, S, D] or 3-D [B, S, H·D] with q_num_heads/kv_num_heads; boolean or additive
`attn_mask`; `is_causal`. Exporters often expand grouped KV heads before the op (LLaMA at opset 23), so
K and V are traced upstream as for decomposed attention to recover the KV heads. What ORT's CPU kernel
computes is the reference: its `is_causal` is upper-left aligned (query i sees key j iff j <= i), which
is our bottom-right causal only when Sq == Skv, so a causal site is replaceable only when every probe
has Sq == Skv and there is no KV cache.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnexport.match import layout
from attnexport.match.constants import is_read
from attnexport.match.decomposed import site_name
from attnexport.match.masks import MaskProbe, classify
from attnexport.match.probing import ProbeRun
from attnexport.sites import (
    MASK_BIAS,
    MASK_CAUSAL,
    MASK_CAUSAL_KEY_PADDING,
    MASK_OTHER,
    MASK_WINDOW,
    AttentionSite,
    MaskInfo,
    Operand,
)

Q, K, V, ATTN_MASK, PAST_KEY, PAST_VALUE, NONPAD_KV_SEQLEN = range(7)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


class OnnxAttentionCandidate:
    source = "onnx.Attention"

    def __init__(self, node: ir.Node):
        self.node = node
        self.q_value = node.inputs[Q]
        self.k_chain = layout.upstream_chain(node.inputs[K])
        self.v_chain = layout.upstream_chain(node.inputs[V])
        self.mask = _input(node, ATTN_MASK)
        a = node.attributes
        self.is_causal = a.get_int("is_causal", 0) != 0
        self.scale_attr = a.get_float("scale", None) if "scale" in a else None
        self.softcap = a.get_float("softcap", 0.0) if "softcap" in a else 0.0
        self.q_num_heads = a.get_int("q_num_heads", 0) if "q_num_heads" in a else 0
        self.kv_num_heads = a.get_int("kv_num_heads", 0) if "kv_num_heads" in a else 0
        self._packed: bool | None = None
        # Opset 25: a sliding window in the standard (-1 = unbounded), relative to the absolute query
        # position, i.e. top-left aligned when there is no KV cache (like ORT's is_causal).
        self.left_window = a.get_int("left_window_size", -1) if "left_window_size" in a else -1
        self.right_window = a.get_int("right_window_size", -1) if "right_window_size" in a else -1

    @property
    def anchor(self) -> ir.Node:
        return self.node

    @property
    def packed(self) -> bool:
        if self._packed is not None:
            return self._packed
        shape = self.q_value.shape
        return shape is not None and len(shape) == 3

    def values_needed(self) -> list[str]:
        names = [self.q_value.name, self.node.outputs[0].name]
        names += [link.value.name for chain in (self.k_chain, self.v_chain) for link in chain]
        if self.mask is not None:
            names.append(self.mask.name)
        return names

    def mask_values(self) -> list[str]:
        return [self.mask.name, self.q_value.name, self.node.inputs[K].name] if self.mask is not None else []

    def unprobed_site(self, index: int) -> AttentionSite:
        n = self.node
        return AttentionSite(index=index, name=site_name([n]), source=self.source, q=Operand(n.inputs[Q].name),
                             k=Operand(n.inputs[K].name), v=Operand(n.inputs[V].name), output=n.outputs[0].name,
                             nodes=[n.name])

    def build_site(self, index: int, base: list[ProbeRun], padded: list[ProbeRun]) -> AttentionSite:
        site = self.unprobed_site(index)
        n = self.node
        reason = self.structural_problem()
        if reason:
            return _unresolved(site, reason)
        run = base[0].values
        q = run[self.q_value.name]
        self._packed = q.ndim == 3  # the probe knows, also when the graph carries no shapes
        if self._packed:
            return self._build_packed(site, base, padded)
        k_in, v_in = run[n.inputs[K].name], run[n.inputs[V].name]
        if q.ndim != 4 or k_in.ndim != 4:
            return _unresolved(site, f"Q is {q.ndim}-D and K {k_in.ndim}-D; expected 4-D or packed 3-D")
        batch, num_heads, q_len, head_dim = q.shape
        kv_len = k_in.shape[2]
        rtol = 1e-3 if q.dtype == np.float16 else 1e-5
        # The op groups KV heads itself when K has fewer heads than Q; an exporter may also have expanded
        # them before the op, which tracing K upstream undoes.
        operand_heads = k_in.shape[1]
        if operand_heads == 0 or num_heads % operand_heads:
            return _unresolved(site, f"{num_heads} query heads do not group over {operand_heads} kv heads")
        k = layout.resolve(self.k_chain, run, k_in, expected={"B": batch, "S": kv_len, "D": head_dim},
                           transposed=False, grouped=True, num_q_heads=operand_heads, rtol=rtol)
        v = layout.resolve(self.v_chain, run, v_in, expected={"B": batch, "S": kv_len, "D": None},
                           transposed=False, grouped=True, num_q_heads=operand_heads, rtol=rtol)
        if k is None or v is None or abs(k.alpha - 1) > 1e-3 or abs(v.alpha - 1) > 1e-3:
            return _unresolved(site, "could not trace K/V of the Attention op to [B, Hkv, S, D] tensors")
        if k.bhsd.shape[1] != v.bhsd.shape[1]:
            return _unresolved(site, "K and V have different numbers of heads")
        site.q = Operand(self.q_value.name)
        site.k = Operand(k.link.value.name, None if k.perm == (0, 1, 2, 3) else k.perm)
        site.v = Operand(v.link.value.name, None if v.perm == (0, 1, 2, 3) else v.perm)
        site.num_heads, site.num_kv_heads = num_heads, k.bhsd.shape[1]
        site.head_dim, site.v_head_dim = head_dim, v.bhsd.shape[-1]
        site.nodes = [n.name] + [node.name for r in (k, v) for node in r.link.nodes]
        return self._finish(site, base, padded, q.dtype)

    def _build_packed(self, site, base, padded) -> AttentionSite:
        n = self.node
        run = base[0].values
        q, k = run[self.q_value.name], run[n.inputs[K].name]
        v = run[n.inputs[V].name] if n.inputs[V].name in run else None
        if not self.q_num_heads or not self.kv_num_heads:
            return _unresolved(site, "3-D Attention without q_num_heads/kv_num_heads")
        site.q = Operand(self.q_value.name, packed_heads=self.q_num_heads)
        site.k = Operand(n.inputs[K].name, packed_heads=self.kv_num_heads)
        site.v = Operand(n.inputs[V].name, packed_heads=self.kv_num_heads)
        site.num_heads, site.num_kv_heads = self.q_num_heads, self.kv_num_heads
        site.head_dim = q.shape[-1] // self.q_num_heads
        site.v_head_dim = (v.shape[-1] if v is not None else k.shape[-1]) // self.kv_num_heads
        site.output_layout = "bsd"
        return self._finish(site, base, padded, q.dtype)

    def _finish(self, site, base, padded, dtype) -> AttentionSite:
        site.scale = float(np.float32(self.scale_attr if self.scale_attr is not None else 1.0 / math.sqrt(site.head_dim)))
        site.dtype = str(np.dtype(dtype))
        shapes = {id(r): self._logit_shape(r.values, site) for r in base + padded}
        site.probe_shape = shapes[id(base[0])][2:]
        base_probes = [MaskProbe(self._effective_mask(r.values, shapes[id(r)]), shapes[id(r)]) for r in base]
        padded_probes = [MaskProbe(self._effective_mask(r.values, shapes[id(r)]), shapes[id(r)], r.padded_input,
                                   r.feeds[r.padded_input]) for r in padded]
        site.mask = classify(base_probes, padded_probes, mask_name=self.mask.name if self.mask is not None else None,
                             long=self._long_mask(base[0]))
        if self.is_causal and any(s[2] != s[3] for s in (shapes[id(r)] for r in base)):
            return _unresolved(site, "is_causal with Sq != Skv: ORT aligns it top-left, which no attnexport op expresses")
        if self._windowed():
            if any(s[2] != s[3] for s in (shapes[id(r)] for r in base)):
                return _unresolved(site, "left/right_window_size with Sq != Skv: the window is top-left aligned, "
                                         "which no attnexport op expresses")
            site.mask = _with_window(site.mask, self.left_window, self.right_window)
        return site

    def _windowed(self) -> bool:
        return self.left_window >= 0 or self.right_window >= 0

    def _long_mask(self, run) -> np.ndarray | None:
        """attn_mask at the long probe length (match/probing.py) with is_causal and the window applied as
        on the short probes (Sq == Skv there)."""
        mask = run.long_masks.get(self.mask.name) if self.mask is not None else None
        if mask is None:
            return None
        shape = (1,) * (4 - np.ndim(mask)) + tuple(np.shape(mask))
        return self._effective_mask({self.mask.name: mask}, shape)

    def _logit_shape(self, values, site) -> tuple[int, int, int, int]:
        q = values[self.q_value.name]
        k = values[self.node.inputs[K].name]
        if self.packed:
            return (q.shape[0], site.num_heads, q.shape[1], k.shape[1])
        return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def _effective_mask(self, values, shape) -> np.ndarray | None:
        """attn_mask combined with ORT's is_causal and Attention-25's window, as one boolean or additive mask."""
        mask = values.get(self.mask.name) if self.mask is not None else None
        if not self.is_causal and not self._windowed():
            return mask
        _, _, q_len, kv_len = shape
        offset = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]  # ORT CPU: top-left aligned
        causal = offset <= 0 if self.is_causal else np.ones((q_len, kv_len), dtype=bool)
        if self.left_window >= 0:
            causal = causal & (offset >= -self.left_window)
        if self.right_window >= 0:
            causal = causal & (offset <= self.right_window)
        if mask is None:
            return np.broadcast_to(causal, shape)
        mask = np.broadcast_to(np.asarray(mask), shape)
        if mask.dtype == np.bool_:
            return mask & causal
        return np.where(causal, mask, -np.inf)

    def structural_problem(self) -> str | None:
        n = self.node
        if _input(n, PAST_KEY) is not None or _input(n, PAST_VALUE) is not None:
            return "the Attention op takes a KV cache (past_key/past_value); use a recurrent conversion"
        if _input(n, NONPAD_KV_SEQLEN) is not None:
            return "nonpad_kv_seqlen is not supported yet"
        if self.softcap:
            return f"softcap={self.softcap:g}: no attnexport op applies a logit softcap"
        for index in (1, 2):
            if index < len(n.outputs) and is_read(n.outputs[index]):
                return "the graph reads present_key/present_value of this Attention op"
        if len(n.outputs) > 3 and is_read(n.outputs[3]):
            return "the graph reads the op's qk_matmul_output"
        return None


def find_candidates(model: ir.Model) -> list[OnnxAttentionCandidate]:
    return [OnnxAttentionCandidate(node) for node in model.graph
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx")]


def _with_window(mask: MaskInfo, left: int, right: int) -> MaskInfo:
    """The site's mask narrowed by Attention-25's window attributes (-1 = unbounded): the short probes
    cannot show a window wider than themselves, the attributes say it exactly."""
    if mask.kind == MASK_OTHER:
        return mask

    def narrower(own, attribute):
        if attribute < 0:
            return own
        return attribute if own is None else min(own, attribute)

    mask.window_left = narrower(mask.window_left, left)
    mask.window_right = narrower(mask.window_right, right)
    mask.causal = mask.window_left is None and mask.window_right == 0
    if mask.kind == MASK_BIAS or (mask.window_left is None and mask.window_right is None):
        return mask
    padding = mask.key_padding_input is not None
    if mask.causal:
        mask.kind = MASK_CAUSAL_KEY_PADDING if padding else MASK_CAUSAL
    else:
        mask.kind = MASK_WINDOW
        mask.detail = "a sliding-window (banded) mask (Attention's left/right_window_size)"
    return mask


def _unresolved(site: AttentionSite, reason: str) -> AttentionSite:
    site.replaceable = False
    site.reason = reason
    return site
