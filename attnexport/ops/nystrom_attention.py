"""NystromAttention: schema, ONNX function (reference semantics) and numpy reference together.

Nyströmformer (Xiong et al., 2021) approximates softmax attention through m landmarks. Per (batch b,
query head h, kv head h // (Hq/Hkv)), with the n_v visible keys of batch row b in order:

    m_k = min(m, n_v) key landmarks L_k, m_q = min(m, Sq) query landmarks L_q; rows of a segment:
        row r of n is in segment c = ((r + 1)·count − 1) // n, i.e. floor(c·n/count) <= r < floor((c+1)·n/count)
    segment_means: L[c] = mean of segment c
    kmeans: `iterations` Lloyd steps from the rows floor(c·n/count); nearest centre by |μ|² − 2 x·μ,
        ties to the lowest index; an empty cluster keeps its centre
    F1 = softmax(s·Q L_kᵀ) [Sq, m_k],  M = softmax(s·L_q L_kᵀ) [m_q, m_k],  F3 = softmax(s·L_q K_visᵀ) [m_q, n_v]
    Y  = F1 · X, X from the landmark system M X ≈ F3 V:
        sketch, direct:  X = argmin |M X − F3 V|² + ridge·|X|²   (ridge > 0: M's rows sum to 1, |M| >= 1)
        newton_schulz:   X = Z_T F3 V, Z₀ = Mᵀ / (|M|₁ |M|∞), Z ← ¼ Z (13I − MZ (15I − MZ (7I − MZ))), T steps
    a batch row with no visible key gives Y = 0. Causal is refused: a landmark averages future tokens.

With m >= n_v every visible key is its own key landmark, so M = F3 and Y is exact softmax attention
(up to the ridge: use a tiny ridge for the exact limit). Why a ridge and not M's pseudo-inverse: the
landmark kernel of real queries and keys is ill-conditioned (condition 1e8 and worse, see
benchmarks/bench_solver.py), and the unregularised least-squares X blows up the output
(3x-200x relative error in our measurements, against 0.4x-1x regularised); Nyströmformer's 6
Newton–Schulz steps are an implicit regulariser of the same kind.

The solvers are three numerical methods: sketch solves the stacked tall system [M; √ridge·I] X ≈ [F3 V; 0]
by the sketch-preconditioned LSQR of attnexport.linalg (Song, Yin, Zhang, arXiv 2308.14304); direct
factors the normal equations MᵀM + ridge·I by Cholesky (squares the condition); newton_schulz is
Nyströmformer's. The kernel runs them in float64 on float32 landmarks, like this function.

The function computes the same quantities in dense masked form, landmarks padded to
P = min(m, max(Sq, Skv)) (padding landmarks: zero rows of M and F3, zero columns of F1 and M, so the
system decouples): segment membership from int64 index arithmetic (CumSum ranks the visible keys),
k-means as a Loop, and for sketch and direct the regularised least-squares solution by a Householder
QR of the stacked system (a Loop over columns, float64), R⁻¹ by back substitution (a Loop), and two
steps of iterative refinement — the sketch method with the sketch of a 2P x P system being the
identity, which is what the kernel's sketch solver does too at these sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import nystrom_reference as _reference
from attnexport.ops.function_builder import BOOL, FLOAT, INT64, MIN_ML_OPSET, FunctionBuilder, Placeholder
from attnexport.ops.schema import DOMAIN, NYSTROM_ATTENTION

SCHEMA = NYSTROM_ATTENTION
reference = _reference.nystrom_attention

DOUBLE = TensorProto.DOUBLE
LANDMARK_METHODS = _reference.LANDMARK_METHODS
SOLVERS = _reference.SOLVERS
REFINEMENT_STEPS = 2
_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Variant:
    """What about one node shapes the function body: key_padding_mask, the string attributes (which
    branches are built), Q's type. Numeric attributes are read at run time."""

    key_padding_mask: bool = False
    landmarks: str = "segment_means"
    solver: str = "sketch"
    dtype: int | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Variant:
        attrs = SCHEMA.complete_attributes(**{k: v for k, v in values.items()
                                              if k in {a.name for a in SCHEMA.attributes} and k != "causal"})
        if int(values.get("causal", 0)) != 0:
            raise UnsupportedError("NystromAttention causal=1: refused, a landmark averages future tokens "
                                   "(use sparse, linear or lse for causal attention)")
        if attrs["num_landmarks"] < 1:
            raise UnsupportedError(f"NystromAttention num_landmarks={attrs['num_landmarks']}: must be >= 1")
        for name in ("iterations", "newton_iterations"):
            if attrs[name] < 0:
                raise UnsupportedError(f"NystromAttention {name}={attrs[name]}: must be >= 0")
        if attrs["solver"] != "newton_schulz" and not attrs["ridge"] > 0:
            raise UnsupportedError(f"NystromAttention ridge={attrs['ridge']}: solver {attrs['solver']} needs ridge > 0")
        dtype = values.get("dtype")
        if dtype is not None and dtype not in _FLOAT_TYPES:
            raise UnsupportedError(f"NystromAttention inputs of type {helper.tensor_dtype_to_string(dtype)}: "
                                   "float32, float16 or bfloat16 expected")
        return cls(bool(values.get("key_padding_mask", False)), attrs["landmarks"], attrs["solver"], dtype)


def placeholders(variants: Iterable[Mapping[str, Any]]) -> dict[str, Placeholder]:
    """An all-true key_padding_mask for nodes without one when others pass one (one body serves all)."""
    vs = [Variant.of(v) for v in variants]
    return {"key_padding_mask": Placeholder("true_mask", "K", (0, 2))} if len({v.key_padding_mask for v in vs}) > 1 else {}


def build_function(opset: int, variants: Iterable[Mapping[str, Any]], *, ml_opset: int = MIN_ML_OPSET
                   ) -> onnx.FunctionProto:
    """The generic `attnexport.NystromAttention` function for default-domain `opset`, covering the
    node configurations `variants` (see `Variant.of`; none means one default node)."""
    vs = [Variant.of(v) for v in variants] or [Variant()]
    b = FunctionBuilder(opset, ml_opset=ml_opset)
    output_dtype = b.output_dtype(SCHEMA.name, [v.dtype for v in vs])
    if len({v.key_padding_mask for v in vs}) > 1:
        raise UnsupportedError("some NystromAttention nodes pass key_padding_mask and some do not; one function "
                               "serves them all (attach_functions gives the others an all-true mask)")
    has_mask = vs[0].key_padding_mask
    methods = [m for m in LANDMARK_METHODS if any(v.landmarks == m for v in vs)]
    solvers = [s for s in SOLVERS if any(v.solver == s for v in vs)]

    zero_i, one_i = b.const(0, INT64), b.const(1, INT64)
    neg_inf, zero_f = b.const(float("-inf")), b.const(0.0)

    # Shapes; K and V repeated to the query heads (GQA), everything per [B, Hq].
    q = b.op("Cast", "Q", to=FLOAT)
    shape_q, shape_k, shape_v = b.op("Shape", "Q"), b.op("Shape", "K"), b.op("Shape", "V")
    batch, q_heads, q_len, head_dim = (b.dims(shape_q, i) for i in range(4))
    kv_heads, kv_len = b.dims(shape_k, 1), b.dims(shape_k, 2)
    value_dim = b.dims(shape_v, 3)
    group = b.op("Div", q_heads, kv_heads)

    def per_query_head(name: str, last: str) -> str:
        x5 = b.unsqueeze(b.op("Cast", name, to=FLOAT), 2)  # [B, Hkv, 1, Skv, D]
        x5 = b.op("Expand", x5, b.op("Concat", batch, kv_heads, group, kv_len, last, axis=0))
        return b.op("Reshape", x5, b.op("Concat", batch, q_heads, kv_len, last, axis=0))

    k = per_query_head("K", head_dim)  # [B, Hq, Skv, Dk]
    v = per_query_head("V", value_dim)  # [B, Hq, Skv, Dv]
    scale_attr = b.attr_float("scale")
    default_scale = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=FLOAT)))
    scale = b.op("Where", b.op("IsNaN", scale_attr), default_scale, scale_attr)

    # -- landmark membership, int64 index arithmetic --------------------------------------------
    sq, skv = b.dim(shape_q, 2), b.dim(shape_k, 2)
    m_attr = b.attr_int("num_landmarks")
    padded = b.op("Min", m_attr, b.op("Max", sq, skv))  # P
    landmark = b.op("Range", zero_i, padded, one_i)  # c [P]
    if has_mask:
        visible = b.op("Cast", "key_padding_mask", to=BOOL)  # [B, Skv]
    else:
        visible = b.unsqueeze(b.op("GreaterOrEqual", b.op("Range", zero_i, skv, one_i), zero_i), 0)  # [1, Skv]
    visible_i = b.op("Cast", visible, to=INT64)
    n_visible = b.reduce("ReduceSum", visible_i, [-1])  # [B', 1]
    rank = b.op("Sub", b.op("CumSum", visible_i, one_i), one_i)  # [B', Skv]
    k_count = b.op("Min", m_attr, n_visible)  # m_k [B', 1]
    q_count = b.op("Min", m_attr, sq)  # m_q (scalar)

    def segment(rank_: str, count: str, n: str) -> str:  # ((r + 1)·count − 1) // n
        return b.op("Div", b.op("Sub", b.op("Mul", b.op("Add", rank_, one_i), count), one_i), b.op("Max", n, one_i))

    col = b.unsqueeze(landmark, 1)  # [P, 1]
    key_member = b.op("And", b.op("Equal", b.unsqueeze(segment(rank, k_count, n_visible), 1), col),
                      b.unsqueeze(visible, 1))  # [B', P, Skv]
    query_pos = b.op("Range", zero_i, sq, one_i)
    query_member = b.op("Equal", b.unsqueeze(segment(query_pos, q_count, sq), 0), col)  # [P, Sq]
    key_valid = b.op("Less", b.unsqueeze(landmark, 0), k_count)  # [B', P]
    query_valid = b.op("Less", landmark, q_count)  # [P]

    def means(member: str, points: str) -> str:  # member [.., P, n] bool, points [B, Hq, n, D]
        weights = b.op("Cast", member, to=FLOAT)
        counts = b.op("Max", b.reduce("ReduceSum", weights, [-1]), b.const(1.0))
        return b.op("Div", b.op("MatMul", weights, points), counts)

    def kmeans(start: str, points: str, point_visible: str, centre_valid: str) -> str:
        """Lloyd steps. start [B, Hq, P, D]; point_visible [.., 1, n, 1]; centre_valid [.., 1, 1, P]."""
        def step(_i: str, centres: str) -> list[str]:
            norms = b.op("Transpose", b.reduce("ReduceSum", b.op("Mul", centres, centres), [-1]), perm=[0, 1, 3, 2])
            score = b.op("Sub", norms, b.op("Mul", b.const(2.0),
                                            b.op("MatMul", points, b.op("Transpose", centres, perm=[0, 1, 3, 2]))))
            score = b.op("Where", centre_valid, score, b.const(float("inf")))  # [B, Hq, n, P]
            nearest = b.op("ArgMin", score, axis=-1, keepdims=1)  # first index on ties
            member = b.op("Cast", b.op("And", b.op("Equal", nearest, b.unsqueeze(landmark, 0, 1, 2)),
                                       point_visible), to=FLOAT)  # [B, Hq, n, P]
            member_t = b.op("Transpose", member, perm=[0, 1, 3, 2])
            counts = b.reduce("ReduceSum", member_t, [-1])  # [B, Hq, P, 1]
            moved = b.op("Div", b.op("MatMul", member_t, points), b.op("Max", counts, b.const(1.0)))
            return [b.op("Where", b.op("Greater", counts, zero_f), moved, centres)]

        (centres,) = b.loop(b.attr_int("iterations"), [start], step, [FLOAT])
        return centres

    def segment_landmarks() -> list[str]:
        return [means(b.unsqueeze(key_member, 1), k), means(query_member, q)]

    def kmeans_landmarks() -> list[str]:
        # Starts: visible key of rank floor(c·n_v/m_k), query floor(c·Sq/m_q).
        key_start = b.op("Div", b.op("Mul", col, n_visible_row), b.op("Max", k_count_row, one_i))  # [B', P, 1]
        key_pick = b.op("And", b.op("Equal", b.unsqueeze(rank, 1), key_start), b.unsqueeze(visible, 1))
        key_pick = b.op("And", key_pick, b.unsqueeze(key_valid, 2))  # [B', P, Skv]
        query_start = b.op("Div", b.op("Mul", col, sq), b.op("Max", q_count, one_i))  # [P, 1]
        query_pick = b.op("And", b.op("Equal", b.unsqueeze(query_pos, 0), query_start), b.unsqueeze(query_valid, 1))
        lk0 = b.op("MatMul", b.op("Cast", b.unsqueeze(key_pick, 1), to=FLOAT), k)
        lq0 = b.op("MatMul", b.op("Cast", query_pick, to=FLOAT), q)
        all_queries = b.op("Reshape", b.op("GreaterOrEqual", query_pos, zero_i), b.ints(1, 1, -1, 1))
        lk = kmeans(lk0, k, b.unsqueeze(visible, 1, 3), b.unsqueeze(key_valid, 1, 2))
        lq = kmeans(lq0, q, all_queries, b.op("Reshape", query_valid, b.ints(1, 1, 1, -1)))
        return [lk, lq]

    n_visible_row = b.unsqueeze(n_visible, 1)  # [B', 1, 1]
    k_count_row = b.unsqueeze(k_count, 1)
    builders = {"segment_means": segment_landmarks, "kmeans": kmeans_landmarks}
    lk, lq = b.string_switch("landmarks", {mth: builders[mth] for mth in methods}, [FLOAT, FLOAT])

    # -- the three softmax factors (masked; padding landmarks give zeros) -------------------------
    def masked_softmax(logits: str, keep: str) -> str:
        masked = b.op("Where", keep, logits, neg_inf)
        row_max = b.reduce("ReduceMax", masked, [-1])
        row_max = b.op("Where", b.op("IsInf", row_max), zero_f, row_max)
        weights = b.op("Exp", b.op("Sub", masked, row_max))
        total = b.reduce("ReduceSum", weights, [-1])
        return b.op("Where", b.op("Greater", total, zero_f), b.op("Div", weights, total), zero_f)

    def scaled(x: str, y: str) -> str:
        return b.op("Mul", b.op("MatMul", x, b.op("Transpose", y, perm=[0, 1, 3, 2])), scale)

    key_valid4 = b.unsqueeze(key_valid, 1, 2)  # [B', 1, 1, P]
    query_rows = b.op("Reshape", query_valid, b.ints(-1, 1))  # [P, 1]
    f1 = masked_softmax(scaled(q, lk), key_valid4)  # [B, Hq, Sq, P]
    kernel = masked_softmax(scaled(lq, lk), b.op("And", key_valid4, query_rows))  # [B, Hq, P, P]
    f3 = masked_softmax(scaled(lq, k), b.op("And", b.unsqueeze(visible, 1, 2), query_rows))  # [B, Hq, P, Skv]
    rhs = b.op("Cast", b.op("MatMul", f3, v), to=DOUBLE)  # [B, Hq, P, Dv]
    m = b.op("Cast", kernel, to=DOUBLE)

    eye = b.op("Cast", b.op("Equal", col, b.unsqueeze(landmark, 0)), to=DOUBLE)  # [P, P]
    zero_d = b.const(0.0, DOUBLE)

    def newton_schulz() -> list[str]:
        absolute = b.op("Abs", m)
        norm1 = b.reduce("ReduceMax", b.reduce("ReduceSum", absolute, [-2]), [-1])
        norm_inf = b.reduce("ReduceMax", b.reduce("ReduceSum", absolute, [-1]), [-2])
        denominator = b.op("Mul", norm1, norm_inf)
        denominator = b.op("Where", b.op("Greater", denominator, zero_d), denominator, b.const(1.0, DOUBLE))
        z0 = b.op("Div", b.op("Transpose", m, perm=[0, 1, 3, 2]), denominator)

        def step(_i: str, z: str) -> list[str]:
            mz = b.op("MatMul", m, z)
            inner = b.op("Sub", b.op("Mul", b.const(7.0, DOUBLE), eye), mz)
            inner = b.op("Sub", b.op("Mul", b.const(15.0, DOUBLE), eye), b.op("MatMul", mz, inner))
            inner = b.op("Sub", b.op("Mul", b.const(13.0, DOUBLE), eye), b.op("MatMul", mz, inner))
            return [b.op("Mul", b.const(0.25, DOUBLE), b.op("MatMul", z, inner))]

        (z,) = b.loop(b.attr_int("newton_iterations"), [z0], step, [DOUBLE])
        return [b.op("MatMul", z, rhs)]

    def regularised_least_squares() -> list[str]:
        ridge = b.op("Sqrt", b.op("Cast", b.attr_float("ridge"), to=DOUBLE))
        ridge_rows = b.op("Expand", b.op("Mul", eye, ridge), b.op("Shape", m))
        stacked = b.op("Concat", m, ridge_rows, axis=-2)  # [B, Hq, 2P, P]
        target = b.op("Concat", rhs, b.op("Mul", rhs, zero_d), axis=-2)  # [B, Hq, 2P, Dv]
        rows = b.op("Range", zero_i, b.op("Mul", padded, b.const(2, INT64)), one_i)  # [2P]
        identity_2p = b.op("Cast", b.op("Equal", b.unsqueeze(rows, 1), b.unsqueeze(rows, 0)), to=DOUBLE)

        def householder(j: str, a: str, qt: str) -> list[str]:
            below = b.op("Cast", b.op("GreaterOrEqual", rows, j), to=DOUBLE)
            at_j = b.op("Cast", b.op("Equal", rows, j), to=DOUBLE)
            x = b.op("Mul", b.op("Gather", a, j, axis=-1), below)  # [B, Hq, 2P]
            norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", x, x), [-1]))
            x_j = b.reduce("ReduceSum", b.op("Mul", x, at_j), [-1])
            alpha = b.op("Where", b.op("GreaterOrEqual", x_j, zero_d), b.op("Neg", norm), norm)
            u = b.op("Sub", x, b.op("Mul", alpha, at_j))
            unorm = b.reduce("ReduceSum", b.op("Mul", u, u), [-1])
            beta = b.op("Where", b.op("Greater", unorm, zero_d), b.op("Div", b.const(2.0, DOUBLE), unorm), zero_d)
            u_col = b.unsqueeze(u, -1)  # [B, Hq, 2P, 1]
            u_row = b.op("Mul", b.unsqueeze(u, -2), b.unsqueeze(beta, -1))  # β uᵀ [B, Hq, 1, 2P]

            def reflect(t: str) -> str:  # (I − β u uᵀ) t
                return b.op("Sub", t, b.op("MatMul", u_col, b.op("MatMul", u_row, t)))

            return [reflect(a), reflect(qt)]

        r_full, qt = b.loop(padded, [stacked, b.op("Expand", identity_2p, b.op("Concat", batch, q_heads, b.ints(1, 1),
                                                                                   axis=0))],
                            householder, [DOUBLE, DOUBLE])
        starts, ends = b.ints(0), b.op("Reshape", padded, b.ints(1))
        r = b.op("Slice", r_full, starts, ends, b.ints(-2))  # [B, Hq, P, P]
        q1t = b.op("Slice", qt, starts, ends, b.ints(-2))  # [B, Hq, P, 2P]

        def back_substitute(i: str, inverse: str) -> list[str]:  # row P−1−i of R⁻¹
            kk = b.op("Sub", b.op("Sub", padded, one_i), i)
            row = b.op("Gather", r, kk, axis=-2)  # [B, Hq, P]
            pivot = b.unsqueeze(b.op("Gather", row, kk, axis=-1), 2, 3)  # [B, Hq, 1, 1]
            e_k = b.op("Cast", b.op("Equal", landmark, kk), to=DOUBLE)  # [P]
            new_row = b.op("Div", b.op("Sub", e_k, b.op("MatMul", b.unsqueeze(row, -2), inverse)), pivot)
            return [b.op("Add", inverse, b.op("Mul", b.unsqueeze(e_k, -1), new_row))]

        (inverse,) = b.loop(padded, [b.op("Mul", b.op("Expand", eye, b.op("Shape", m)), zero_d)], back_substitute,
                            [DOUBLE])
        pseudo_inverse = b.op("MatMul", inverse, q1t)  # R⁻¹ Q₁ᵀ [B, Hq, P, 2P]
        x = b.op("MatMul", pseudo_inverse, target)
        for _ in range(REFINEMENT_STEPS):
            residual = b.op("Sub", target, b.op("MatMul", stacked, x))
            x = b.op("Add", x, b.op("MatMul", pseudo_inverse, residual))
        return [x]

    cases = {"sketch": regularised_least_squares, "newton_schulz": newton_schulz, "direct": regularised_least_squares}
    (x,) = b.string_switch("solver", {s: cases[s] for s in solvers}, [DOUBLE])
    y = b.op("MatMul", f1, b.op("Cast", x, to=FLOAT))  # [B, Hq, Sq, Dv]
    y = b.cast_to_input_dtype(y, "Q", output_dtype)
    b.op("Identity", y, outputs=["Y"])

    defaults = [helper.make_attribute(a.name, a.default) for a in SCHEMA.attributes]
    return b.build(DOMAIN, SCHEMA.name, [i.name for i in SCHEMA.inputs], [o.name for o in SCHEMA.outputs],
                   defaults, doc=f"{SCHEMA.doc} Reference semantics (dense masked form); see "
                                 "attnexport.ops.nystrom_attention.")
