"""LseAttention: schema, ONNX function (reference semantics) and numpy reference together.

Heinsen, "Softmax Attention with Constant Cost per Token" (arXiv 2404.05843): the logit
l_ij = log Σ_d exp(q̃_id + k̃_jd) replaces the scaled dot product (q̃ = √scale·q, k̃ = √scale·k, the
split LinearAttention uses too), so that e^{l_ij} = exp(q̃_i)·exp(k̃_j) is linear attention with the
feature map exp, and the keys can be summarised in a state of fixed size per kv head:

    m_d = max_j k̃_jd,   z_d = Σ_j exp(k̃_jd - m_d),   S_d = Σ_j exp(k̃_jd - m_d) v_j     (d < Dk)

stored as present_state [B, Hkv, Dk, Dv + 2] = [S | z | m] in float32 (whatever Q's type: the sums
grow with the sequence and would overflow float16). A dimension with z_d = 0 holds no key (its m is
ignored), so zeros are the empty state. past_state broadcasts to that shape (a node without a state
that shares the function with one that has it is given a [1, 1] zero placeholder).

The function is the quadratic form, exact for inputs of any magnitude: l_ij by an online
log-sum-exp over the Dk key dimensions (a Loop, memory O(Sq Skv)), then per query row the largest
visible logit or past-state term R_i = max(max_j l_ij, max_d(q̃_id + m_d)) is subtracted:

    y_i = (Σ_j e^{l_ij - R_i} v_j + Σ_d e^{q̃_id + m_d - R_i} S_d) / (Σ_j e^{l_ij - R_i} + Σ_d e^{q̃_id + m_d - R_i} z_d)

(0 for a row that sees nothing). The denominator is >= 1 wherever a key is visible, so nothing
overflows or underflows that matters. present_state: the past state rescaled to the new maxima
m'_d = max(m_d, max over this call's unpadded keys of k̃_jd), plus those keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import reference as _reference
from attnexport.ops.function_builder import BOOL, FLOAT, INT64, MIN_ML_OPSET, FunctionBuilder, Placeholder
from attnexport.ops.schema import DOMAIN, LSE_ATTENTION

SCHEMA = LSE_ATTENTION
reference = _reference.lse_attention

STATE_EXTRA_COLUMNS = 2  # z and m after the Dv columns of S
_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


def state_shape(batch: int, kv_heads: int, head_dim: int, value_dim: int) -> tuple[int, int, int, int]:
    """Shape of LseAttention's state for these dimensions."""
    return (batch, kv_heads, head_dim, value_dim + STATE_EXTRA_COLUMNS)


@dataclass(frozen=True)
class Variant:
    """What about one node shapes the function body: which optional inputs it passes, Q's type."""

    key_padding_mask: bool = False
    past_state: bool = False
    dtype: int | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Variant:
        dtype = values.get("dtype")
        if dtype is not None and dtype not in _FLOAT_TYPES:
            raise UnsupportedError(
                f"LseAttention inputs of type {helper.tensor_dtype_to_string(dtype)}: float32, float16 or bfloat16 expected"
            )
        return cls(bool(values.get("key_padding_mask", False)), bool(values.get("past_state", False)), dtype)


def placeholders(variants: Iterable[Mapping[str, Any]]) -> dict[str, Placeholder]:
    """Optional inputs that nodes lacking them are given when others pass them (one body serves all):
    an all-true key_padding_mask, and a [1, 1] zero past_state (it broadcasts to the empty state)."""
    vs = [Variant.of(v) for v in variants]
    needed = {}
    if len({v.key_padding_mask for v in vs}) > 1:
        needed["key_padding_mask"] = Placeholder("true_mask", "K", (0, 2))
    if len({v.past_state for v in vs}) > 1:
        needed["past_state"] = Placeholder("zeros", "Q")
    return needed


def build_function(opset: int, variants: Iterable[Mapping[str, Any]], *, ml_opset: int = MIN_ML_OPSET
                   ) -> onnx.FunctionProto:
    """The generic `attnexport.LseAttention` function for default-domain `opset`, covering `variants`
    (see `Variant.of`; none means one default node). All nodes must agree on passing key_padding_mask
    and past_state (`attach_functions` gives the others placeholders). Raises UnsupportedError for
    opset < 13, float16/bfloat16 below opset 15 (no CastLike), or such a mix."""
    vs = [Variant.of(v) for v in variants] or [Variant()]
    b = FunctionBuilder(opset, ml_opset=ml_opset)
    if opset < 15:
        wide = sorted({_FLOAT_TYPES[v.dtype] for v in vs if v.dtype not in (None, TensorProto.FLOAT)})
        if wide:
            raise UnsupportedError(
                f"LseAttention on {', '.join(wide)} needs opset >= 15 for its ONNX function (the model has "
                f"opset {opset}); convert the model to float32 or to a newer opset"
            )
    for name in ("key_padding_mask", "past_state"):
        if len({getattr(v, name) for v in vs}) > 1:
            raise UnsupportedError(f"some LseAttention nodes pass {name} and some do not; one function serves "
                                   "them all (attach_functions gives the others a placeholder)")
    has_mask, has_state = vs[0].key_padding_mask, vs[0].past_state
    neg_inf = b.const(float("-inf"))
    zero = b.const(0.0)

    def finite_or_zero(x: str) -> str:  # -inf (nothing seen) -> 0
        return b.op("Where", b.op("IsInf", x, detect_positive=0), zero, x)

    # Shapes, float32 views, GQA as a 5-D view [B, Hkv, G, Sq, Dk].
    q, k, v = (b.op("Cast", name, to=FLOAT) for name in ("Q", "K", "V"))
    shape_q, shape_k, shape_v = b.op("Shape", "Q"), b.op("Shape", "K"), b.op("Shape", "V")
    batch, q_heads, q_len, head_dim = (b.dims(shape_q, i) for i in range(4))
    kv_heads, kv_len = b.dims(shape_k, 1), b.dims(shape_k, 2)
    value_dim = b.dims(shape_v, 3)
    group = b.op("Div", q_heads, kv_heads)

    scale_attr = b.attr_float("scale")
    default_scale = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=FLOAT)))
    root = b.op("Sqrt", b.op("Where", b.op("IsNaN", scale_attr), default_scale, scale_attr))
    qt5 = b.op("Mul", b.op("Reshape", q, b.op("Concat", batch, kv_heads, group, q_len, head_dim, axis=0)), root)
    kt = b.op("Mul", k, root)  # [B, Hkv, Skv, Dk]

    # Visibility [Sq, Skv] or [B, 1, 1, Sq, Skv]: causal (bottom-right) and key padding.
    rows = b.unsqueeze(b.op("Range", b.const(0, INT64), b.dim(shape_q, 2), b.const(1, INT64)), 1)
    cols = b.unsqueeze(b.op("Range", b.const(0, INT64), b.dim(shape_k, 2), b.const(1, INT64)), 0)
    in_causal_range = b.op("LessOrEqual", cols, b.op("Add", rows, b.op("Sub", kv_len, q_len)))
    visible = b.op("Or", in_causal_range, b.op("Equal", b.attr_int("causal"), b.const(0, INT64)))
    kept_keys = None
    if has_mask:
        flags = b.op("Cast", "key_padding_mask", to=BOOL)
        visible = b.op("And", visible, b.op("Reshape", flags, b.op("Concat", batch, b.ints(1, 1, 1), kv_len, axis=0)))
        kept_keys = b.op("Reshape", flags, b.op("Concat", batch, b.ints(1), kv_len, b.ints(1), axis=0))  # [B,1,Skv,1]

    # l_ij = LSE_d(q~_id + k~_jd): an online log-sum-exp over d, key dimensions first.
    q_f = b.unsqueeze(b.op("Transpose", qt5, perm=[4, 0, 1, 2, 3]), 5)  # [Dk, B, Hkv, G, Sq, 1]
    k_f = b.unsqueeze(b.op("Transpose", b.unsqueeze(kt, 2), perm=[4, 0, 1, 2, 3]), 4)  # [Dk, B, Hkv, 1, 1, Skv]

    def pair(d: str) -> str:
        return b.op("Add", b.op("Gather", q_f, d, axis=0), b.op("Gather", k_f, d, axis=0))

    first = pair(b.const(0, INT64))
    ones = b.op("ConstantOfShape", b.op("Shape", first), value=helper.make_tensor("one", FLOAT, [1], [1.0]))

    def step(i: str, peak: str, total: str) -> list[str]:
        term = pair(b.op("Add", i, b.const(1, INT64)))
        new_peak = b.op("Max", peak, term)
        rescaled = b.op("Mul", total, b.op("Exp", b.op("Sub", peak, new_peak)))
        return [new_peak, b.op("Add", rescaled, b.op("Exp", b.op("Sub", term, new_peak)))]

    peak, total = b.loop(b.op("Sub", b.dim(shape_q, 3), b.const(1, INT64)), [first, ones], step, [FLOAT, FLOAT])
    logits = b.op("Where", visible, b.op("Add", peak, b.op("Log", total)), neg_inf)  # [B, Hkv, G, Sq, Skv]

    # The past state [B, Hkv, Dk, Dv+2] -> S [B,Hkv,Dk,Dv], z and m [B,Hkv,Dk,1]; z = 0: empty.
    s_past, z_past, m_past = b.state_parts(has_state, batch, kv_heads, head_dim, value_dim)
    held = b.op("Greater", z_past, zero)
    s_past = b.op("Where", held, s_past, zero)
    z_past = b.op("Where", held, z_past, zero)
    m_past = b.op("Transpose", b.op("Where", held, m_past, neg_inf), perm=[0, 1, 3, 2])  # [B, Hkv, 1, Dk]

    # Readout, rows stabilised by their largest term.
    state_logits = b.op("Add", qt5, b.unsqueeze(m_past, 2))  # [B, Hkv, G, Sq, Dk]
    row_max = b.op("Max", b.reduce("ReduceMax", logits, [-1]), b.reduce("ReduceMax", state_logits, [-1]))
    row_max = finite_or_zero(row_max)
    weights = b.op("Exp", b.op("Sub", logits, row_max))
    past_weights = b.op("Exp", b.op("Sub", state_logits, row_max))
    numerator = b.op("Add", b.op("MatMul", weights, b.unsqueeze(v, 2)), b.op("MatMul", past_weights, b.unsqueeze(s_past, 2)))
    denominator = b.op("Add", b.reduce("ReduceSum", weights, [-1]), b.op("MatMul", past_weights, b.unsqueeze(z_past, 2)))
    y5 = b.op("Where", b.op("Greater", denominator, zero), b.op("Div", numerator, denominator), zero)
    y = b.op("Reshape", y5, b.op("Concat", batch, q_heads, q_len, value_dim, axis=0))
    y = b.cast_like(y, "Q") if opset >= 15 else b.op("Identity", y)
    b.op("Identity", y, outputs=["Y"])

    # present_state: the past rescaled to the new maxima, plus this call's unpadded keys.
    kept = kt if kept_keys is None else b.op("Where", kept_keys, kt, neg_inf)  # [B, Hkv, Skv, Dk]
    m_new = finite_or_zero(b.op("Max", m_past, b.reduce("ReduceMax", kept, [2])))  # [B, Hkv, 1, Dk]
    e = b.op("Exp", b.op("Sub", kept, m_new))
    factor = b.op("Transpose", b.op("Exp", b.op("Sub", m_past, m_new)), perm=[0, 1, 3, 2])  # [B, Hkv, Dk, 1]
    s_new = b.op("Add", b.op("Mul", s_past, factor), b.op("MatMul", b.op("Transpose", e, perm=[0, 1, 3, 2]), v))
    z_new = b.op("Add", b.op("Mul", z_past, factor),
                 b.op("Transpose", b.reduce("ReduceSum", e, [2]), perm=[0, 1, 3, 2]))
    b.op("Concat", s_new, z_new, b.op("Transpose", m_new, perm=[0, 1, 3, 2]), axis=3, outputs=["present_state"])

    defaults = [helper.make_attribute(a.name, a.default) for a in SCHEMA.attributes]
    return b.build(DOMAIN, SCHEMA.name, [i.name for i in SCHEMA.inputs], [o.name for o in SCHEMA.outputs],
                   defaults, doc=f"{SCHEMA.doc} Reference semantics (quadratic form); see attnexport.ops.lse_attention.")
