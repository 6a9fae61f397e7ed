"""ClusteredAttention: ONNX function (reference semantics); schema in schema.py, numpy reference in
clustered_reference.py.

The function is the dense masked form of the operator (the reference path that runs without the op
library). cluster=keys uses that replacing every far key j by its centre μ_{a(j)} gives the
operator's formula term for term: Σ_c e^{s q·μ_c} Σ_{j∈F_c} v_j = Σ_{j far} e^{s q·μ_{a(j)}} v_j, and
likewise the normaliser. So

    K_eff = onehot(assign) @ centres                        [B, Hkv, Skv, Dk]
    logit_ij = near_ij ? s q_i·k_j : s q_i·K_eff_j          (near: SparseAttention's pattern)
    Y = softmax over the visible j (causal, key_padding_mask); rows that see nothing give 0.

The k-means (per batch and kv head, over the visible keys in position order):
    rank_j = (number of visible keys before j); n_v = visible keys; centre c starts at the visible
    key with rank floor(c * n_v / M) (a one-hot selection matrix times K);
    assign = ArgMin_c (|μ_c|² - 2 k·μ_c)   (|k|² is the same for every c; ArgMin takes the first minimum)
    μ_c = Σ_{a(j)=c} k_j / count_c, or μ_c when count_c = 0 (Where)
run as an ONNX `Loop` of `iterations` trips carrying the centres (one body serves every node, the
count is read at run time), then one final assignment. A centroids input [Hkv, M, Dk] replaces it.

cluster=queries: the same k-means over each (batch, query head)'s queries (every query counts), each
centre attends over the visible keys with an exact softmax, Y = onehot(assign) @ rows.

One generic function serves every node of a model: numeric attributes are read at run time, the
cluster mode selects an `If` branch (only the modes the nodes use are built). The nodes must agree on
whether they pass key_padding_mask (attach_functions gives the others an all-true mask) and on
whether they pass centroids (a k-means is no placeholder for given centres, so mixing is refused), and
on carrying a state (past_state / present_state: the body of clustered_state.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import clustered_reference as _reference
from attnexport.ops.function_builder import BOOL, FLOAT, INT64, MIN_ML_OPSET, FunctionBuilder, Placeholder
from attnexport.ops.schema import CLUSTERED_ATTENTION, DOMAIN
from attnexport.ops.clustered_state import state_mode_body

SCHEMA = CLUSTERED_ATTENTION
reference = _reference.clustered_attention
kmeans = _reference.kmeans

CLUSTER_MODES = SCHEMA.attribute("cluster").choices
_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Variant:
    """What about one node shapes the function body: its cluster mode, which optional inputs it
    passes, and its dtype. Numeric attributes are read at run time (and checked here)."""

    cluster: str = "keys"
    key_padding_mask: bool = False
    centroids: bool = False
    dtype: int | None = None
    past_state: bool = False
    present_state: bool = False  # the node produces present_state

    @property
    def stateful(self) -> bool:
        return self.past_state or self.present_state

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Variant:
        get = {a.name: values.get(a.name, a.default) for a in SCHEMA.attributes}
        problem = _reference.check_clustered(
            causal=int(get["causal"]), window_left=int(get["window_left"]), window_right=int(get["window_right"]),
            dilation=int(get["dilation"]), num_global=int(get["num_global"]), num_clusters=int(get["num_clusters"]),
            iterations=int(get["iterations"]), cluster=get["cluster"], has_centroids=bool(values.get("centroids", False)))
        if problem:
            raise UnsupportedError(f"ClusteredAttention {problem}")
        dtype = values.get("dtype")
        if dtype is not None and dtype not in _FLOAT_TYPES:
            raise UnsupportedError(
                f"ClusteredAttention inputs of type {helper.tensor_dtype_to_string(dtype)}: "
                "float32, float16 or bfloat16 expected"
            )
        past, present = bool(values.get("past_state", False)), bool(values.get("present_state", False))
        if past or present:
            problem = _reference.check_state_mode(
                causal=int(get["causal"]), window_left=int(get["window_left"]), dilation=int(get["dilation"]),
                cluster=get["cluster"], has_centroids=bool(values.get("centroids", False)), q_len=0, kv_len=0)
            if problem:
                raise UnsupportedError(f"ClusteredAttention {problem}")
        return cls(get["cluster"], bool(values.get("key_padding_mask", False)), bool(values.get("centroids", False)),
                   dtype, past, present)


def placeholders(variants: Iterable[Mapping[str, Any]]) -> dict[str, Placeholder]:
    """key_padding_mask (all keys visible) for the nodes lacking it when only some nodes pass one."""
    vs = [Variant.of(v) for v in variants]
    if len({v.key_padding_mask for v in vs}) > 1:
        return {"key_padding_mask": Placeholder("true_mask", "K", (0, 2))}
    return {}


def build_function(opset: int, variants: Iterable[Mapping[str, Any]], *, ml_opset: int = MIN_ML_OPSET
                   ) -> onnx.FunctionProto:
    """The generic `attnexport.ClusteredAttention` function for default-domain `opset`, covering the
    node configurations `variants` (see `Variant.of`; none means one default node). Raises
    UnsupportedError for opset < 13, nodes of several float types below opset 15, nodes that disagree
    on passing key_padding_mask or centroids, or an invalid node."""
    vs = [Variant.of(v) for v in variants] or [Variant()]
    b = FunctionBuilder(opset, ml_opset=ml_opset)
    output_dtype = b.output_dtype(SCHEMA.name, [v.dtype for v in vs])
    for name in ("key_padding_mask", "centroids"):
        if len({getattr(v, name) for v in vs}) > 1:
            raise UnsupportedError(f"some ClusteredAttention nodes pass {name} and some do not; one function serves "
                                   "them all" + (" (attach_functions gives the others an all-true mask)"
                                                 if name == "key_padding_mask" else ""))
    for name in ("stateful", "past_state"):
        if len({getattr(v, name) for v in vs}) > 1:
            raise UnsupportedError("some ClusteredAttention nodes carry a state (past_state / present_state) and some "
                                   "do not, or pass past_state and some do not; one function serves them all")
    has_mask, has_centroids = vs[0].key_padding_mask, vs[0].centroids
    modes = [m for m in CLUSTER_MODES if any(v.cluster == m for v in vs)]

    q = b.op("Cast", "Q", to=FLOAT)
    k = b.op("Cast", "K", to=FLOAT)
    v = b.op("Cast", "V", to=FLOAT)
    shape_q, shape_k, shape_v = b.op("Shape", "Q"), b.op("Shape", "K"), b.op("Shape", "V")
    batch, q_heads, q_len, head_dim = (b.dims(shape_q, i) for i in range(4))
    kv_heads, kv_len = b.dims(shape_k, 1), b.dims(shape_k, 2)
    value_dim = b.dims(shape_v, 3)
    group = b.op("Div", q_heads, kv_heads)
    k5 = b.unsqueeze(k, 2)  # [B,Hkv,1,Skv,Dk]
    v5 = b.unsqueeze(v, 2)  # [B,Hkv,1,Skv,Dv]

    scale_attr = b.attr_float("scale")
    default_scale = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=FLOAT)))
    scale = b.op("Where", b.op("IsNaN", scale_attr), default_scale, scale_attr)
    zero, one = b.const(0, INT64), b.const(1, INT64)
    num_clusters = b.attr_int("num_clusters")
    cluster_ids = b.op("Range", zero, num_clusters, one)  # [M]
    keep = None  # [B,1,Skv] bool
    if has_mask:
        keep = b.op("Reshape", b.op("Cast", "key_padding_mask", to=BOOL), b.op("Concat", batch, b.ints(1), kv_len, axis=0))

    def assign(points: str, centres: str, visible: str | None) -> str:
        """One-hot [.., N, M] float of each point's nearest centre (zero rows for invisible points)."""
        norms = b.unsqueeze(b.reduce("ReduceSum", b.op("Mul", centres, centres), [-1], keepdims=False), -2)  # [..,1,M]
        cross = b.op("MatMul", points, b.op("Transpose", centres, perm=[0, 1, 3, 2]))  # [..,N,M]
        score = b.op("Sub", norms, b.op("Mul", cross, b.const(2.0)))
        nearest = b.op("ArgMin", score, axis=-1, keepdims=1)  # [..,N,1], first minimum on ties
        onehot = b.op("Equal", nearest, cluster_ids)
        if visible is not None:
            onehot = b.op("And", onehot, b.unsqueeze(visible, -1))
        return b.op("Cast", onehot, to=FLOAT)

    def kmeans_nodes(points: str, visible: str | None, length: str) -> tuple[str, str]:
        """(centres [B,H,M,D], one-hot assignment [B,H,N,M]) of the deterministic k-means of `points`
        [B,H,N,D] over the rows `visible` [B,1,N] keeps (all when None); `length` is N (1-D)."""
        positions = b.op("Range", zero, b.squeeze(length, 0), one)  # [N]
        if visible is None:
            rank, count = positions, b.op("Reshape", length, b.ints(1, 1, 1))
            chosen_ok = None
        else:
            as_int = b.op("Cast", visible, to=INT64)
            rank = b.op("Sub", b.op("CumSum", as_int, b.const(2, INT64)), one)  # [B,1,N]
            count = b.reduce("ReduceSum", as_int, [2])  # [B,1,1]
            chosen_ok = b.unsqueeze(visible, 2)  # [B,1,1,N]
        start = b.op("Div", b.op("Mul", b.unsqueeze(cluster_ids, 0, 1), count), num_clusters)  # [B|1,1,M]
        select = b.op("Equal", b.unsqueeze(start, -1), b.unsqueeze(rank, -2))  # [B|1,1,M,N]
        if chosen_ok is not None:
            select = b.op("And", select, chosen_ok)
        centres = b.op("MatMul", b.op("Cast", select, to=FLOAT), points)  # [B,H,M,D]

        def lloyd(_i: str, centres: str) -> list[str]:
            onehot = assign(points, centres, visible)
            members = b.reduce("ReduceSum", onehot, [2])  # [B,H,1,M]
            counts = b.op("Transpose", members, perm=[0, 1, 3, 2])  # [B,H,M,1]
            sums = b.op("MatMul", b.op("Transpose", onehot, perm=[0, 1, 3, 2]), points)  # [B,H,M,D]
            means = b.op("Div", sums, b.op("Max", counts, b.const(1.0)))
            return [b.op("Where", b.op("Greater", counts, b.const(0.0)), means, centres)]

        (centres,) = b.loop(b.attr_int("iterations"), [centres], lloyd, [FLOAT])
        return centres, assign(points, centres, visible)

    def softmax_rows(logits: str, visible: str | None, values: str) -> str:
        """Softmax over the last axis of the visible logits, times values; rows seeing nothing give 0."""
        masked = logits if visible is None else b.op("Where", visible, logits, b.const(float("-inf")))
        row_max = b.reduce("ReduceMax", masked, [-1])
        row_max = b.op("Where", b.op("IsInf", row_max), b.const(0.0), row_max)
        weights = b.op("Exp", b.op("Sub", masked, row_max))
        total = b.reduce("ReduceSum", weights, [-1])
        y = b.op("Div", b.op("MatMul", weights, values), total)
        return b.op("Where", b.op("Greater", total, b.const(0.0)), y, b.const(0.0))

    def keys_mode() -> list[str]:
        if has_centroids:
            given = b.op("Reshape", b.op("Cast", "centroids", to=FLOAT),
                         b.op("Concat", kv_heads, b.op("Reshape", num_clusters, b.ints(1)), head_dim, axis=0))
            centres = b.unsqueeze(given, 0)  # [1,Hkv,M,Dk]
            onehot = assign(k, centres, keep)
        else:
            centres, onehot = kmeans_nodes(k, keep, kv_len)
        k_eff5 = b.unsqueeze(b.op("MatMul", onehot, centres), 2)  # [B,Hkv,1,Skv,Dk]: each key's centre
        q5 = b.op("Reshape", q, b.op("Concat", batch, kv_heads, group, q_len, head_dim, axis=0))  # [B,Hkv,G,Sq,Dk]
        near_logits = b.op("MatMul", q5, b.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
        far_logits = b.op("MatMul", q5, b.op("Transpose", k_eff5, perm=[0, 1, 2, 4, 3]))
        near, seen = near_and_seen()
        logits = b.op("Mul", b.op("Where", near, near_logits, far_logits), scale)  # [B,Hkv,G,Sq,Skv]
        y5 = softmax_rows(logits, seen, v5)
        return [b.op("Reshape", y5, b.op("Concat", batch, q_heads, q_len, value_dim, axis=0))]

    def near_and_seen() -> tuple[str, str]:
        """SparseAttention's pattern without random blocks [Sq,Skv], and what each query sees
        (causal and key padding) as [Sq,Skv] or [B,1,1,Sq,Skv]."""
        sq, skv = b.dim(shape_q, 2), b.dim(shape_k, 2)
        pos = b.unsqueeze(b.op("Add", b.op("Range", zero, sq, one), b.op("Sub", skv, sq)), 1)  # i' [Sq,1]
        key = b.unsqueeze(b.op("Range", zero, skv, one), 0)  # j [1,Skv]
        offset = b.op("Sub", key, pos)

        def unbounded_or(attribute: str, inside) -> str:
            limit = b.attr_int(attribute)
            return b.op("Or", b.op("Less", limit, zero), inside(limit))

        window = b.op("Equal", b.op("Mod", offset, b.attr_int("dilation")), zero)
        window = b.op("And", window, unbounded_or("window_left",
                                                  lambda w: b.op("GreaterOrEqual", offset, b.op("Neg", w))))
        window = b.op("And", window, unbounded_or("window_right", lambda w: b.op("LessOrEqual", offset, w)))
        num_global = b.attr_int("num_global")
        global_rows = b.op("And", b.op("GreaterOrEqual", pos, zero), b.op("Less", pos, num_global))
        near = b.op("Or", window, b.op("Or", b.op("Less", key, num_global), global_rows))
        seen = b.op("Or", b.op("LessOrEqual", offset, zero), b.op("Equal", b.attr_int("causal"), zero))
        if keep is not None:
            seen = b.op("And", seen, b.unsqueeze(keep, 1, 2))  # [B,1,1,Sq,Skv]
        return near, seen

    def queries_mode() -> list[str]:
        centres, onehot = kmeans_nodes(q, None, q_len)  # [B,Hq,M,Dk], [B,Hq,Sq,M]
        centres5 = b.op("Reshape", centres,
                        b.op("Concat", batch, kv_heads, group, b.op("Reshape", num_clusters, b.ints(1)), head_dim,
                             axis=0))
        logits = b.op("Mul", b.op("MatMul", centres5, b.op("Transpose", k5, perm=[0, 1, 2, 4, 3])), scale)
        seen = None if keep is None else b.unsqueeze(keep, 1, 2)  # [B,1,1,1,Skv]
        rows = b.op("Reshape", softmax_rows(logits, seen, v5),
                    b.op("Concat", batch, q_heads, b.op("Reshape", num_clusters, b.ints(1)), value_dim, axis=0))
        return [b.op("MatMul", onehot, rows)]

    outputs = ["Y"]
    if vs[0].stateful:  # (the check above makes them all so): cluster=keys, causal, centroids
        y, present = state_mode_body(b, has_mask=has_mask, has_past=vs[0].past_state, scale=scale, assign=assign)
        if any(v.present_state for v in vs):
            b.op("Identity", present, outputs=["present_state"])  # float32 whatever Q's type
            outputs.append("present_state")
    else:
        (y,) = b.string_switch("cluster", {m: {"keys": keys_mode, "queries": queries_mode}[m] for m in modes}, [FLOAT])
    y = b.cast_to_input_dtype(y, "Q", output_dtype)
    b.op("Identity", y, outputs=["Y"])

    defaults = [helper.make_attribute(a.name, a.default) for a in SCHEMA.attributes]
    return b.build(DOMAIN, SCHEMA.name, [i.name for i in SCHEMA.inputs], outputs,
                   defaults, doc=f"{SCHEMA.doc} Reference semantics (dense form, far keys replaced by their "
                                 "centres); see attnexport.ops.clustered_attention.")
