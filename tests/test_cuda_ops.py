"""The attnexport ops on ONNX Runtime's CUDA execution provider, on a GPU: kernel vs ONNX function vs
numpy for every op and dtype, the float32 CUDA-core fallback, edge cases (no NaN), one-line errors,
node placement (every attnexport node on CUDA, no host copies added), and end-to-end convert + verify
of real exports with the CUDA provider.

Needs a CUDA GPU, onnxruntime-gpu (its CUDAExecutionProvider) and the op library built with its CUDA
part; otherwise every test here skips and says which is missing. scripts/gpu_check.sh sets up and runs
this on a GPU machine. tests/test_cuda_emulated.py runs the same kernels on the CPU everywhere.
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import attnexport
from attnexport.ops import schema
from attnexport.ops.functions import attach_functions
from attnexport.ops.reference import linear_attention, lse_attention, lse_state_parts, sparse_attention

pytestmark = pytest.mark.cuda

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def _probe_model(op_type: str) -> bytes:
    """One attnexport node on tiny float32 inputs (a probe for where ORT places it)."""
    spec = schema.SCHEMAS[op_type]
    names = [i.name for i in spec.inputs[:3]]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 8]) for n in names]
    outs = [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, None) for o in spec.outputs]
    node = helper.make_node(op_type, names, [o.name for o in spec.outputs], domain=schema.DOMAIN, name="probe")
    model = helper.make_model(helper.make_graph([node], "probe", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, 1)],
                              ir_version=8)
    return model.SerializeToString()


def node_providers(model: bytes | str, feeds: dict[str, np.ndarray], tmp_dir: str, *, providers=CUDA,
                   with_library: bool = True) -> list[tuple[str, str]]:
    """[(op type, provider)] of every node ORT ran, from its profile (model: bytes, or a path when it
    has external data)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp_dir, "profile")
    if with_library:
        so.register_custom_ops_library(attnexport.library_path())
    sess = ort.InferenceSession(model, so, providers=providers)
    sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    seen = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args and "op_name" in args:
            seen[e["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")] = (
                args["op_name"], args["provider"])
    return list(seen.values())


@functools.lru_cache(maxsize=1)
def cuda_unavailable() -> str | None:
    """Why the CUDA tests cannot run here (None: they can)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (CPU-only build; install "
                "onnxruntime-gpu as the README's GPU section says)")
    try:
        lib = attnexport.library_path()
    except attnexport.AttnExportError as e:
        return f"no op library: {e}"
    probe = _probe_model("LinearAttention")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.register_custom_ops_library(lib)
    try:
        sess = ort.InferenceSession(probe, so, providers=CUDA)
    except Exception as e:  # noqa: BLE001 - any failure here means: cannot test CUDA
        return f"a CUDA session cannot be created: {str(e).splitlines()[0][:200]}"
    if "CUDAExecutionProvider" not in sess.get_providers():
        return "ORT fell back to the CPU: no usable CUDA GPU or CUDA/cuDNN runtime libraries"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        feeds = {n: np.ones((1, 1, 4, 8), np.float32) for n in ("Q", "K", "V")}
        placed = node_providers(probe, feeds, d)
    if ("LinearAttention", "CUDAExecutionProvider") not in placed:
        return f"the op library {lib} has no CUDA kernels (built without a CUDA compiler?): LinearAttention ran on {placed}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    why = cuda_unavailable()
    if why:
        pytest.skip(f"CUDA tests skipped: {why}")


# -- models ------------------------------------------------------------------------------------------

def build(op_type: str, attrs: dict, dtype: str, *, inputs: tuple[str, ...], with_functions: bool) -> bytes:
    """One attnexport node. Graph inputs are float32 (Cast to the dtype inside, so bfloat16 needs no
    numpy support) except bool masks and float32 states; outputs are cast back to float32."""
    spec = schema.SCHEMAS[op_type]
    attrs = spec.complete_attributes(**attrs)
    elem = ELEM[dtype]
    nodes, graph_inputs = [], []
    node_inputs = []
    for spec_in in spec.inputs:
        name = spec_in.name
        if name not in inputs:
            node_inputs.append("")
            continue
        if name == "key_padding_mask":
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.BOOL, None))
            node_inputs.append(name)
        elif name == "past_state":
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            node_inputs.append(name)
        else:
            graph_inputs.append(helper.make_tensor_value_info(name + "_f32", TensorProto.FLOAT, None))
            nodes.append(helper.make_node("Cast", [name + "_f32"], [name], to=elem))
            node_inputs.append(name)
    while node_inputs and not node_inputs[-1]:
        node_inputs.pop()
    out_names = [o.name for o in spec.outputs]
    nodes.append(helper.make_node(op_type, node_inputs, out_names, domain=schema.DOMAIN, name="op", **attrs))
    outputs = []
    for o in out_names:
        if o == "present_state":
            outputs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
        else:
            nodes.append(helper.make_node("Cast", [o], [o + "_f32"], to=TensorProto.FLOAT))
            outputs.append(helper.make_tensor_value_info(o + "_f32", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "t", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, 1)],
                              ir_version=8)
    if with_functions:
        model = attach_functions(model)
    return model.SerializeToString()


def session(model: bytes, *, providers=CUDA, with_library=True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if with_library:
        so.register_custom_ops_library(attnexport.library_path())
    sess = ort.InferenceSession(model, so, providers=providers)
    if "CUDAExecutionProvider" in providers:
        assert sess.get_providers()[0] == "CUDAExecutionProvider"
    return sess


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as the dtype represents it, in float64 (bfloat16: round to nearest even)."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        b = x.view(np.uint32)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32) << 16
        return r.view(np.float32).astype(np.float64)
    return x.astype(np.float64)


TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def check(got, ref, dtype, what, tol=None):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, what
    assert np.all(np.isfinite(got)), f"{what}: NaN or inf"
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    limit = (tol or TOL[dtype]) * scale
    assert err <= limit, f"{what}: max abs error {err:.3g} > {limit:.3g}"


def draw(rng, shape, magnitude=None):
    if magnitude is None:
        return rng.normal(size=shape).astype(np.float32)
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(magnitude, 1.25 * magnitude, size=shape)).astype(np.float32)


def qkv(rng, b, hq, hkv, sq, skv, dk, dv, magnitude=None):
    return draw(rng, (b, hq, sq, dk), magnitude), draw(rng, (b, hkv, skv, dk), magnitude), draw(rng, (b, hkv, skv, dv))


def padding(rng, b, skv):
    m = rng.random((b, skv)) < 0.7
    m[0, 0] = True
    if b > 1:
        m[-1] = False
    return m


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# -- LinearAttention ---------------------------------------------------------------------------------

LA_SHAPES = {  # B, Hq, Hkv, Sq, Skv, Dk, Dv
    "gqa_64": (2, 8, 2, 300, 300, 64, 64),
    "sq<skv_128": (1, 4, 4, 200, 1000, 128, 128),
    "sq>skv_odd": (2, 4, 1, 150, 90, 40, 24),
    "long": (1, 2, 1, 5000, 5000, 64, 64),
    "decode": (2, 4, 2, 1, 777, 64, 64),
    "dk_not_8": (1, 2, 1, 70, 70, 5, 3),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("shape", list(LA_SHAPES))
def test_linear_attention(shape, causal, dtype):
    b, hq, hkv, sq, skv, dk, dv = LA_SHAPES[shape]
    rng = seeded("la", shape, causal, dtype)
    q, k, v = qkv(rng, b, hq, hkv, sq, skv, dk, dv)
    mask = padding(rng, b, skv)
    for fm in ("elu1", "relu"):
        attrs = dict(causal=causal, feature_map=fm)
        feeds = {"Q_f32": q, "K_f32": k, "V_f32": v, "key_padding_mask": mask}
        model = build("LinearAttention", attrs, dtype, inputs=("Q", "K", "V", "key_padding_mask"),
                      with_functions=dtype != "bfloat16")
        got = session(model).run(None, feeds)[0]
        ref = linear_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype), mask, causal=causal,
                               feature_map=fm)
        check(got, ref, dtype, f"CUDA LinearAttention {shape} causal={causal} {fm} {dtype}")
        if dtype != "bfloat16" and sq * skv <= 1_000_000:  # the function (CPU, no library) is quadratic
            fn = session(model, providers=["CPUExecutionProvider"], with_library=False).run(None, feeds)[0]
            check(got, np.asarray(fn, np.float64), dtype, "CUDA kernel vs ONNX function")
        if b > 1:
            assert np.all(got[-1] == 0), "a fully padded batch row must give zeros"


def test_linear_attention_simt_path_matches(monkeypatch):
    """ATTNEXPORT_CUDA_FORCE_SIMT=1 (read at kernel creation) runs the float32 CUDA-core kernels for
    float16 too: both paths agree with the reference on the same inputs."""
    rng = seeded("la-simt")
    q, k, v = qkv(rng, 1, 4, 2, 700, 700, 64, 64)
    feeds = {"Q_f32": q, "K_f32": k, "V_f32": v}
    model = build("LinearAttention", dict(causal=1), "float16", inputs=("Q", "K", "V"), with_functions=False)
    ref = linear_attention(rounded(q, "float16"), rounded(k, "float16"), rounded(v, "float16"), causal=1)
    fast = session(model).run(None, feeds)[0]
    monkeypatch.setenv("ATTNEXPORT_CUDA_FORCE_SIMT", "1")
    simt = session(model).run(None, feeds)[0]
    check(fast, ref, "float16", "mma path")
    check(simt, ref, "float16", "simt path")


def test_linear_attention_edge_cases():
    """Large magnitudes, rows before the first key, eps = 0 with relu: finite, and zeros where no
    weight is left."""
    rng = seeded("la-edge")
    q, k, v = qkv(rng, 2, 2, 2, 300, 200, 128, 128, magnitude=60.0)
    mask = padding(rng, 2, 200)
    feeds = {"Q_f32": q, "K_f32": k, "V_f32": v, "key_padding_mask": mask}
    for dtype in ("float16", "bfloat16"):
        for fm, eps in (("elu1", 1e-6), ("relu", 0.0)):
            model = build("LinearAttention", dict(causal=1, feature_map=fm, eps=eps), dtype,
                          inputs=("Q", "K", "V", "key_padding_mask"), with_functions=False)
            got = session(model).run(None, feeds)[0]
            ref = linear_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype), mask, causal=1,
                                   feature_map=fm, eps=eps)
            check(got, ref, dtype, f"edge {fm} eps={eps} {dtype}")
            assert np.all(got[:, :, :100] == 0) and np.all(got[-1] == 0)


def test_linear_attention_unsupported_feature_map_is_one_error():
    model = build("LinearAttention", dict(feature_map="taylor2"), "float16", inputs=("Q", "K", "V"),
                  with_functions=False)
    with pytest.raises(Exception, match="feature_map 'taylor2' has no CUDA kernel"):
        session(model).run(None, {"Q_f32": np.ones((1, 1, 4, 8), np.float32), "K_f32": np.ones((1, 1, 4, 8), np.float32),
                                  "V_f32": np.ones((1, 1, 4, 8), np.float32)})


def test_bad_shapes_are_one_error_on_cuda():
    model = build("LinearAttention", {}, "float16", inputs=("Q", "K", "V"), with_functions=False)
    sess = session(model)
    with pytest.raises(Exception, match="K head dim 4 != Q head dim 8"):
        sess.run(None, {"Q_f32": np.ones((1, 1, 4, 8), np.float32), "K_f32": np.ones((1, 1, 4, 4), np.float32),
                        "V_f32": np.ones((1, 1, 4, 8), np.float32)})


# -- SparseAttention ---------------------------------------------------------------------------------

SPARSE_CASES = {  # B, Hq, Hkv, Sq, Skv, Dk, Dv, attributes, bias shape
    "window_gqa": (2, 8, 2, 700, 700, 64, 64, dict(window_left=64, window_right=64), None),
    "causal_full_128": (1, 4, 4, 600, 600, 128, 128, dict(causal=1), None),
    "causal_window_globals": (2, 4, 1, 500, 800, 64, 64, dict(causal=1, window_left=100, num_global=2), None),
    "dilated_random": (1, 4, 2, 400, 400, 64, 64, dict(window_left=40, window_right=40, dilation=3, block_size=32,
                                                        num_random_blocks=2, seed=5), None),
    "bias": (2, 4, 4, 300, 300, 64, 64, dict(window_left=32, window_right=0), (2, 1, 300, 300)),
    "odd_dims": (1, 2, 1, 130, 150, 20, 12, dict(causal=1, window_left=16), None),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_attention(case, dtype):
    b, hq, hkv, sq, skv, dk, dv, attrs, bias_shape = SPARSE_CASES[case]
    rng = seeded("sparse", case, dtype)
    q, k, v = qkv(rng, b, hq, hkv, sq, skv, dk, dv)
    mask = padding(rng, b, skv)
    feeds = {"Q_f32": q, "K_f32": k, "V_f32": v, "key_padding_mask": mask}
    names = ["Q", "K", "V", "key_padding_mask"]
    bias = None
    if bias_shape:
        raw = (rng.normal(size=bias_shape) * 2).astype(np.float32)
        raw[..., 0] = -np.inf
        feeds["attn_bias_f32"] = raw
        names.append("attn_bias")
        bias = rounded(raw, dtype)
    model = build("SparseAttention", attrs, dtype, inputs=tuple(names), with_functions=dtype != "bfloat16")
    got = session(model).run(None, feeds)[0]
    ref = sparse_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype), mask, bias, **attrs)
    check(got, ref, dtype, f"CUDA SparseAttention {case} {dtype}")
    if dtype != "bfloat16":
        fn = session(model, providers=["CPUExecutionProvider"], with_library=False).run(None, feeds)[0]
        check(got, np.asarray(fn, np.float64), dtype, "CUDA kernel vs ONNX function")
    assert np.all(got[-1] == 0) if b > 1 else True


# -- LseAttention ------------------------------------------------------------------------------------

LSE_CASES = {  # B, Hq, Hkv, Sq, Skv, Dk, Dv, causal, past, magnitude
    "noncausal_past": (2, 4, 2, 300, 500, 32, 32, 0, True, None),
    "causal_past": (2, 4, 2, 400, 400, 64, 64, 1, True, None),
    "causal_sq>skv": (1, 4, 4, 100, 60, 16, 40, 1, True, None),
    "decode": (2, 4, 2, 1, 1, 64, 64, 1, True, None),
    "magnitude300": (1, 2, 1, 200, 200, 8, 8, 1, True, 300.0),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(LSE_CASES))
def test_lse_attention(case, dtype):
    b, hq, hkv, sq, skv, dk, dv, causal, with_past, magnitude = LSE_CASES[case]
    rng = seeded("lse", case, dtype)
    q, k, v = qkv(rng, b, hq, hkv, sq, skv, dk, dv, magnitude)
    mask = padding(rng, b, skv) if skv > 1 else None
    scale = 1.0 / math.sqrt(dk)
    feeds = {"Q_f32": q, "K_f32": k, "V_f32": v}
    names = ["Q", "K", "V"]
    if mask is not None:
        feeds["key_padding_mask"] = mask
        names.append("key_padding_mask")
    past = None
    if with_past:
        _, past = lse_attention(draw(rng, (b, hq, 3, dk), magnitude), draw(rng, (b, hkv, 3, dk), magnitude),
                                draw(rng, (b, hkv, 3, dv)), scale=scale, return_state=True)
        feeds["past_state"] = past.astype(np.float32)
        names.append("past_state")
    model = build("LseAttention", dict(causal=causal), dtype, inputs=tuple(names), with_functions=False)
    got, present = session(model).run(None, feeds)
    ref, ref_state = lse_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype), mask,
                                   None if past is None else feeds["past_state"].astype(np.float64), scale=scale,
                                   causal=causal, return_state=True)
    check(got, ref, dtype, f"CUDA LseAttention {case} {dtype}", tol=1e-4 if dtype == "float32" and magnitude else None)
    s_got, z_got, m_got = lse_state_parts(present, dv)
    s_ref, z_ref, m_ref = lse_state_parts(ref_state, dv)
    np.testing.assert_allclose(z_got, z_ref, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(s_got, s_ref, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(s_ref).max())))
    held = np.isfinite(m_ref)
    np.testing.assert_allclose(m_got[held], m_ref[held], rtol=1e-6, atol=1e-5)


# -- placement: attnexport nodes on the GPU, no host copies around them --------------------------------

def test_every_op_runs_on_cuda(tmp_path):
    rng = seeded("placement")
    q, k, v = qkv(rng, 1, 2, 1, 64, 64, 64, 64)
    for op in ("LinearAttention", "SparseAttention", "LseAttention"):
        model = build(op, {}, "float16", inputs=("Q", "K", "V"), with_functions=False)
        placed = node_providers(model, {"Q_f32": q, "K_f32": k, "V_f32": v}, str(tmp_path))
        assert (op, "CUDAExecutionProvider") in placed, placed
        copies = [p for p in placed if p[0].startswith("Memcpy")]
        assert not copies, f"{op}: host copies {copies}"


# -- end to end: converted real exports run on the CUDA provider ---------------------------------------

E2E = [("bert", "linear"), ("gpt2", "linear"), ("llama", "linear"), ("vit", "linear"),
       ("bert", "sparse"), ("gpt2", "sparse"), ("llama", "lse"), ("gpt2", "lse")]


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", E2E, ids=[f"{a}-{m}" for a, m in E2E])
def test_convert_and_verify_on_cuda(arch, method, zoo_model, tmp_path):
    """convert + verify with providers CUDA, CPU: the three-way check passes, every attnexport node runs
    on CUDA, and the converted model has no more host copies than the original on the same provider."""
    from attnexport import inputs, model_io
    from attnexport.methods import MethodOptions

    source = zoo_model(arch, "dynamo18")
    out = tmp_path / f"{arch}.{method}.onnx"
    options = MethodOptions(window=4) if method == "sparse" else None
    result = attnexport.convert(source, out, method=method, options=options)
    assert result.replaced > 0
    report = attnexport.verify(source, out, providers=CUDA)  # kernel (CUDA) vs function (CPU) at round-off
    failed = [c for c in report.comparisons if not c.passed]
    assert not failed, [(c.name, c.problems) for c in failed]

    feeds = inputs.synthesize(model_io.load(source), inputs.ProbeShape(batch=2, seq_len=16))
    placed = node_providers(str(out), feeds, str(tmp_path))
    ours = [p for p in placed if p[0] in schema.SCHEMAS]
    assert ours and all(p[1] == "CUDAExecutionProvider" for p in ours), ours
    before = [p for p in node_providers(str(source), feeds, str(tmp_path), with_library=False)
              if p[0].startswith("Memcpy")]
    after = [p for p in placed if p[0].startswith("Memcpy")]
    assert len(after) <= len(before), f"conversion added host copies: {before} -> {after}"


def test_inference_session_on_cuda():
    """attnexport.InferenceSession with providers CUDA, CPU runs a converted node on the GPU."""
    rng = seeded("session")
    q, k, v = qkv(rng, 1, 2, 1, 32, 32, 64, 64)
    model = build("LinearAttention", {}, "float16", inputs=("Q", "K", "V"), with_functions=True)
    sess = attnexport.InferenceSession(model, providers=CUDA)
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    got = sess.run(None, {"Q_f32": q, "K_f32": k, "V_f32": v})[0]
    check(got, linear_attention(rounded(q, "float16"), rounded(k, "float16"), rounded(v, "float16")), "float16",
          "InferenceSession")
