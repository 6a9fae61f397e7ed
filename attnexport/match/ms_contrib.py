"""com.microsoft fused attention ops → AttentionSite.

These ops come from onnxruntime's transformer optimizer and from onnxscript's ORT fusions. Their mask
semantics are part of the op's definition, so the mask is read structurally (and evaluated on the probe
run where it is a tensor) instead of being rediscovered:

- `Attention`: Q, K, V from one packed projection `input @ weights + bias` (split by qkv_hidden_sizes);
  `mask_index` 1-D [B] = valid lengths (keys j < length[b]; the optimizer computes it from the attention
  mask assuming right padding), 2-D [B, total] = 0/1 flags; `unidirectional` = causal;
  `attention_bias` additive.
- `MultiHeadAttention`: 3-D query [B, S, H*D], key/value 3-D or 4-D [B, H, L, D], optional packed `bias`
  (added to Q, K, V inside the op), `key_padding_mask` [B] (lengths) or [B, total] (flags),
  `attention_bias`, `unidirectional`.

What we do not reproduce is left alone with the reason: KV caches (past/present), rotary inside the op,
3-D/4-D mask_index formats other than those above, packed QKV/KV layouts.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnexport.match.constants import is_read
from attnexport.match.decomposed import site_name
from attnexport.match.masks import MaskProbe, classify
from attnexport.match.probing import ProbeRun
from attnexport.sites import AttentionSite, MaskInfo, Operand, Projection

MS_DOMAIN = "com.microsoft"


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default) if name in node.attributes else default


def _float(node: ir.Node, name: str) -> float | None:
    return node.attributes.get_float(name, 0.0) if name in node.attributes else None


def _unresolved(site: AttentionSite, reason: str) -> AttentionSite:
    site.replaceable = False
    site.reason = reason
    return site


class _FusedCandidate:
    source = ""
    MASK = -1  # index of the key padding / mask_index input
    BIAS = -1  # index of attention_bias

    def __init__(self, node: ir.Node):
        self.node = node
        self.num_heads = _int(node, "num_heads", 0)
        self.unidirectional = _int(node, "unidirectional", 0) != 0
        self.scale_attr = _float(node, "scale")
        self.mask = _input(node, self.MASK)
        self.bias = _input(node, self.BIAS)

    @property
    def anchor(self) -> ir.Node:
        return self.node

    def mask_values(self) -> list[str]:
        return []

    def unprobed_site(self, index: int) -> AttentionSite:
        n = self.node
        first = n.inputs[0].name
        return AttentionSite(index=index, name=site_name([n]), source=self.source, q=Operand(first),
                             k=Operand(first), v=Operand(first), output=n.outputs[0].name, nodes=[n.name])

    def _mask_info(self, site: AttentionSite, base: list[ProbeRun], shapes) -> MaskInfo | str:
        """Causal (unidirectional) + key padding from the op's mask input + an additive bias."""
        key_padding_input = None
        kind = "flags"
        if self.mask is not None:
            values = base[0].values[self.mask.name]
            batch = shapes[0][0]
            if values.ndim == 1 and values.shape[0] == batch:
                kind = "end_positions"
            elif values.ndim == 2 and values.shape == (batch, shapes[0][3]):
                kind = "flags"
            else:
                return f"mask of shape {list(values.shape)} (only [B] lengths and [B, total] flags are read)"
            key_padding_input = self.mask.name
        bias_probes = []
        for run, shape in zip(base, shapes):
            bias = run.values.get(self.bias.name) if self.bias is not None else None
            if self.unidirectional:
                q_len, kv_len = shape[2], shape[3]
                causal = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)
                bias = np.where(causal, 0.0 if bias is None else np.broadcast_to(bias, shape), -np.inf)
            bias_probes.append(MaskProbe(bias, shape))
        info = classify(bias_probes, [], mask_name=self.bias.name if self.bias is not None else None)
        if info.kind == "other":
            return info.detail
        info.key_padding_input = key_padding_input
        info.key_padding_kind = kind
        if key_padding_input:
            info.kind = {"none": "key_padding", "causal": "causal+key_padding"}.get(info.kind, info.kind)
        return info

    def _finish(self, site: AttentionSite, base: list[ProbeRun], shapes, dtype) -> AttentionSite:
        site.scale = float(np.float32(self.scale_attr if self.scale_attr else 1.0 / math.sqrt(site.head_dim)))
        site.dtype = str(np.dtype(dtype))
        site.probe_shape = shapes[0][2:]
        info = self._mask_info(site, base, shapes)
        if isinstance(info, str):
            return _unresolved(site, info)
        site.mask = info
        return site


class MsAttentionCandidate(_FusedCandidate):
    """com.microsoft Attention: input, weights, bias, mask_index, past, attention_bias, past_sequence_length."""

    source = "com.microsoft.Attention"
    MASK = 3
    BIAS = 5

    def values_needed(self) -> list[str]:
        names = [self.node.inputs[0].name, self.node.outputs[0].name]
        names += [v.name for v in (self.mask, self.bias) if v is not None]
        return names

    def build_site(self, index: int, base: list[ProbeRun], padded: list[ProbeRun]) -> AttentionSite:
        n = self.node
        site = self.unprobed_site(index)
        if _input(n, 4) is not None:
            return _unresolved(site, "the Attention op takes a KV cache (past); use a recurrent conversion")
        if _int(n, "do_rotary", 0):
            return _unresolved(site, "rotary embedding inside the Attention op (do_rotary) is not reproduced")
        if len(n.outputs) > 1 and is_read(n.outputs[1]):
            return _unresolved(site, "the graph reads this Attention op's present output")
        weight = n.inputs[1]
        if weight.shape is None or len(weight.shape) != 2 or not all(isinstance(d, int) for d in weight.shape):
            return _unresolved(site, "packed QKV weights without a static 2-D shape")
        total = weight.shape[1]
        sizes = n.attributes.get_ints("qkv_hidden_sizes", None) if "qkv_hidden_sizes" in n.attributes else None
        sizes = tuple(int(x) for x in sizes) if sizes else (total // 3,) * 3
        heads = self.num_heads
        if not heads or sum(sizes) != total or any(s % heads for s in sizes) or sizes[0] != sizes[1]:
            return _unresolved(site, f"qkv sizes {list(sizes)} do not split into {heads} heads")
        bias = _input(n, 2)
        site.projection = Projection(n.inputs[0].name, weight.name, bias.name if bias is not None else None,
                                     sizes, heads)
        site.q = Operand(f"{site.name}:q", packed_heads=heads)
        site.k = Operand(f"{site.name}:k", packed_heads=heads)
        site.v = Operand(f"{site.name}:v", packed_heads=heads)
        site.num_heads = site.num_kv_heads = heads
        site.head_dim, site.v_head_dim = sizes[0] // heads, sizes[2] // heads
        site.output_layout = "bsd"
        x = base[0].values[n.inputs[0].name]
        shapes = [(r.values[n.inputs[0].name].shape[0], heads, r.values[n.inputs[0].name].shape[1],
                   r.values[n.inputs[0].name].shape[1]) for r in base]
        return self._finish(site, base, shapes, x.dtype)


class MsMultiHeadAttentionCandidate(_FusedCandidate):
    """com.microsoft MultiHeadAttention: query, key, value, bias, key_padding_mask, attention_bias,
    past_key, past_value, ..."""

    source = "com.microsoft.MultiHeadAttention"
    MASK = 4
    BIAS = 5

    def values_needed(self) -> list[str]:
        n = self.node
        names = [v.name for v in (_input(n, 0), _input(n, 1), _input(n, 2), self.mask, self.bias) if v is not None]
        return names + [n.outputs[0].name]

    def build_site(self, index: int, base: list[ProbeRun], padded: list[ProbeRun]) -> AttentionSite:
        n = self.node
        site = self.unprobed_site(index)
        if _input(n, 6) is not None or _input(n, 7) is not None:
            return _unresolved(site, "the MultiHeadAttention op takes a KV cache (past_key/past_value)")
        for i in (1, 2):
            if i < len(n.outputs) and is_read(n.outputs[i]):
                return _unresolved(site, "the graph reads this MultiHeadAttention op's present_key/present_value")
        key, value = _input(n, 1), _input(n, 2)
        if key is None or value is None:
            return _unresolved(site, "packed QKV in the query input is not supported")
        run = base[0].values
        q, k, v = run[n.inputs[0].name], run[key.name], run[value.name]
        heads = self.num_heads
        if q.ndim != 3 or k.ndim not in (3, 4) or v.ndim != k.ndim:
            return _unresolved(site, f"query {q.ndim}-D, key {k.ndim}-D: only 3-D query with 3-D or 4-D key/value")
        bias = _input(n, 3)
        hidden_q = q.shape[-1]
        hidden_k = k.shape[-1] if k.ndim == 3 else k.shape[1] * k.shape[3]
        hidden_v = v.shape[-1] if v.ndim == 3 else v.shape[1] * v.shape[3]
        if bias is not None and k.ndim == 4:
            return _unresolved(site, "bias with 4-D key/value")

        def operand(value_name, packed, start, size):
            if bias is None:
                return Operand(value_name, packed_heads=packed)
            return Operand(value_name, packed_heads=packed, bias=bias.name, bias_range=(start, start + size))

        site.q = operand(n.inputs[0].name, heads, 0, hidden_q)
        site.k = operand(key.name, heads if k.ndim == 3 else None, hidden_q, hidden_k)
        site.v = operand(value.name, heads if v.ndim == 3 else None, hidden_q + hidden_k, hidden_v)
        site.num_heads = site.num_kv_heads = heads
        site.head_dim = hidden_q // heads
        site.v_head_dim = hidden_v // heads
        site.output_layout = "bsd"
        shapes = []
        for r in base:
            qq, kk = r.values[n.inputs[0].name], r.values[key.name]
            shapes.append((qq.shape[0], heads, qq.shape[1], kk.shape[1] if kk.ndim == 3 else kk.shape[2]))
        return self._finish(site, base, shapes, q.dtype)


class MsGroupQueryAttentionCandidate(_FusedCandidate):
    """com.microsoft GroupQueryAttention: query, key, value, past_key, past_value, seqlens_k,
    total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias, head_sink.

    Always causal; seqlens_k[b] + 1 keys are real (right padding); local_window_size w lets a query see
    the w keys ending at itself (checked against ORT's CPU kernel). Without a KV cache only: with one,
    the op writes new keys at per-batch offsets of a shared buffer, which a plain replacement cannot
    reproduce (a recurrent conversion can)."""

    source = "com.microsoft.GroupQueryAttention"
    MASK = 5
    BIAS = 10

    def __init__(self, node: ir.Node):
        super().__init__(node)
        self.kv_num_heads = _int(node, "kv_num_heads", 0)
        self.local_window = _int(node, "local_window_size", -1)

    def values_needed(self) -> list[str]:
        n = self.node
        names = [v.name for v in (_input(n, 0), _input(n, 1), _input(n, 2), self.mask, self.bias) if v is not None]
        return names + [n.outputs[0].name]

    def structural_problem(self) -> str | None:
        n = self.node
        if _input(n, 3) is not None or _input(n, 4) is not None:
            return "the GroupQueryAttention op takes a KV cache (past_key/past_value); use a recurrent conversion"
        if _int(n, "do_rotary", 0):
            return "rotary embedding inside the GroupQueryAttention op (do_rotary) is not reproduced"
        if _float(n, "softcap"):
            return "softcap (tanh logit capping) is not reproduced by attnexport ops"
        if _int(n, "smooth_softmax", 0) or _input(n, 11) is not None:
            return "smooth softmax / attention sinks are not reproduced by attnexport ops"
        for i in range(1, len(n.outputs)):
            if is_read(n.outputs[i]):
                return "the graph reads this GroupQueryAttention op's present_key/present_value or qk output"
        if not self.num_heads or not self.kv_num_heads or self.num_heads % self.kv_num_heads:
            return f"num_heads={self.num_heads}, kv_num_heads={self.kv_num_heads}"
        return None

    def build_site(self, index: int, base: list[ProbeRun], padded: list[ProbeRun]) -> AttentionSite:
        n = self.node
        site = self.unprobed_site(index)
        problem = self.structural_problem()
        if problem:
            return _unresolved(site, problem)
        run = base[0].values
        query = run[n.inputs[0].name]
        heads, kv_heads = self.num_heads, self.kv_num_heads
        key, value = _input(n, 1), _input(n, 2)
        if key is None or value is None:  # packed QKV: [B, S, (H + 2 Hkv) * D]
            head_dim = query.shape[-1] // (heads + 2 * kv_heads)
            q_size, kv_size = heads * head_dim, kv_heads * head_dim
            packed = n.inputs[0].name
            site.q = Operand(packed, packed_heads=heads, part=(0, q_size))
            site.k = Operand(packed, packed_heads=kv_heads, part=(q_size, q_size + kv_size))
            site.v = Operand(packed, packed_heads=kv_heads, part=(q_size + kv_size, q_size + 2 * kv_size))
            kv_len_of = lambda r: r.values[packed].shape[1]  # noqa: E731
        else:
            head_dim = query.shape[-1] // heads
            site.q = Operand(n.inputs[0].name, packed_heads=heads)
            site.k = Operand(key.name, packed_heads=kv_heads)
            site.v = Operand(value.name, packed_heads=kv_heads)
            kv_len_of = lambda r: r.values[key.name].shape[1]  # noqa: E731
        site.num_heads, site.num_kv_heads = heads, kv_heads
        site.head_dim = site.v_head_dim = head_dim
        site.output_layout = "bsd"
        shapes = [(r.values[n.inputs[0].name].shape[0], heads, r.values[n.inputs[0].name].shape[1], kv_len_of(r))
                  for r in base]
        self.unidirectional = True
        site = self._finish(site, base, shapes, query.dtype)
        if not site.replaceable:
            return site
        if site.mask.key_padding_input is not None:
            site.mask.key_padding_offset = 1  # seqlens_k holds the valid length minus one
        if self.local_window > 0:
            site.mask.window_left, site.mask.window_right = self.local_window - 1, 0
            site.mask.causal = False
            site.mask.kind = "window"
            site.mask.detail = f"local_window_size={self.local_window}"
        return site

    def _mask_info(self, site, base, shapes):
        info = super()._mask_info(site, base, shapes)
        if isinstance(info, str) and self.mask is not None and "mask of shape" in info:
            return f"seqlens_k of shape {list(base[0].values[self.mask.name].shape)}"
        return info


def find_candidates(model: ir.Model) -> list[_FusedCandidate]:
    out = []
    for node in model.graph:
        if node.domain != MS_DOMAIN:
            continue
        if node.op_type == "Attention":
            out.append(MsAttentionCandidate(node))
        elif node.op_type == "MultiHeadAttention":
            out.append(MsMultiHeadAttentionCandidate(node))
        elif node.op_type == "GroupQueryAttention":
            out.append(MsGroupQueryAttentionCandidate(node))
    return out
