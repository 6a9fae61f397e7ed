"""Hand-built attention graphs in the many shapes exporters produce, for matcher tests, large-model
tests and the fuzzer.

`AttentionSpec` describes one attention block (x → projections → heads → attention → merge → output);
`build(spec)` returns an onnx.ModelProto, and `expectation(spec)` what attnexport should say about it.
Every variant computes a well-defined attention, so a correct conversion must verify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# how K reaches its transposed form: as [B, H, S, D], via [B, S, H, D], via a [B*H, S, D] round trip
# (merged3d), or with every product in 3-D [B*H, S, *] (merged_all)
LAYOUTS = ("bhsd", "bshd", "merged3d", "merged_all")
SCALES = ("after_mul", "after_div", "q_mul", "split_sqrt", "runtime_shape", "none")
PRODUCTS = ("matmul", "fused_matmul", "einsum")
MASKS = ("none", "padding_mul", "padding_where", "causal_trilu", "causal_range", "causal_const",
         "causal_padding", "window", "alibi")
GQA = ("none", "expand", "tile")


@dataclass(frozen=True)
class AttentionSpec:
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 4
    dtype: str = "float32"  # or "float16"
    layout: str = "bhsd"
    scale: str = "after_mul"
    product: str = "matmul"
    mask: str = "none"
    gqa: str = "none"
    nan_guard: bool = False
    softmax_cast: bool = False  # float16: Cast to float32 around the Softmax
    softcap: float = 0.0
    in_function: bool = False  # the attention block lives in a model-local function
    kv_cache: bool = False  # past_key/past_value graph inputs concatenated before the product
    cross: bool = False  # K and V from a second input (encoder states)
    window: int = 3
    opset: int = 18
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _np_dtype(spec):
    return np.float16 if spec.dtype == "float16" else np.float32


def _onnx_dtype(spec):
    return TensorProto.FLOAT16 if spec.dtype == "float16" else TensorProto.FLOAT


class _Builder:
    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.rng = np.random.default_rng(spec.seed)

    def name(self, stem):
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, array, stem="c"):
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, stem=None, domain="", n_out=1, **attrs):
        outs = [self.name(stem or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, rows, cols):
        return self.const((self.rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(_np_dtype(self.spec)), "w")


def _heads_4d(b: _Builder, x: str, heads: int, layout: str) -> str:
    """[B, S, H*D] → [B, H, S, D] (or [B, S, H, D] for layout bshd)."""
    split = b.op("Reshape", [x, b.const(np.array([0, 0, heads, -1], np.int64))])
    if layout == "bshd":
        return split
    return b.op("Transpose", [split], perm=[0, 2, 1, 3])


def _expand_kv(b: _Builder, x: str, spec: AttentionSpec) -> str:
    """Grouped KV heads [B, Hkv, S, D] → [B, Hq, S, D] the way exporters do it."""
    group = spec.heads // spec.kv_heads
    if spec.gqa == "none" or group == 1:
        return x
    if spec.gqa == "expand":  # Unsqueeze → Expand → Reshape: head h reads kv head h // group
        unsq = b.op("Unsqueeze", [x, b.const(np.array([2], np.int64))])
        shape = b.op("Shape", [unsq])
        target = b.op("Mul", [shape, b.const(np.array([1, 1, group, 1, 1], np.int64))])
        expanded = b.op("Expand", [unsq, target])
        merged = b.op("Reshape", [expanded, b.const(np.array([0, spec.heads, -1, spec.head_dim], np.int64))])
        return merged
    # Tile repeats the whole head axis: head h reads kv head h % Hkv
    return b.op("Tile", [x, b.const(np.array([1, group, 1, 1], np.int64))])


def build(spec: AttentionSpec) -> onnx.ModelProto:
    b = _Builder(spec)
    dt = _onnx_dtype(spec)
    seq = spec.extra.get("static_len", 8) if spec.mask == "causal_const" else "sequence"
    total = seq if spec.mask == "causal_const" else "total_sequence"
    inputs = [helper.make_tensor_value_info("x", dt, ["batch", seq, spec.hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", total])]
    kv_in = "x"
    if spec.cross:
        inputs.append(helper.make_tensor_value_info("encoder_states", dt, ["batch", "encoder_sequence", spec.hidden]))
        kv_in = "encoder_states"
    d = spec.head_dim
    q = _heads_4d(b, b.op("MatMul", ["x", b.weight(spec.hidden, spec.hidden)]), spec.heads, "bhsd")
    k = _heads_4d(b, b.op("MatMul", [kv_in, b.weight(spec.hidden, spec.kv_heads * d)]), spec.kv_heads, "bhsd")
    v = _heads_4d(b, b.op("MatMul", [kv_in, b.weight(spec.hidden, spec.kv_heads * d)]), spec.kv_heads, "bhsd")
    outputs = []
    if spec.kv_cache:
        for tag, cur in (("key", "k"), ("value", "v")):
            inputs.append(helper.make_tensor_value_info(f"past_{tag}", dt, ["batch", spec.kv_heads, "past_sequence", d]))
        k = b.op("Concat", ["past_key", k], axis=2)
        v = b.op("Concat", ["past_value", v], axis=2)
        cache_shape = ["batch", spec.kv_heads, "total_sequence", d]
        outputs += [helper.make_tensor_value_info(k, dt, cache_shape), helper.make_tensor_value_info(v, dt, cache_shape)]
    block_inputs = [q, k, v, "attention_mask"]
    if spec.in_function:
        y = _attention_in_function(b, spec, block_inputs)
    else:
        y = _attention(b, spec, *block_inputs)
    merged = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, -1], np.int64))])
    out = b.op("MatMul", [merged, b.weight(spec.hidden, spec.hidden)], stem="output")
    outputs.insert(0, helper.make_tensor_value_info(out, dt, ["batch", seq, spec.hidden]))
    graph = helper.make_graph(b.nodes, "attention", inputs, outputs, b.initializers)
    functions = b.extra_functions if hasattr(b, "extra_functions") else []
    imports = [helper.make_opsetid("", spec.opset)]
    if spec.product == "fused_matmul":
        imports.append(helper.make_opsetid("com.microsoft", 1))
    if functions:
        imports.append(helper.make_opsetid("local", 1))
    model = helper.make_model(graph, opset_imports=imports, functions=functions)
    model.ir_version = 9 if spec.opset < 21 else 10
    return model


def _attention_in_function(b: _Builder, spec: AttentionSpec, block_inputs) -> str:
    inner = _Builder(spec)
    inner.count = 1000
    y = _attention(inner, spec, "q", "k", "v", "mask")
    # Constants of the body become Constant nodes (functions have no initializers).
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inner.initializers]
    function = helper.make_function("local", "AttentionBlock", ["q", "k", "v", "mask"], [y], consts + inner.nodes,
                                    [helper.make_opsetid("", spec.opset), helper.make_opsetid("com.microsoft", 1)])
    b.extra_functions = [function]
    return b.op("AttentionBlock", block_inputs, domain="local")


def _attention(b: _Builder, spec: AttentionSpec, q: str, k: str, v: str, mask_input: str) -> str:
    d = spec.head_dim
    npdt = _np_dtype(spec)
    k = _expand_kv(b, k, spec)
    v = _expand_kv(b, v, spec)
    scale = 1.0 / math.sqrt(d)
    if spec.scale == "q_mul":
        q = b.op("Mul", [q, b.const(np.array(scale, npdt))])
    elif spec.scale == "split_sqrt":
        root = b.const(np.array(math.sqrt(scale), npdt))
        q = b.op("Mul", [q, root])
        k = b.op("Mul", [k, root])

    if spec.layout == "merged_all":
        return _attention_merged(b, spec, q, k, v, scale, mask_input)

    # the product
    if spec.product == "einsum":
        scores = b.op("Einsum", [q, k], equation="bhqd,bhkd->bhqk")
    else:
        if spec.layout == "bshd":
            k_bshd = b.op("Transpose", [k], perm=[0, 2, 1, 3])
            k_t = b.op("Transpose", [k_bshd], perm=[0, 2, 3, 1])
        elif spec.layout == "merged3d":
            tail = b.op("Slice", [b.op("Shape", [k]), b.const(np.array([2], np.int64)), b.const(np.array([4], np.int64))])
            k3 = b.op("Reshape", [k, b.op("Concat", [b.const(np.array([-1], np.int64)), tail], axis=0)])  # [B*H, S, D]
            k3t = b.op("Transpose", [k3], perm=[0, 2, 1])
            seq = b.op("Slice", [b.op("Shape", [k]), b.const(np.array([2], np.int64)), b.const(np.array([3], np.int64))])
            back = b.op("Concat", [b.const(np.array([-1, spec.heads, d], np.int64)), seq], axis=0)
            k_t = b.op("Reshape", [k3t, back])  # [B, H, D, S]
        else:
            k_t = k if spec.product == "fused_matmul" else b.op("Transpose", [k], perm=[0, 1, 3, 2])
        if spec.product == "fused_matmul":
            alpha = scale if spec.scale in ("after_mul", "after_div") else 1.0
            if spec.layout == "bhsd":
                scores = b.op("FusedMatMul", [q, k_t], domain="com.microsoft", transB=1, alpha=alpha)
            else:
                scores = b.op("FusedMatMul", [q, k_t], domain="com.microsoft", alpha=alpha)
        else:
            scores = b.op("MatMul", [q, k_t])
    if spec.product != "fused_matmul" or spec.scale not in ("after_mul", "after_div"):
        if spec.scale == "after_mul":
            scores = b.op("Mul", [scores, b.const(np.array(scale, npdt))])
        elif spec.scale == "after_div":
            scores = b.op("Div", [scores, b.const(np.array(math.sqrt(d), npdt))])
        elif spec.scale == "runtime_shape":
            shape = b.op("Shape", [q])
            dim = b.op("Gather", [shape, b.const(np.array(3, np.int64))], axis=0)
            root = b.op("Sqrt", [b.op("Cast", [dim], to=_onnx_dtype(spec))])
            scores = b.op("Div", [scores, root])
    if spec.softcap:
        cap = b.const(np.array(spec.softcap, npdt))
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, cap])]), cap])

    mask = _mask(b, spec, q, k, mask_input)
    if mask is not None:
        scores = b.op("Add", [scores, mask])
    if spec.softmax_cast:
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT)
    probs = b.op("Softmax", [scores], axis=-1)
    if spec.softmax_cast:
        probs = b.op("Cast", [probs], to=_onnx_dtype(spec))
    if spec.nan_guard:
        probs = b.op("Where", [b.op("IsNaN", [probs]), b.const(np.array(0, npdt)), probs])
    return b.op("MatMul", [probs, v], stem="attention_output")


def _merged(b: _Builder, x: str) -> str:
    """[B, H, S, D] → [B*H, S, D]."""
    tail = b.op("Slice", [b.op("Shape", [x]), b.const(np.array([2], np.int64)), b.const(np.array([4], np.int64))])
    return b.op("Reshape", [x, b.op("Concat", [b.const(np.array([-1], np.int64)), tail], axis=0)])


def _attention_merged(b: _Builder, spec: AttentionSpec, q: str, k: str, v: str, scale: float, mask_input: str) -> str:
    """Every product on [B*H, S, *] tensors (older exporters); masks broadcast as [1, Sq, Skv]."""
    npdt = _np_dtype(spec)
    shape4 = b.op("Shape", [q])
    q3, k3, v3 = _merged(b, q), _merged(b, k), _merged(b, v)
    scores = b.op("MatMul", [q3, b.op("Transpose", [k3], perm=[0, 2, 1])])
    if spec.scale in ("after_mul", "runtime_shape", "after_div"):
        scores = b.op("Mul", [scores, b.const(np.array(scale, npdt))])
    mask = _mask(b, spec, q, k, mask_input)
    if mask is not None:  # [Sq, Skv] patterns only (see the fuzzer's strategy)
        scores = b.op("Add", [scores, mask])
    probs = b.op("Softmax", [scores], axis=-1)
    y3 = b.op("MatMul", [probs, v3], stem="attention_output")
    return b.op("Reshape", [y3, shape4])


def _lengths(b: _Builder, q: str, k: str):
    q_len = b.op("Gather", [b.op("Shape", [q]), b.const(np.array(2, np.int64))], axis=0)
    k_len = b.op("Gather", [b.op("Shape", [k]), b.const(np.array(2, np.int64))], axis=0)
    return q_len, k_len


def _positions(b: _Builder, q: str, k: str):
    """(i' as a column [Sq, 1], j as a row [1, Skv]), bottom-right aligned: i' = i + Skv - Sq."""
    q_len, k_len = _lengths(b, q, k)
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    offset = b.op("Sub", [k_len, q_len])
    rows = b.op("Add", [b.op("Range", [zero, q_len, one]), offset])
    rows = b.op("Unsqueeze", [rows, b.const(np.array([1], np.int64))])
    cols = b.op("Unsqueeze", [b.op("Range", [zero, k_len, one]), b.const(np.array([0], np.int64))])
    return rows, cols, q_len, k_len


def _mask(b: _Builder, spec: AttentionSpec, q: str, k: str, mask_input: str) -> str | None:
    npdt = _np_dtype(spec)
    lowest = np.array(np.finfo(npdt).min, npdt)
    kind = spec.mask
    if kind == "none":
        return None
    padding = None
    if kind in ("padding_mul", "padding_where", "causal_padding"):
        m = b.op("Unsqueeze", [mask_input, b.const(np.array([1, 2], np.int64))])  # [B, 1, 1, T]
        if kind == "padding_mul":
            mf = b.op("Cast", [m], to=_onnx_dtype(spec))
            return b.op("Mul", [b.op("Sub", [b.const(np.array(1, npdt)), mf]), b.const(lowest)])
        padding = b.op("Cast", [m], to=TensorProto.BOOL)
        if kind == "padding_where":
            return b.op("Where", [padding, b.const(np.array(0, npdt)), b.const(lowest)])
    if kind == "causal_trilu":
        _, _, q_len, k_len = _positions(b, q, k)
        shape = b.op("Concat", [b.op("Unsqueeze", [q_len, b.const(np.array([0], np.int64))]),
                                b.op("Unsqueeze", [k_len, b.const(np.array([0], np.int64))])], axis=0)
        full = b.op("Expand", [b.const(lowest), shape])
        # upper triangle above the bottom-right diagonal: Trilu(upper, k = Skv - Sq + 1)
        diag = b.op("Add", [b.op("Sub", [k_len, q_len]), b.const(np.array(1, np.int64))])
        return b.op("Trilu", [full, diag], upper=1)
    if kind == "causal_const":
        n = spec.extra.get("static_len", 8)
        tri = np.where(np.tril(np.ones((n, n), bool)), 0, lowest).astype(npdt)
        return b.const(tri)
    rows, cols, _, _ = _positions(b, q, k)
    if kind == "window":
        dist = b.op("Sub", [rows, cols])
        hidden = b.op("Or", [b.op("Greater", [cols, rows]),
                             b.op("Greater", [dist, b.const(np.array(spec.window, np.int64))])])
        return b.op("Where", [hidden, b.const(lowest), b.const(np.array(0, npdt))])
    if kind == "alibi":
        slopes = np.array([2.0 ** (-(i + 1)) for i in range(spec.heads)], npdt).reshape(1, spec.heads, 1, 1)
        dist = b.op("Cast", [b.op("Sub", [cols, rows])], to=_onnx_dtype(spec))
        bias = b.op("Mul", [b.const(slopes), b.op("Unsqueeze", [dist, b.const(np.array([0, 1], np.int64))])])
        causal = b.op("Greater", [cols, rows])
        return b.op("Where", [causal, b.const(lowest), bias])
    # causal_range and causal_padding: Greater(j, i') hides the future
    future = b.op("Greater", [cols, rows])
    if padding is not None:
        visible = b.op("And", [b.op("Not", [future]), padding])
        return b.op("Where", [visible, b.const(np.array(0, npdt)), b.const(lowest)])
    return b.op("Where", [future, b.const(lowest), b.const(np.array(0, npdt))])


@dataclass(frozen=True)
class Expectation:
    replaceable: bool
    mask: str | None = None  # describe() of the mask
    reason: str = ""  # a fragment of the reason when not replaceable
    kv_heads: int | None = None


def expectation(spec: AttentionSpec) -> Expectation:
    """What inspect should report for the one site of `build(spec)` (linear method)."""
    if spec.softcap:
        return Expectation(False, reason="softcap")
    if spec.gqa == "tile" and spec.heads != spec.kv_heads:
        kv = spec.kv_heads
    else:
        kv = spec.kv_heads
    masks = {"none": "none", "padding_mul": "key_padding", "padding_where": "key_padding",
             "causal_trilu": "causal", "causal_range": "causal", "causal_const": "causal",
             "causal_padding": "causal+key_padding", "window": f"window[-{spec.window},+0]", "alibi": "bias"}
    return Expectation(True, masks[spec.mask], kv_heads=kv)


def feeds(spec: AttentionSpec, *, batch=2, seq=7, past=0, encoder_seq=5, seed=1, padding=False) -> dict:
    rng = np.random.default_rng(seed)
    npdt = _np_dtype(spec)
    total = past + seq if not spec.cross else encoder_seq
    out = {"x": rng.standard_normal((batch, seq, spec.hidden)).astype(npdt),
           "attention_mask": np.ones((batch, total), np.int64)}
    if padding:
        out["attention_mask"][0, total - 2:] = 0
    if spec.cross:
        out["encoder_states"] = rng.standard_normal((batch, encoder_seq, spec.hidden)).astype(npdt)
    if spec.kv_cache:
        for tag in ("key", "value"):
            out[f"past_{tag}"] = rng.standard_normal((batch, spec.kv_heads, past, spec.head_dim)).astype(npdt)
    return out


def with_(spec: AttentionSpec, **changes) -> AttentionSpec:
    return replace(spec, **changes)
