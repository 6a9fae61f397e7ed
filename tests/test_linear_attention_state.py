"""LinearAttention's recurrent state: past_state in, present_state out ([B, Hkv, F, Dv + 2] =
[S | z | m] per feature, Q's type). The CPU kernel, the ONNX function (ONNX Runtime without the
library, and onnx.reference) and the numpy reference agree; one call, chunks carrying the state and
token by token give the same outputs, for every feature map that can carry a state.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import linear_attention as la
from attnexport.ops.functions import attach_functions, reference_evaluator
from ortutil import session

FEATURE_MAPS = ("elu1", "relu", "taylor2", "favor")
NUM_FEATURES = 7


def build(feature_map: str, *, causal: int, mask: bool, state: bool, present: bool = True, dtype=np.float32,
          expansion_point: str = "zero", opset: int = 18) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(n, elem, ["b", f"h{n}", f"s{n}", f"d{n}"]) for n in "QKV"]
    names = ["Q", "K", "V", "M" if mask else "", "W" if feature_map == "favor" else "", "P" if state else ""]
    if mask:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
    if feature_map == "favor":
        inputs.append(helper.make_tensor_value_info("W", elem, ["dQ", "f"]))
    if state:
        inputs.append(helper.make_tensor_value_info("P", elem, ["b", "hK", "F", "w"]))
    while not names[-1]:
        names.pop()
    outputs = ["Y", "S"] if present else ["Y"]
    node = helper.make_node("LinearAttention", names, outputs, domain="attnexport", causal=causal, scale=0.5,
                            feature_map=feature_map, expansion_point=expansion_point)
    types = {"Y": elem, "S": TensorProto.FLOAT}  # the state is float32 whatever Q's type
    graph = helper.make_graph([node], "t", inputs, [helper.make_tensor_value_info(o, types[o], None) for o in outputs])
    return attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def run(model, feeds, form):
    names = {i.name for i in model.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in names}
    if form == "reference evaluator":
        return reference_evaluator(model).run(None, feeds)
    return session(model, with_library=form == "kernel").run(None, feeds)


def data(batch=2, q_heads=4, kv_heads=2, q_len=5, kv_len=5, dk=5, dv=3, seed=0, feature_map="elu1"):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    w = f(dk, NUM_FEATURES)
    mask = rng.random((batch, kv_len)) < 0.75
    mask[:, :1] = True
    _, past = la.reference(f(batch, q_heads, 2, dk), f(batch, kv_heads, 2, dk), f(batch, kv_heads, 2, dv), None,
                           w, feature_map=feature_map, scale=0.5, return_state=True)
    return {"Q": f(batch, q_heads, q_len, dk), "K": f(batch, kv_heads, kv_len, dk), "V": f(batch, kv_heads, kv_len, dv),
            "M": mask, "W": w, "P": past.astype(np.float32)}


def reference(feeds, feature_map, *, causal, mask, state):
    return la.reference(feeds["Q"], feeds["K"], feeds["V"], feeds["M"] if mask else None,
                        feeds["W"] if feature_map == "favor" else None, feeds["P"] if state else None,
                        scale=0.5, causal=causal, feature_map=feature_map, return_state=True)


def close(got, want, what, tol=2e-5):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), what
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    assert err <= tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("shape", ["gqa", "sq>skv", "sq<skv"])
def test_three_forms_with_state(feature_map, shape, op_library):
    sizes = {"gqa": {}, "sq>skv": {"q_len": 7, "kv_len": 3}, "sq<skv": {"q_len": 2, "kv_len": 6}}[shape]
    feeds = data(feature_map=feature_map, **sizes)
    for causal in (0, 1):
        for mask in (False, True):
            model = build(feature_map, causal=causal, mask=mask, state=True)
            y_ref, s_ref = reference(feeds, feature_map, causal=causal, mask=mask, state=True)
            for form in ("kernel", "function", "reference evaluator"):
                y, s = run(model, feeds, form)
                close(y, y_ref, f"{form} {feature_map} causal={causal} mask={mask} Y")
                close(s, s_ref, f"{form} {feature_map} causal={causal} mask={mask} state")


def chunked(feature_map, feeds, sizes, form):
    first = build(feature_map, causal=1, mask=True, state=False)
    rest = build(feature_map, causal=1, mask=True, state=True)
    sessions, outputs, state, start = {}, [], None, 0
    for size in sizes:
        part = {"Q": feeds["Q"][:, :, start:start + size], "K": feeds["K"][:, :, start:start + size],
                "V": feeds["V"][:, :, start:start + size], "M": feeds["M"][:, start:start + size], "W": feeds["W"]}
        model = first if state is None else rest
        if state is not None:
            part["P"] = state
        key = id(model)
        if key not in sessions:
            sessions[key] = session(model, with_library=form == "kernel")
        names = {i.name for i in model.graph.input}
        y, state = sessions[key].run(None, {k: v for k, v in part.items() if k in names})
        outputs.append(y)
        start += size
    return np.concatenate(outputs, axis=2), state


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("form", ["kernel", "function"])
def test_one_call_chunks_and_token_by_token(feature_map, form, op_library):
    # One kv head and batch 1: the kernel splits the sequence into segments (fewer heads than threads).
    n = 150 if form == "kernel" else 40
    feeds = data(batch=1, q_heads=2, kv_heads=1, q_len=n, kv_len=n, dk=4, dv=3, seed=3, feature_map=feature_map)
    feeds["M"][:] = True
    feeds["M"][0, 5:9] = False
    y_ref, s_ref = reference(feeds, feature_map, causal=1, mask=True, state=False)
    for sizes in ([n], [3, 70 if n > 70 else 20, 1, n - (74 if n > 70 else 24)], [1] * n):
        y, s = chunked(feature_map, feeds, sizes, form)
        close(y, y_ref, f"{form} {feature_map} {len(sizes)} calls Y", tol=5e-5)
        close(s, s_ref, f"{form} {feature_map} {len(sizes)} calls state", tol=5e-5)


def test_keys_absent_queries_read_the_past(op_library):
    """No keys in the call: every query reads the past state; the present state is the past."""
    feeds = data(kv_len=0, q_len=3)
    feeds["M"] = np.zeros((2, 0), bool)
    for causal in (0, 1):
        model = build("elu1", causal=causal, mask=False, state=True)
        y_ref, s_ref = reference(feeds, "elu1", causal=causal, mask=False, state=True)
        for form in ("kernel", "function"):
            y, s = run(model, feeds, form)
            close(y, y_ref, f"{form} causal={causal}")
            close(s, s_ref, f"{form} causal={causal} state")


def test_float16_inputs_keep_a_float32_state(op_library):
    feeds = data(seed=5)
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    model = build("elu1", causal=1, mask=True, state=True, dtype=np.float16)
    y_ref, s_ref = reference({k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in half.items()},
                             "elu1", causal=1, mask=True, state=True)
    for form in ("kernel", "function"):
        y, s = run(model, half, form)
        assert y.dtype == np.float16 and s.dtype == np.float32
        close(y, y_ref, form, tol=3e-3)
        close(s, s_ref, f"{form} state", tol=3e-3)


def test_float16_state_past_float16_range(op_library):
    # z sums one feature over every key: 70000 keys of elu1 features near 1 pass float16's 65504. The
    # state stays float32, so a long float16 decode neither overflows nor loses its sums.
    rng = np.random.default_rng(7)
    n = 70000
    feeds = {"Q": rng.normal(scale=0.1, size=(1, 1, 1, 2)), "K": rng.normal(scale=0.1, size=(1, 1, n, 2)),
             "V": rng.normal(size=(1, 1, n, 2))}
    half = {k: v.astype(np.float16) for k, v in feeds.items()}
    model = build("elu1", causal=0, mask=False, state=False, dtype=np.float16)
    y_ref, s_ref = la.reference(*(half[k].astype(np.float64) for k in "QKV"), scale=0.5, feature_map="elu1",
                                return_state=True)
    assert s_ref[..., 2].max() > 65504
    for form in ("kernel", "function"):
        y, s = run(model, half, form)
        assert s.dtype == np.float32
        close(s, s_ref, f"{form} state", tol=1e-5)
        close(y, y_ref, f"{form} Y", tol=2e-3)


def test_favor_large_magnitudes_with_state(op_library):
    feeds = data(seed=6, feature_map="favor")
    feeds["Q"] *= 12
    feeds["K"] *= 12
    model = build("favor", causal=1, mask=True, state=True)
    y_ref, s_ref = reference(feeds, "favor", causal=1, mask=True, state=True)
    for form in ("kernel", "function"):
        y, s = run(model, feeds, form)
        close(y, y_ref, form, tol=1e-4)
        assert np.isfinite(s).all()


def test_nodes_without_a_state_share_the_function(op_library):
    """A node without past_state beside one with it gets a [1, 1] zero placeholder (the empty state)."""
    feeds = data(seed=2)
    graph_nodes = [helper.make_node("LinearAttention", ["Q", "K", "V", "", "", "P"], ["Y0", "S0"], domain="attnexport",
                                    causal=1),
                   helper.make_node("LinearAttention", ["Q", "K", "V"], ["Y1"], domain="attnexport", causal=1)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["a", "b", "c", "d"]) for n in ("Q", "K", "V", "P")]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y0", "S0", "Y1")]
    model = attach_functions(helper.make_model(helper.make_graph(graph_nodes, "t", inputs, outputs),
                                               opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    y0, s0 = la.reference(feeds["Q"], feeds["K"], feeds["V"], None, None, feeds["P"], causal=1, return_state=True)
    y1 = la.reference(feeds["Q"], feeds["K"], feeds["V"], causal=1)
    for form in ("kernel", "function"):
        out = run(model, feeds, form)
        close(out[0], y0, form)
        close(out[1], s0, f"{form} state")
        close(out[2], y1, f"{form} stateless")


def test_taylor2_mean_cannot_read_a_state(op_library):
    with pytest.raises(UnsupportedError, match="expansion_point"):
        build("taylor2", causal=1, mask=False, state=True, expansion_point="mean")
    # The kernel refuses too (a model built without attach_functions' check).
    model = build("taylor2", causal=1, mask=False, state=True)
    for attr in model.graph.node[0].attribute:
        if attr.name == "expansion_point":
            attr.s = b"mean"
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="expansion_point"):
        run(model, data(feature_map="taylor2"), "kernel")
