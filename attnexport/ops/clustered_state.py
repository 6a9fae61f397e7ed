"""ClusteredAttention in state mode: the ONNX function body (dense form). Semantics: schema.py and
clustered_reference.clustered_attention_step.

The state's exact rows and the call's tokens are one set of E = G + R + S keys with positions
(global row g: g; window row r: P - R + r; new token i: P + i) and flags (kept, unpadded). For query i
(position p = P + i) key e is visible when flagged and at a position <= p, near when its position is
< G or >= p - W, far otherwise; a far key is replaced by its centroid (the same sum, term for term),
and each cluster row of the state is one more key, μ_c, with log(count_c) added to its logit and
value sum_c / count_c. One softmax over [E keys; M cluster rows] gives Y.

present_state: global rows where g >= P from the call's tokens at position g; window rows at positions
P + S - R .. P + S - 1 gathered by position from [window rows; new tokens]; kept keys at positions
>= G that fall before P + S - R added to their clusters; the counter P + S. A row whose flag is 0 is
zeros. P is read per (batch, kv head) from the state's last row.
"""

from __future__ import annotations

from onnx import helper

from attnexport.ops.function_builder import BOOL, FLOAT, INT64, FunctionBuilder


def state_mode_body(b: FunctionBuilder, *, has_mask: bool, has_past: bool, scale: str, assign) -> tuple[str, str]:
    """Emit the state-mode nodes; returns (Y as float32 [B, Hq, S, Dv], present_state [B, Hkv, rows, C]).
    `assign(points, centres, visible)` is the function's nearest-centre one-hot."""
    q, k, v = (b.op("Cast", name, to=FLOAT) for name in ("Q", "K", "V"))
    shape_q, shape_k, shape_v = b.op("Shape", "Q"), b.op("Shape", "K"), b.op("Shape", "V")
    batch, q_heads, new, head_dim = (b.dims(shape_q, i) for i in range(4))
    kv_heads, value_dim = b.dims(shape_k, 1), b.dims(shape_v, 3)
    group = b.op("Div", q_heads, kv_heads)
    one_i = b.ints(1)
    zero_f, one_f = b.const(0.0), b.const(1.0)

    num_global = b.op("Reshape", b.attr_int("num_global"), one_i)  # G [1]
    window = b.op("Reshape", b.attr_int("window_left"), one_i)  # W [1]
    rows_r = b.op("Add", window, one_i)  # R
    clusters = b.op("Reshape", b.attr_int("num_clusters"), one_i)  # M
    row_count = b.op("Add", b.op("Add", b.op("Add", num_global, rows_r), clusters), one_i)
    width = b.op("Add", b.op("Add", head_dim, value_dim), one_i)  # C
    full = b.op("Concat", batch, kv_heads, row_count, width, axis=0)
    if has_past:
        state = b.op("Expand", b.op("Cast", "past_state", to=FLOAT), full)
    else:
        state = b.op("ConstantOfShape", full, value=helper.make_tensor("zero", FLOAT, [1], [0.0]))

    def rows(start: str, end: str) -> str:
        return b.op("Slice", state, start, end, b.ints(2))

    def cols(x: str, start: str, end: str) -> str:
        return b.op("Slice", x, start, end, b.ints(3))

    window0 = num_global
    cluster0 = b.op("Add", num_global, rows_r)
    cluster1 = b.op("Add", cluster0, clusters)
    exact = rows(b.ints(0), cluster0)  # [B,Hkv,G+R,C]: global and window rows
    cluster_rows = rows(cluster0, cluster1)  # [B,Hkv,M,C]
    seen = b.op("Cast", cols(rows(cluster1, b.op("Add", cluster1, one_i)), b.ints(0), one_i), to=INT64)  # P [B,Hkv,1,1]
    value_end = b.op("Add", head_dim, value_dim)

    # The extended keys: exact rows, then the call's tokens.
    token_shape = b.op("Concat", batch, new, axis=0)
    if has_mask:
        flags_new = b.op("Cast", b.op("Cast", "key_padding_mask", to=BOOL), to=FLOAT)  # [B,S]
    else:
        flags_new = b.op("ConstantOfShape", token_shape, value=helper.make_tensor("one", FLOAT, [1], [1.0]))
    flags_new = b.op("Expand", b.unsqueeze(flags_new, 1, 3), b.op("Concat", batch, kv_heads, new, one_i, axis=0))
    keys = b.op("Concat", cols(exact, b.ints(0), head_dim), k, axis=2)  # [B,Hkv,E,Dk]
    values = b.op("Concat", cols(exact, head_dim, value_end), v, axis=2)  # [B,Hkv,E,Dv]
    flags = b.op("Concat", cols(exact, value_end, width), flags_new, axis=2)  # [B,Hkv,E,1]
    kept = b.op("Greater", flags, zero_f)
    zero_i = b.const(0, INT64)
    g_pos = b.op("Range", zero_i, b.squeeze(num_global, 0), b.const(1, INT64))  # [G]
    r_pos = b.op("Sub", b.op("Range", zero_i, b.squeeze(rows_r, 0), b.const(1, INT64)), rows_r)  # -R..-1 (+P)
    n_pos = b.op("Range", zero_i, b.squeeze(new, 0), b.const(1, INT64))  # 0..S-1 (+P)
    relative = b.op("Concat", r_pos, n_pos, axis=0)  # [R+S]
    positions = b.op("Concat", b.op("Expand", b.unsqueeze(g_pos, 0, 1), b.op("Concat", batch, kv_heads, num_global, axis=0)),
                     b.op("Add", b.squeeze(seen, 3), relative), axis=2)  # [B,Hkv,E]

    # Visibility of key e to query i: [B,Hkv,1,S,E].
    key_pos = b.unsqueeze(positions, 2, 3)  # [B,Hkv,1,1,E]
    query_pos = b.unsqueeze(b.op("Add", seen, b.unsqueeze(n_pos, 1)), 2)  # [B,Hkv,1,S,1]
    flag_row = b.unsqueeze(b.op("Squeeze", kept, b.ints(3)), 2, 3)  # [B,Hkv,1,1,E]
    visible = b.op("And", flag_row, b.op("LessOrEqual", key_pos, query_pos))
    near = b.op("Or", b.op("Less", key_pos, num_global),
                b.op("GreaterOrEqual", key_pos, b.op("Sub", query_pos, window)))

    # Logits: near keys exact, far keys as their centroid; cluster rows with log(count).
    mu = b.unsqueeze(b.op("Reshape", b.op("Cast", "centroids", to=FLOAT),
                          b.op("Concat", kv_heads, clusters, head_dim, axis=0)), 0)  # [1,Hkv,M,Dk]
    onehot = assign(keys, mu, None)  # [B,Hkv,E,M]
    k_eff = b.op("MatMul", onehot, mu)  # [B,Hkv,E,Dk]
    q5 = b.op("Reshape", q, b.op("Concat", batch, kv_heads, group, new, head_dim, axis=0))  # [B,Hkv,Gq,S,Dk]
    near_logits = b.op("MatMul", q5, b.unsqueeze(b.op("Transpose", keys, perm=[0, 1, 3, 2]), 2))
    far_logits = b.op("MatMul", q5, b.unsqueeze(b.op("Transpose", k_eff, perm=[0, 1, 3, 2]), 2))
    neg_inf = b.const(float("-inf"))
    key_logits = b.op("Where", visible, b.op("Mul", b.op("Where", near, near_logits, far_logits), scale), neg_inf)
    sums = cols(cluster_rows, head_dim, value_end)  # [B,Hkv,M,Dv]
    counts = cols(cluster_rows, value_end, width)  # [B,Hkv,M,1]
    held = b.op("Greater", counts, zero_f)
    means = b.op("Div", sums, b.op("Max", counts, one_f))
    count_row = b.unsqueeze(b.op("Transpose", counts, perm=[0, 1, 3, 2]), 2)  # [B,Hkv,1,1,M]
    centre_logits = b.op("Add", b.op("Mul", b.op("MatMul", q5, b.unsqueeze(b.op("Transpose", mu, perm=[0, 1, 3, 2]), 2)),
                                     scale), b.op("Log", b.op("Max", count_row, one_f)))
    centre_logits = b.op("Where", b.op("Greater", count_row, zero_f), centre_logits, neg_inf)
    logits = b.op("Concat", key_logits, centre_logits, axis=4)  # [B,Hkv,Gq,S,E+M]
    all_values = b.unsqueeze(b.op("Concat", values, b.op("Where", held, means, zero_f), axis=2), 2)
    row_max = b.reduce("ReduceMax", logits, [-1])
    row_max = b.op("Where", b.op("IsInf", row_max), zero_f, row_max)
    weights = b.op("Exp", b.op("Sub", logits, row_max))
    total = b.reduce("ReduceSum", weights, [-1])
    y5 = b.op("Where", b.op("Greater", total, zero_f), b.op("Div", b.op("MatMul", weights, all_values), total), zero_f)
    y = b.op("Reshape", y5, b.op("Concat", batch, q_heads, new, value_dim, axis=0))

    # present_state.
    end = b.op("Add", seen, b.op("Reshape", new, b.ints(1, 1, 1)))  # P + S [B,Hkv,1,1]
    full_rows = b.op("Mul", b.op("Concat", keys, values, b.op("Cast", kept, to=FLOAT), axis=3), flags)  # 0 if unkept
    tail_rows = b.op("Slice", full_rows, num_global, b.ints(2**62), b.ints(2))  # window rows and new tokens
    tail_pos = b.op("Slice", positions, num_global, b.ints(2**62), b.ints(2))  # [B,Hkv,R+S]
    new_rows = b.op("Slice", full_rows, cluster0, b.ints(2**62), b.ints(2))  # [B,Hkv,S,C]
    new_pos = b.op("Slice", positions, cluster0, b.ints(2**62), b.ints(2))  # [B,Hkv,S]
    # globals: g < P keeps its row, else the call's token at position g (zeros if none or padded)
    pick_global = b.op("Cast", b.op("Equal", b.unsqueeze(g_pos, 0, 1, 3), b.unsqueeze(new_pos, 2)), to=FLOAT)  # [B,Hkv,G,S]
    old_global = b.op("Less", b.unsqueeze(g_pos, 0, 1, 3), seen)  # [B,Hkv,G,1]
    globals_out = b.op("Where", old_global, rows(b.ints(0), num_global), b.op("MatMul", pick_global, new_rows))
    # window: positions P+S-R+r from [window rows; new tokens], only positions >= G
    want = b.op("Add", b.op("Sub", end, b.op("Reshape", rows_r, b.ints(1, 1, 1))),
                b.unsqueeze(b.op("Range", zero_i, b.squeeze(rows_r, 0), b.const(1, INT64)), 0, 1, 3))  # [B,Hkv,R,1]
    tail_pos4 = b.unsqueeze(tail_pos, 2)  # [B,Hkv,1,R+S]
    pick_window = b.op("And", b.op("Equal", want, tail_pos4), b.op("GreaterOrEqual", want, num_global))
    window_out = b.op("MatMul", b.op("Cast", pick_window, to=FLOAT), tail_rows)  # [B,Hkv,R,C]
    # clusters: kept keys at positions G <= pos < P + S - R among [window rows; new tokens]
    oldest = b.op("Sub", end, b.op("Reshape", rows_r, b.ints(1, 1, 1)))  # [B,Hkv,1,1]
    tail_flags = b.op("Slice", kept, num_global, b.ints(2**62), b.ints(2))  # [B,Hkv,R+S,1]
    leaving = b.op("And", tail_flags, b.op("And", b.op("GreaterOrEqual", b.unsqueeze(tail_pos, 3), num_global),
                                            b.op("Less", b.unsqueeze(tail_pos, 3), oldest)))  # [B,Hkv,R+S,1]
    tail_onehot = b.op("Mul", b.op("Slice", onehot, num_global, b.ints(2**62), b.ints(2)),
                       b.op("Cast", leaving, to=FLOAT))  # [B,Hkv,R+S,M]
    moved = b.op("Transpose", tail_onehot, perm=[0, 1, 3, 2])  # [B,Hkv,M,R+S]
    tail_values = b.op("Slice", values, num_global, b.ints(2**62), b.ints(2))
    sums_out = b.op("Add", sums, b.op("MatMul", moved, tail_values))
    counts_out = b.op("Add", counts, b.reduce("ReduceSum", moved, [3]))
    clusters_out = b.op("Concat", b.op("Mul", cols(cluster_rows, b.ints(0), head_dim), zero_f), sums_out, counts_out,
                        axis=3)
    last = b.op("Concat", b.op("Cast", end, to=FLOAT),
                b.op("Expand", zero_f, b.op("Concat", batch, kv_heads, one_i, b.op("Sub", width, one_i), axis=0)),
                axis=3)
    present = b.op("Concat", globals_out, window_out, clusters_out, last, axis=2)
    return y, present


__all__ = ["state_mode_body"]
