"""SparseAttention: schema, ONNX function (reference semantics) and numpy reference together.

The function is the dense masked form of the operator (the reference path that runs without the op
library): the pattern is built as a boolean [Sq, Skv] from integer index arithmetic, then ordinary
masked softmax attention runs over it.

    i' = i + (Skv - Sq) (query position, bottom-right aligned), o = j - i'
    window  = (wl < 0 or o >= -wl) and (wr < 0 or o <= wr) and o mod dilation == 0
    global  = j < num_global or 0 <= i' < num_global
    random  = i' >= 0 and j // bs in {random_key_block(seed, i' // bs, r, ceil(Skv / bs)) : r < R}
    visible = (window or global or random) and (not causal or o <= 0) and key_padding_mask[b, j]
    Y = softmax over visible j of (scale * q.k + attn_bias), rows with no visible key give 0.

BigBird random blocks (see `reference.random_key_block`): with M = 2^31 - 1 and A = 48271,
round(h, v) = A * ((((h + v) mod M)^2) mod M) mod M and the r-th random key block of query block qb
is round(round(seed mod M, qb + 1), r + 1) mod nkb. Every intermediate stays below 2^62, so the int64
ops of ONNX (Add, Mul, Mod — nothing newer than opset 13, no RandomUniform), numpy and the C++ kernel
compute it identically. The random blocks are a Loop over r (zero iterations when block_size or
num_random_blocks is 0).

GQA: Q [B, Hq, Sq, Dk] is viewed as [B, Hkv, G, Sq, Dk]; K and V get a unit axis so grouped heads
broadcast; logits go back to [B, Hq, Sq, Skv] so attn_bias broadcasts as the schema says.
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
from attnexport.ops.schema import DOMAIN, SPARSE_ATTENTION

SCHEMA = SPARSE_ATTENTION
reference = _reference.sparse_attention
pattern = _reference.sparse_pattern

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Variant:
    """What about one node shapes the function body: which optional inputs it passes, and its dtype.
    Every attribute is read at run time."""

    key_padding_mask: bool = False
    attn_bias: bool = False
    dtype: int | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Variant:
        for name in ("window_left", "window_right"):
            if int(values.get(name, -1)) < -1:
                raise UnsupportedError(f"SparseAttention {name}={values[name]}: must be >= -1 (-1 = unbounded)")
        if int(values.get("dilation", 1)) < 1:
            raise UnsupportedError(f"SparseAttention dilation={values['dilation']}: must be >= 1")
        for name in ("num_global", "block_size", "num_random_blocks", "seed"):
            if int(values.get(name, 0)) < 0:
                raise UnsupportedError(f"SparseAttention {name}={values[name]}: must be >= 0")
        dtype = values.get("dtype")
        if dtype is not None and dtype not in _FLOAT_TYPES:
            raise UnsupportedError(
                f"SparseAttention inputs of type {helper.tensor_dtype_to_string(dtype)}: "
                "float32, float16 or bfloat16 expected"
            )
        return cls(bool(values.get("key_padding_mask", False)), bool(values.get("attn_bias", False)), dtype)


def placeholders(variants: Iterable[Mapping[str, Any]]) -> dict[str, Placeholder]:
    """Optional inputs that nodes lacking them must be given so one function body serves them all:
    key_padding_mask (all keys visible) and attn_bias (a [1, 1] zero) when only some nodes pass one."""
    vs = [Variant.of(v) for v in variants]
    needed = {}
    if len({v.key_padding_mask for v in vs}) > 1:
        needed["key_padding_mask"] = Placeholder("true_mask", "K", (0, 2))
    if len({v.attn_bias for v in vs}) > 1:
        needed["attn_bias"] = Placeholder("zeros", "Q")
    return needed


def build_function(opset: int, variants: Iterable[Mapping[str, Any]], *, ml_opset: int = MIN_ML_OPSET
                   ) -> onnx.FunctionProto:
    """The generic `attnexport.SparseAttention` function for default-domain `opset`, covering the
    node configurations `variants` (see `Variant.of`; none means one default node). Every node must
    agree on which optional inputs it passes (`attach_functions` gives the others placeholders).
    Raises UnsupportedError for opset < 13, or nodes of several float types below opset 15."""
    vs = [Variant.of(v) for v in variants] or [Variant()]
    b = FunctionBuilder(opset, ml_opset=ml_opset)
    output_dtype = b.output_dtype(SCHEMA.name, [v.dtype for v in vs])
    for name in ("key_padding_mask", "attn_bias"):
        if len({getattr(v, name) for v in vs}) > 1:
            raise UnsupportedError(f"some SparseAttention nodes pass {name} and some do not; one function serves "
                                   "them all (attach_functions gives the others a placeholder)")
    has_mask, has_bias = vs[0].key_padding_mask, vs[0].attn_bias

    q = b.op("Cast", "Q", to=FLOAT)
    k = b.op("Cast", "K", to=FLOAT)
    v = b.op("Cast", "V", to=FLOAT)
    shape_q, shape_k, shape_v = b.op("Shape", "Q"), b.op("Shape", "K"), b.op("Shape", "V")
    batch, q_heads, q_len, head_dim = (b.dims(shape_q, i) for i in range(4))
    kv_heads, kv_len = b.dims(shape_k, 1), b.dims(shape_k, 2)
    value_dim = b.dims(shape_v, 3)
    group = b.op("Div", q_heads, kv_heads)
    q5 = b.op("Reshape", q, b.op("Concat", batch, kv_heads, group, q_len, head_dim, axis=0))  # [B,Hkv,G,Sq,Dk]
    k5 = b.unsqueeze(k, 2)  # [B,Hkv,1,Skv,Dk]
    v5 = b.unsqueeze(v, 2)  # [B,Hkv,1,Skv,Dv]

    scale_attr = b.attr_float("scale")
    default_scale = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=FLOAT)))
    scale = b.op("Where", b.op("IsNaN", scale_attr), default_scale, scale_attr)

    # -- the pattern, [Sq, Skv] bool, from int64 index arithmetic --------------------------------
    zero, one = b.const(0, INT64), b.const(1, INT64)
    sq, skv = b.dim(shape_q, 2), b.dim(shape_k, 2)
    pos = b.unsqueeze(b.op("Add", b.op("Range", zero, sq, one), b.op("Sub", skv, sq)), 1)  # i' [Sq,1]
    key = b.unsqueeze(b.op("Range", zero, skv, one), 0)  # j [1,Skv]
    offset = b.op("Sub", key, pos)  # [Sq,Skv]

    def unbounded_or(attribute: str, inside) -> str:
        limit = b.attr_int(attribute)
        return b.op("Or", b.op("Less", limit, zero), inside(limit))

    dilation = b.attr_int("dilation")
    window = b.op("Equal", b.op("Mod", offset, dilation), zero)
    window = b.op("And", window, unbounded_or("window_left",
                                              lambda w: b.op("GreaterOrEqual", offset, b.op("Neg", w))))
    window = b.op("And", window, unbounded_or("window_right", lambda w: b.op("LessOrEqual", offset, w)))
    num_global = b.attr_int("num_global")
    pos_valid = b.op("GreaterOrEqual", pos, zero)  # [Sq,1]
    global_rows = b.op("And", pos_valid, b.op("Less", pos, num_global))
    visible = b.op("Or", window, b.op("Or", b.op("Less", key, num_global), global_rows))

    # BigBird random blocks: a Loop over r < R (zero iterations when there are none).
    block_size, num_random = b.attr_int("block_size"), b.attr_int("num_random_blocks")
    active = b.op("And", b.op("Greater", block_size, zero), b.op("Greater", num_random, zero))
    trips = b.op("Where", active, num_random, zero)
    bs = b.op("Max", block_size, one)
    num_key_blocks = b.op("Max", b.op("Div", b.op("Add", skv, b.op("Sub", bs, one)), bs), one)
    query_block = b.op("Where", pos_valid, b.op("Div", b.op("Max", pos, zero), bs), zero)  # [Sq,1]
    key_block = b.op("Div", key, bs)  # [1,Skv]
    modulus = b.const(_reference.RANDOM_BLOCK_MODULUS, INT64)
    multiplier = b.const(_reference.RANDOM_BLOCK_MULTIPLIER, INT64)

    def hash_round(h: str, value: str) -> str:
        t = b.op("Mod", b.op("Add", h, value), modulus)
        return b.op("Mod", b.op("Mul", multiplier, b.op("Mod", b.op("Mul", t, t), modulus)), modulus)

    seeded = b.op("Mod", b.attr_int("seed"), modulus)
    per_block = hash_round(seeded, b.op("Add", query_block, one))  # [Sq,1]

    def random_step(r: str, seen: str) -> list[str]:
        chosen = b.op("Mod", hash_round(per_block, b.op("Add", r, one)), num_key_blocks)  # [Sq,1]
        return [b.op("Or", seen, b.op("And", pos_valid, b.op("Equal", key_block, chosen)))]

    (visible,) = b.loop(trips, [visible], random_step, [BOOL])
    in_causal = b.op("LessOrEqual", offset, zero)
    not_causal = b.op("Equal", b.attr_int("causal"), zero)
    visible = b.op("And", visible, b.op("Or", in_causal, not_causal))  # [Sq,Skv]
    if has_mask:
        mask = b.op("Reshape", b.op("Cast", "key_padding_mask", to=BOOL),
                    b.op("Concat", batch, b.ints(1, 1), kv_len, axis=0))  # [B,1,1,Skv]
        visible = b.op("And", visible, mask)  # [B,1,Sq,Skv]

    # -- masked softmax attention ---------------------------------------------------------------
    logits5 = b.op("Mul", b.op("MatMul", q5, b.op("Transpose", k5, perm=[0, 1, 2, 4, 3])), scale)
    logits = b.op("Reshape", logits5, b.op("Concat", batch, q_heads, q_len, kv_len, axis=0))  # [B,Hq,Sq,Skv]
    if has_bias:
        logits = b.op("Add", logits, b.op("Cast", "attn_bias", to=FLOAT))
    masked = b.op("Where", visible, logits, b.const(float("-inf")))
    row_max = b.reduce("ReduceMax", masked, [-1])
    row_max = b.op("Where", b.op("IsInf", row_max), b.const(0.0), row_max)
    weights = b.op("Exp", b.op("Sub", masked, row_max))
    total = b.reduce("ReduceSum", weights, [-1])
    weights5 = b.op("Reshape", weights, b.op("Concat", batch, kv_heads, group, q_len, kv_len, axis=0))
    total5 = b.op("Reshape", total, b.op("Concat", batch, kv_heads, group, q_len, b.ints(1), axis=0))
    y5 = b.op("Div", b.op("MatMul", weights5, v5), total5)
    y5 = b.op("Where", b.op("Greater", total5, b.const(0.0)), y5, b.const(0.0))  # no visible key
    y = b.op("Reshape", y5, b.op("Concat", batch, q_heads, q_len, value_dim, axis=0))
    y = b.cast_to_input_dtype(y, "Q", output_dtype)
    b.op("Identity", y, outputs=["Y"])

    defaults = [helper.make_attribute(a.name, a.default) for a in SCHEMA.attributes]
    return b.build(DOMAIN, SCHEMA.name, [i.name for i in SCHEMA.inputs], [o.name for o in SCHEMA.outputs],
                   defaults, doc=f"{SCHEMA.doc} Reference semantics (dense masked form); see "
                                 "attnexport.ops.sparse_attention.")
