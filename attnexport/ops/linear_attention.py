"""LinearAttention: schema, ONNX function (reference semantics) and numpy reference together.

The function is the quadratic masked form of the operator (it is the reference path that runs
without the op library; the softmax it replaces was quadratic too):

    Q [B, Hq, Sq, Dk] is viewed as [B, Hkv, G, Sq, Dk] (G = Hq / Hkv); K and V get a unit axis,
    [B, Hkv, 1, Skv, D], so grouped KV heads broadcast and are never copied.
    visible [Sq, Skv] or [B, 1, 1, Sq, Skv]: causal (bottom-right) and key padding.
    weights A [B, Hkv, G, Sq, Skv] by feature map; den = sum_j A + eps (eps rescaled for favor).
    Y = A @ V / den, rows whose den is 0 give 0; computed in float32, returned in Q's dtype.

One generic function serves every node of a model (onnx.reference keys functions by domain and
name only, so overloads are not an option): attributes are read through attribute references and
string attributes select `If` branches; only the branches that the model's nodes use are built
(`build_function(opset, variants)`).

favor is stabilised exactly as the reference: log A_ij = logsumexp_f(log phi(q_i)_f + log phi(k_j)_f)
by an online log-sum-exp over the F features (a Loop, memory O(Sq Skv)), then each row is divided
by its largest visible weight and eps by the same factor.
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
from attnexport.ops.schema import DOMAIN, LINEAR_ATTENTION

SCHEMA = LINEAR_ATTENTION
reference = _reference.linear_attention

FEATURE_MAPS = SCHEMA.attribute("feature_map").choices
EXPANSION_POINTS = SCHEMA.attribute("expansion_point").choices
_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Variant:
    """What about one node shapes the function body: the string attributes (which branches) and
    which optional inputs it passes. Numeric attributes (scale, causal, eps) are read at run time."""

    feature_map: str = "elu1"
    expansion_point: str = "zero"
    key_padding_mask: bool = False
    projection: bool = False
    dtype: int | None = None  # TensorProto element type of Q, None when unknown
    past_state: bool = False  # the node passes past_state
    present_state: bool = False  # the node produces present_state

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Variant:
        """From a mapping with any of the keys feature_map, expansion_point (attribute values; absent
        means the schema default), key_padding_mask, projection (bool: the node passes the input),
        dtype (element type of Q). Other keys (scale, causal, eps, ...) are ignored."""
        feature_map = SCHEMA.attribute("feature_map").check(values.get("feature_map", "elu1"))
        expansion_point = SCHEMA.attribute("expansion_point").check(values.get("expansion_point", "zero"))
        if feature_map == "favor" and not values.get("projection", False):
            raise UnsupportedError("LinearAttention with feature_map 'favor' needs the projection input W [Dk, F]")
        dtype = values.get("dtype")
        if dtype is not None and dtype not in _FLOAT_TYPES:
            raise UnsupportedError(
                f"LinearAttention inputs of type {helper.tensor_dtype_to_string(dtype)}: "
                "float32, float16 or bfloat16 expected"
            )
        return cls(feature_map, expansion_point, bool(values.get("key_padding_mask", False)),
                   bool(values.get("projection", False)), dtype, bool(values.get("past_state", False)),
                   bool(values.get("present_state", False)))


def placeholders(variants: Iterable[Mapping[str, Any]]) -> dict[str, Placeholder]:
    """Optional inputs that nodes lacking them must be given so one function body serves them all:
    key_padding_mask (all keys visible) when only some nodes pass one; projection (zeros, ignored
    unless favor) when some node uses favor (the favor branch reads it). Raises UnsupportedError
    for an invalid configuration."""
    vs = [Variant.of(v) for v in variants]
    for v in vs:
        if v.past_state and v.feature_map == "taylor2" and v.expansion_point != "zero":
            raise UnsupportedError(f"LinearAttention taylor2 with expansion_point '{v.expansion_point}' cannot read a "
                                   "past_state (its expansion point needs every past logit); use 'zero'")
    needed = {}
    if len({v.key_padding_mask for v in vs}) > 1:
        needed["key_padding_mask"] = Placeholder("true_mask", "K", (0, 2))
    if any(v.feature_map == "favor" for v in vs) and not all(v.projection for v in vs):
        needed["projection"] = Placeholder("zeros", "Q")
    if len({v.past_state for v in vs}) > 1:  # a [1, 1] zero state broadcasts to the empty state
        needed["past_state"] = Placeholder("zeros", "Q")
    return needed


def build_function(opset: int, variants: Iterable[Mapping[str, Any]], *, ml_opset: int = MIN_ML_OPSET
                   ) -> onnx.FunctionProto:
    """The generic `attnexport.LinearAttention` function for default-domain `opset`, covering the
    node configurations `variants` (see `Variant.of`; no variants means one default node).

    Every node the function serves must agree on whether it passes key_padding_mask, and when some
    node uses favor every node must pass a projection (a branch reading an absent input makes the
    model invalid in ONNX Runtime even when the branch is not taken); `attach_functions` arranges both.
    `ml_opset` is the ai.onnx.ml version to import when string attributes need branching (the
    model's own, >= 2).
    Below opset 15 (no CastLike) the result is cast to the one dtype all nodes share; raises
    UnsupportedError for opset < 13 or nodes of several float types there.
    """
    vs = [Variant.of(v) for v in variants] or [Variant()]
    b = FunctionBuilder(opset, ml_opset=ml_opset)
    output_dtype = b.output_dtype(SCHEMA.name, [v.dtype for v in vs])
    if len({v.key_padding_mask for v in vs}) > 1:
        raise UnsupportedError(
            "some LinearAttention nodes pass key_padding_mask and some do not; one function serves them all "
            "(attach_functions gives the others an all-true mask)"
        )
    has_mask = vs[0].key_padding_mask
    if len({v.past_state for v in vs}) > 1:
        raise UnsupportedError("some LinearAttention nodes pass past_state and some do not; one function serves them "
                               "all (attach_functions gives the others a zero state)")
    has_state = vs[0].past_state
    want_present = any(v.present_state for v in vs)
    feature_maps = [f for f in FEATURE_MAPS if any(v.feature_map == f for v in vs)]
    if "favor" in feature_maps and not all(v.projection for v in vs):
        raise UnsupportedError(
            "a LinearAttention node without projection shares the function of a favor node; "
            "give it a placeholder projection (attach_functions does)"
        )
    expansion_points = [e for e in EXPANSION_POINTS
                        if any(v.feature_map == "taylor2" and v.expansion_point == e for v in vs)]

    # Shapes, float32 views, GQA as a 5-D view.
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

    # scale: NaN means 1/sqrt(Dk).
    scale_attr = b.attr_float("scale")
    default_scale = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=FLOAT)))
    scale = b.op("Where", b.op("IsNaN", scale_attr), default_scale, scale_attr)  # [1]
    root = b.op("Sqrt", scale)
    eps = b.attr_float("eps")

    # Visibility: j <= i + (Skv - Sq) when causal; key padding.
    rows = b.unsqueeze(b.op("Range", b.const(0, INT64), b.dim(shape_q, 2), b.const(1, INT64)), 1)  # [Sq,1]
    cols = b.unsqueeze(b.op("Range", b.const(0, INT64), b.dim(shape_k, 2), b.const(1, INT64)), 0)  # [1,Skv]
    in_causal_range = b.op("LessOrEqual", cols, b.op("Add", rows, b.op("Sub", kv_len, q_len)))
    not_causal = b.op("Equal", b.attr_int("causal"), b.const(0, INT64))
    visible = b.op("Or", in_causal_range, not_causal)  # [Sq, Skv]
    if has_mask:
        mask = b.op("Reshape", b.op("Cast", "key_padding_mask", to=BOOL),
                    b.op("Concat", batch, b.ints(1, 1, 1), kv_len, axis=0))  # [B,1,1,1,Skv]
        visible = b.op("And", visible, mask)  # [B,1,1,Sq,Skv]

    def k_transposed(x: str) -> str:
        return b.op("Transpose", x, perm=[0, 1, 2, 4, 3])

    def finish(weights: str, eps_row: str, past: tuple[str, str, str] | None = None) -> list[str]:
        """[numerator, denominator]; `past` = (weights of the state's features [B,Hkv,G,Sq,F], S, z)."""
        masked = b.op("Where", visible, weights, b.const(0.0))
        numerator = b.op("MatMul", masked, v5)
        den = b.op("Add", b.reduce("ReduceSum", masked, [-1]), eps_row)
        if past is not None:
            past_weights, s_past, z_past = past
            numerator = b.op("Add", numerator, b.op("MatMul", past_weights, b.unsqueeze(s_past, 2)))
            den = b.op("Add", den, b.op("MatMul", past_weights, b.unsqueeze(z_past, 2)))
        return [numerator, den]

    def read_state(num_features: str, favor: bool = False) -> tuple[str, str, str]:
        """past_state as S [B,Hkv,F,Dv], z [B,Hkv,F,1], m [B,Hkv,F,1] (favor: -inf where z = 0; else 0);
        zeros without a past state."""
        s_past, z_past, m_past = b.state_parts(has_state, batch, kv_heads, num_features, value_dim)
        if not favor:
            return s_past, z_past, b.op("Mul", z_past, b.const(0.0))  # m is 0 for these feature maps
        held = b.op("Greater", z_past, b.const(0.0))
        return (b.op("Where", held, s_past, b.const(0.0)), b.op("Where", held, z_past, b.const(0.0)),
                b.op("Where", held, m_past, b.const(float("-inf"))))

    def taylor_features(x: str) -> str:
        """[1, x, the upper triangle of x xᵀ row by row with the diagonal / √2] along the last axis
        (the CPU kernel's order, so states are interchangeable)."""
        shape = b.op("Shape", x)
        lead = b.op("Slice", shape, b.ints(0), b.ints(-1))
        dim = b.op("Slice", shape, b.ints(-1), b.ints(2**62))
        idx = b.op("Range", b.const(0, INT64), b.op("Squeeze", dim), b.const(1, INT64))
        rows_d, cols_d = b.unsqueeze(idx, 1), b.unsqueeze(idx, 0)
        outer = b.op("Mul", b.unsqueeze(x, -1), b.unsqueeze(x, -2))
        outer = b.op("Where", b.op("Equal", rows_d, cols_d), b.op("Mul", outer, b.const(0.5 ** 0.5)), outer)
        flat = b.op("Reshape", outer, b.op("Concat", lead, b.ints(-1), axis=0))
        upper = b.op("Reshape", b.op("GreaterOrEqual", cols_d, rows_d), b.ints(-1))
        quad = b.op("Compress", flat, upper, axis=-1)
        ones = b.op("ConstantOfShape", b.op("Concat", lead, b.ints(1), axis=0),
                    value=helper.make_tensor("one", FLOAT, [1], [1.0]))
        return b.op("Concat", ones, x, quad, axis=-1)

    def taylor_count() -> str:  # F = 1 + D + D(D+1)/2, 1-D
        return b.op("Add", b.op("Add", b.ints(1), head_dim),
                    b.op("Div", b.op("Mul", head_dim, b.op("Add", head_dim, b.ints(1))), b.ints(2)))

    def dot_features(phi_name: str):
        def branch() -> list[str]:
            if phi_name == "relu":
                phi_q, phi_k = b.op("Relu", b.op("Mul", q5, root)), b.op("Relu", b.op("Mul", k5, root))
            else:
                phi_q, phi_k = elu1(b.op("Mul", q5, root)), elu1(b.op("Mul", k5, root))
            past = None
            if has_state:
                s_past, z_past, _ = read_state(head_dim)
                past = (phi_q, s_past, z_past)
            return finish(b.op("MatMul", phi_q, k_transposed(phi_k)), eps, past)
        return branch

    def elu1(x: str) -> str:
        # elu(x) + 1 written as the reference does: exp(x) for x <= 0 stays exact for very negative x.
        return b.op("Where", b.op("Greater", x, b.const(0.0)), b.op("Add", x, b.const(1.0)),
                    b.op("Exp", b.op("Min", x, b.const(0.0))))

    def taylor2() -> list[str]:
        logits = b.op("Mul", b.op("MatMul", q5, k_transposed(k5)), scale)  # [B,Hkv,G,Sq,Skv]
        count = b.reduce("ReduceSum", b.op("Cast", visible, to=FLOAT), [-1])
        seen = b.op("Greater", count, b.const(0.0))

        def center_zero() -> list[str]:
            return [logits]

        def center_mean() -> list[str]:
            total = b.reduce("ReduceSum", b.op("Where", visible, logits, b.const(0.0)), [-1])
            mean = b.op("Div", total, b.op("Max", count, b.const(1.0)))
            return [b.op("Sub", logits, b.op("Where", seen, mean, b.const(0.0)))]

        def center_max() -> list[str]:
            peak = b.reduce("ReduceMax", b.op("Where", visible, logits, b.const(float("-inf"))), [-1])
            return [b.op("Sub", logits, b.op("Where", seen, peak, b.const(0.0)))]

        centers = {"zero": center_zero, "mean": center_mean, "max": center_max}
        (shifted,) = b.string_switch("expansion_point", {e: centers[e] for e in expansion_points}, [FLOAT])
        weights = b.op("Add", b.op("Add", b.const(1.0), shifted),
                       b.op("Mul", b.const(0.5), b.op("Mul", shifted, shifted)))
        past = None
        if has_state:  # expansion point zero (nodes with another point never read a real state)
            s_past, z_past, _ = read_state(taylor_count())
            past = (taylor_features(b.op("Mul", q5, root)), s_past, z_past)
        return finish(weights, eps, past)

    def favor() -> list[str]:
        w = b.op("Cast", "projection", to=FLOAT)  # [Dk, F]
        num_features = b.dim(b.op("Shape", w), 1)
        # log phi(x)_f = x.w_f - |x|^2/2 - log(F)/2; the |q|^2 and log F terms are the same along a row,
        # so they are left out of the weights and only rescale eps (less float32 round-off).
        qt, kt = b.op("Mul", q5, root), b.op("Mul", k5, root)
        uq = b.op("MatMul", qt, w)  # [B,Hkv,G,Sq,F]
        k_norm = b.op("Mul", b.const(0.5), b.reduce("ReduceSum", b.op("Mul", kt, kt), [-1]))  # [B,Hkv,1,Skv,1]
        uk = b.op("Sub", b.op("MatMul", kt, w), k_norm)  # [B,Hkv,1,Skv,F]
        # Features first: [F,B,Hkv,G,Sq,1] and [F,B,Hkv,1,1,Skv].
        uq_f = b.unsqueeze(b.op("Transpose", uq, perm=[4, 0, 1, 2, 3]), 5)
        uk_f = b.unsqueeze(b.op("Transpose", uk, perm=[4, 0, 1, 2, 3]), 4)

        def pair(f: str) -> str:  # [B,Hkv,G,Sq,Skv]: uq_if + uk_jf
            return b.op("Add", b.op("Gather", uq_f, f, axis=0), b.op("Gather", uk_f, f, axis=0))

        first = pair(b.const(0, INT64))
        ones = b.op("ConstantOfShape", b.op("Shape", first), value=helper.make_tensor("one", FLOAT, [1], [1.0]))

        def step(i: str, peak: str, total: str) -> list[str]:  # online log-sum-exp over features 1..F-1
            term = pair(b.op("Add", i, b.const(1, INT64)))
            new_peak = b.op("Max", peak, term)
            rescaled = b.op("Mul", total, b.op("Exp", b.op("Sub", peak, new_peak)))
            return [new_peak, b.op("Add", rescaled, b.op("Exp", b.op("Sub", term, new_peak)))]

        peak, total = b.loop(b.op("Sub", num_features, b.const(1, INT64)), [first, ones], step, [FLOAT, FLOAT])
        log_weights = b.op("Where", visible, b.op("Add", peak, b.op("Log", total)), b.const(float("-inf")))
        row_max = b.reduce("ReduceMax", log_weights, [-1])
        log_f = b.op("Log", b.op("Cast", num_features, to=FLOAT))
        past = None
        if has_state:
            # The state's feature f for row i, in the same frame as log_weights (which leave out the row's
            # -|q|^2/2 - log F): log phi(q~)_f + m_f + |q|^2/2 + log F = uq_f + m_f + log(F)/2.
            s_past, z_past, m_past = read_state(b.op("Reshape", num_features, b.ints(1)), favor=True)
            m_row = b.unsqueeze(b.op("Transpose", m_past, perm=[0, 1, 3, 2]), 2)  # [B,Hkv,1,1,F]
            state_logits = b.op("Add", b.op("Add", uq, m_row), b.op("Mul", log_f, b.const(0.5)))
            row_max = b.op("Max", row_max, b.reduce("ReduceMax", state_logits, [-1]))
        row_max = b.op("Where", b.op("IsInf", row_max), b.const(0.0), row_max)
        weights = b.op("Exp", b.op("Sub", log_weights, row_max))
        if has_state:
            past = (b.op("Exp", b.op("Sub", state_logits, row_max)), s_past, z_past)
        # eps / exp(row max of the full log weights) = exp(log eps - row_max + |q|^2/2 + log F)
        q_norm = b.op("Mul", b.const(0.5), b.reduce("ReduceSum", b.op("Mul", qt, qt), [-1]))  # [B,Hkv,G,Sq,1]
        log_eps_row = b.op("Add", b.op("Sub", b.op("Log", eps), row_max), b.op("Add", q_norm, log_f))
        return finish(weights, b.op("Exp", log_eps_row), past)

    branches = {"elu1": dot_features("elu1"), "relu": dot_features("relu"), "taylor2": taylor2, "favor": favor}
    numerator, den = b.string_switch("feature_map", {f: branches[f] for f in feature_maps}, [FLOAT, FLOAT])

    y5 = b.op("Div", numerator, den)
    y5 = b.op("Where", b.op("Greater", den, b.const(0.0)), y5, b.const(0.0))  # no visible key (and eps 0)
    y = b.op("Reshape", y5, b.op("Concat", batch, q_heads, q_len, value_dim, axis=0))
    y = b.cast_to_input_dtype(y, "Q", output_dtype)
    b.op("Identity", y, outputs=["Y"])
    outputs = ["Y"]

    if want_present:
        # present_state: the past plus every key the padding mask keeps, per feature.
        kt4 = b.op("Mul", k, root)  # [B,Hkv,Skv,Dk]
        keep = None
        if has_mask:
            keep = b.op("Reshape", b.op("Cast", "key_padding_mask", to=BOOL),
                        b.op("Concat", batch, b.ints(1), kv_len, b.ints(1), axis=0))  # [B,1,Skv,1]

        def plain(features: str, num_features: str) -> list[str]:
            s_past, z_past, m_past = read_state(num_features)
            e = features if keep is None else b.op("Where", keep, features, b.const(0.0))
            s_new = b.op("Add", s_past, b.op("MatMul", b.op("Transpose", e, perm=[0, 1, 3, 2]), v))
            z_new = b.op("Add", z_past, b.op("Transpose", b.reduce("ReduceSum", e, [2]), perm=[0, 1, 3, 2]))
            return [b.op("Concat", s_new, z_new, m_past, axis=3)]

        def present_dot(phi_name: str):
            return lambda: plain(b.op("Relu", kt4) if phi_name == "relu" else elu1(kt4), head_dim)

        def present_taylor() -> list[str]:
            return plain(taylor_features(kt4), taylor_count())

        def present_favor() -> list[str]:
            w = b.op("Cast", "projection", to=FLOAT)
            num_features = b.dim(b.op("Shape", w), 1)
            log_f = b.op("Log", b.op("Cast", num_features, to=FLOAT))
            k_norm = b.op("Mul", b.const(0.5), b.reduce("ReduceSum", b.op("Mul", kt4, kt4), [-1]))
            log_k = b.op("Sub", b.op("Sub", b.op("MatMul", kt4, w), k_norm), b.op("Mul", log_f, b.const(0.5)))
            if keep is not None:
                log_k = b.op("Where", keep, log_k, b.const(float("-inf")))
            s_past, z_past, m_past = read_state(b.op("Reshape", num_features, b.ints(1)), favor=True)
            m_row = b.op("Transpose", m_past, perm=[0, 1, 3, 2])  # [B,Hkv,1,F]
            m_new = b.op("Max", m_row, b.reduce("ReduceMax", log_k, [2]))
            m_new = b.op("Where", b.op("IsInf", m_new), b.const(0.0), m_new)
            e = b.op("Exp", b.op("Sub", log_k, m_new))
            factor = b.op("Transpose", b.op("Exp", b.op("Sub", m_row, m_new)), perm=[0, 1, 3, 2])
            s_new = b.op("Add", b.op("Mul", s_past, factor), b.op("MatMul", b.op("Transpose", e, perm=[0, 1, 3, 2]), v))
            z_new = b.op("Add", b.op("Mul", z_past, factor),
                         b.op("Transpose", b.reduce("ReduceSum", e, [2]), perm=[0, 1, 3, 2]))
            return [b.op("Concat", s_new, z_new, b.op("Transpose", m_new, perm=[0, 1, 3, 2]), axis=3)]

        present_branches = {"elu1": present_dot("elu1"), "relu": present_dot("relu"), "taylor2": present_taylor,
                            "favor": present_favor}
        (state,) = b.string_switch("feature_map", {f: present_branches[f] for f in feature_maps}, [FLOAT])
        b.op("Identity", state, outputs=["present_state"])  # float32 whatever Q's type (see SCHEMA)
        outputs.append("present_state")

    defaults = [helper.make_attribute(a.name, a.default) for a in SCHEMA.attributes]
    return b.build(DOMAIN, SCHEMA.name, [i.name for i in SCHEMA.inputs], outputs,
                   defaults, doc=f"{SCHEMA.doc} Reference semantics (quadratic form); see attnexport.ops.linear_attention.")
