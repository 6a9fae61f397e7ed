"""SparseAttention's three forms agree: the CPU kernel (ONNX Runtime with the op library), the ONNX
function (ONNX Runtime without it, and onnx.reference) and the numpy reference, on random shapes and
patterns and on the edge cases: windows wider than the sequence, dilation > window, more globals than
positions, Sq != Skv both ways, GQA, fully padded rows, BigBird random blocks, attn_bias of every
broadcast shape, float16, and every ISA variant of the kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnexport.errors import UnsupportedError
from attnexport.ops import reference as ref
from attnexport.ops import sparse_attention as sa
from attnexport.ops.functions import attach_functions, reference_evaluator
from ortutil import session

ATTRIBUTES = ("scale", "causal", "window_left", "window_right", "dilation", "num_global", "block_size",
              "num_random_blocks", "seed")


@dataclass
class Case:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 9
    kv_len: int = 9
    head_dim: int = 8
    value_dim: int = 8
    attrs: dict = field(default_factory=dict)
    mask: bool = False
    bias: tuple | None = None  # attn_bias shape, broadcastable to [B, Hq, Sq, Skv]
    pad_all: bool = False  # batch row 0 fully padded

    def feeds(self, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {
            "Q": rng.normal(size=(self.batch, self.q_heads, self.q_len, self.head_dim)).astype(dtype),
            "K": rng.normal(size=(self.batch, self.kv_heads, self.kv_len, self.head_dim)).astype(dtype),
            "V": rng.normal(size=(self.batch, self.kv_heads, self.kv_len, self.value_dim)).astype(dtype),
        }
        if self.mask:
            m = rng.random((self.batch, self.kv_len)) < 0.75
            if self.pad_all:
                m[0] = False
            out["M"] = m
        if self.bias is not None:
            bias = rng.normal(size=self.bias)
            if bias.size > 2:
                bias.flat[1] = -np.inf  # an additive mask entry
            out["A"] = bias.astype(dtype)
        return out

    def reference(self, feeds) -> np.ndarray:
        return ref.sparse_attention(feeds["Q"], feeds["K"], feeds["V"], feeds.get("M"), feeds.get("A"), **self.attrs)


def build(case: Case, opset: int = 18, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, dtype, ["b", f"h{n}", f"s{n}", f"d{n}"]) for n in "QKV"]
    names = ["Q", "K", "V", "", ""]
    if case.mask:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "sK"]))
        names[3] = "M"
    if case.bias is not None:
        inputs.append(helper.make_tensor_value_info("A", dtype, list(case.bias)))
        names[4] = "A"
    while not names[-1]:
        names.pop()
    node = helper.make_node("SparseAttention", names, ["Y"], domain="attnexport", name="sparse", **case.attrs)
    graph = helper.make_graph([node], "sparse", inputs, [helper.make_tensor_value_info("Y", dtype, ["b", "hQ", "sQ", "dV"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return attach_functions(model)


def attrs(**values) -> dict:
    out = {"scale": float("nan")}
    out.update(values)
    return out


EDGE_CASES = {
    "window_wider_than_sequence": Case(attrs=attrs(window_left=50, window_right=70)),
    "dilation_gt_window": Case(q_len=20, kv_len=20, attrs=attrs(window_left=3, window_right=2, dilation=5)),
    "dilation_with_globals": Case(q_len=24, kv_len=24, attrs=attrs(window_left=9, window_right=9, dilation=3, num_global=2)),
    "globals_gt_n": Case(attrs=attrs(window_left=1, window_right=1, num_global=40)),
    "sq_lt_skv_causal": Case(q_len=5, kv_len=17, attrs=attrs(causal=1, window_left=4, num_global=1)),
    "sq_gt_skv": Case(q_len=17, kv_len=6, attrs=attrs(window_left=2, window_right=3, num_global=2)),
    "sq_gt_skv_causal": Case(q_len=17, kv_len=6, attrs=attrs(causal=1, window_left=2)),
    "gqa4_window": Case(q_heads=8, kv_heads=2, q_len=30, kv_len=30, attrs=attrs(window_left=4, window_right=4)),
    "mqa_causal_full": Case(q_heads=4, kv_heads=1, q_len=70, kv_len=70, attrs=attrs(causal=1)),
    "padded_rows": Case(mask=True, pad_all=True, attrs=attrs(window_left=2, window_right=2, num_global=1)),
    "no_key_in_window": Case(q_len=12, kv_len=12, attrs=attrs(window_left=0, window_right=0, causal=1, dilation=2)),
    "random_blocks": Case(q_len=40, kv_len=40, attrs=attrs(window_left=2, window_right=2, block_size=4,
                                                           num_random_blocks=2, seed=11)),
    "random_blocks_causal_sq_lt_skv": Case(q_len=9, kv_len=33, attrs=attrs(causal=1, window_left=3, block_size=5,
                                                                          num_random_blocks=3, seed=3)),
    "bias_full": Case(bias=(2, 4, 9, 9), attrs=attrs(window_left=3, window_right=1)),
    "bias_heads": Case(bias=(1, 4, 9, 9), attrs=attrs(causal=1)),
    "bias_keys": Case(bias=(2, 1, 1, 9), mask=True, attrs=attrs(window_left=4, window_right=4)),
    "bias_2d": Case(bias=(9, 9), attrs=attrs(num_global=1, window_left=2, window_right=2)),
    "bias_scalar": Case(bias=(1,), attrs=attrs(window_left=2, window_right=2)),
    "dk_ne_dv_scale": Case(head_dim=5, value_dim=3, attrs=attrs(scale=0.7, window_left=3, window_right=3)),
    "long_tiles": Case(batch=1, q_heads=2, kv_heads=1, q_len=300, kv_len=300, head_dim=16, value_dim=16,
                       attrs=attrs(window_left=70, window_right=30, num_global=3)),
    "long_tiles_causal_dilated": Case(batch=1, q_heads=2, kv_heads=2, q_len=200, kv_len=260, head_dim=16,
                                      value_dim=24, mask=True, attrs=attrs(causal=1, window_left=90, dilation=4,
                                                                           num_global=2, block_size=16,
                                                                           num_random_blocks=1)),
}


def random_cases(count: int, seed: int = 1) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        kv_heads = int(rng.integers(1, 3))
        q_len = int(rng.integers(1, 140))
        kv_len = q_len if rng.random() < 0.5 else int(rng.integers(1, 140))
        block = int(rng.choice([0, 4, 16]))
        case = Case(
            batch=int(rng.integers(1, 3)), kv_heads=kv_heads, q_heads=kv_heads * int(rng.integers(1, 4)), q_len=q_len,
            kv_len=kv_len, head_dim=int(rng.integers(1, 20)), value_dim=int(rng.integers(1, 20)),
            mask=bool(rng.random() < 0.5),
            attrs=attrs(causal=int(rng.integers(0, 2)), window_left=int(rng.choice([-1, 0, 1, 5, 33, 500])),
                        window_right=int(rng.choice([-1, 0, 2, 7, 400])), dilation=int(rng.choice([1, 1, 2, 3])),
                        num_global=int(rng.choice([0, 0, 1, 3, 200])), block_size=block,
                        num_random_blocks=int(rng.integers(1, 3)) if block else 0, seed=int(rng.integers(0, 1000))),
        )
        if rng.random() < 0.3:
            case.bias = (1, case.q_heads, case.q_len, case.kv_len)
        cases.append(case)
    return cases


def three_way(case: Case, *, seed: int = 0) -> tuple[float, float]:
    feeds = case.feeds(seed=seed)
    model = build(case)
    expected = case.reference(feeds)
    kernel = session(model, with_library=True).run(None, feeds)[0]
    function = session(model, with_library=False).run(None, feeds)[0]
    assert np.isfinite(kernel).all() and np.isfinite(function).all()
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    return float(np.abs(kernel - expected).max() / scale) if expected.size else 0.0, \
        float(np.abs(function - expected).max() / scale) if expected.size else 0.0


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_agree(name):
    kernel_err, function_err = three_way(EDGE_CASES[name])
    assert kernel_err < 2e-5, f"kernel vs numpy {kernel_err:.2e}"
    assert function_err < 2e-5, f"function vs numpy {function_err:.2e}"


@pytest.mark.parametrize("index", range(4))
def test_random_shapes_and_patterns_agree(index):
    for case in random_cases(40, seed=100 + index)[index * 10:(index + 1) * 10]:
        kernel_err, function_err = three_way(case, seed=index)
        assert kernel_err < 2e-5 and function_err < 2e-5, f"{case}: kernel {kernel_err:.2e}, function {function_err:.2e}"


def test_fully_padded_and_empty_rows_give_zeros():
    case = EDGE_CASES["padded_rows"]
    feeds = case.feeds()
    y = session(build(case), with_library=True).run(None, feeds)[0]
    assert np.all(y[0] == 0.0)
    # Window 0 with dilation 2 and causal: every row sees its own key only... and nothing when padded.
    case = Case(mask=True, pad_all=True, attrs=attrs(window_left=0, window_right=0))
    y = session(build(case), with_library=True).run(None, case.feeds())[0]
    assert np.all(y[0] == 0.0) and np.isfinite(y).all()


def test_pattern_semantics_by_hand():
    # Window [-1, +1] with one global position, Sq == Skv == 6.
    p = ref.sparse_pattern(6, 6, window_left=1, window_right=1, num_global=1).astype(int)
    expected = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 0, 1, 1, 1, 0],
                         [1, 0, 0, 1, 1, 1],
                         [1, 0, 0, 0, 1, 1]])
    assert np.array_equal(p, expected)
    # Causal, bottom-right aligned with a KV cache: the last query is at position Skv - 1.
    p = ref.sparse_pattern(2, 5, causal=1, window_left=1)
    assert p.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    # Dilation thins the window only; globals stay visible whatever their offset.
    p = ref.sparse_pattern(1, 9, window_left=8, window_right=0, dilation=3, num_global=2)
    assert np.flatnonzero(p[0]).tolist() == [0, 1, 2, 5, 8]


def test_random_blocks_are_the_documented_hash():
    m = ref.RANDOM_BLOCK_MODULUS

    def step(h, v):
        t = (h + v) % m
        return 48271 * (t * t % m) % m

    for seed, qb, r, nkb in [(0, 0, 0, 7), (12345, 31, 2, 1000), (2**40, 4095, 7, 3)]:
        assert ref.random_key_block(seed, qb, r, nkb) == step(step(seed % m, qb + 1), r + 1) % nkb
    p = ref.sparse_pattern(16, 16, window_left=0, window_right=0, block_size=4, num_random_blocks=1, seed=5)
    for i in range(16):
        block = ref.random_key_block(5, i // 4, 0, 4)
        assert p[i, block * 4:(block + 1) * 4].all()


@pytest.mark.parametrize("opset", [13, 15, 21, 23])
def test_function_at_every_opset_and_onnx_reference(opset):
    case = EDGE_CASES["random_blocks_causal_sq_lt_skv"]
    case = Case(**{**case.__dict__, "mask": True, "bias": (1, 1, case.q_len, case.kv_len)})
    feeds = case.feeds()
    model = build(case, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    expected = case.reference(feeds)
    y_ort = session(model, with_library=False).run(None, feeds)[0]
    y_ref = reference_evaluator(model).run(None, feeds)[0]
    assert np.abs(y_ort - expected).max() < 2e-5
    assert np.abs(y_ref - expected).max() < 2e-5


def test_float16_accumulates_in_float32():
    case = Case(q_len=64, kv_len=80, head_dim=32, value_dim=32, mask=True, bias=(1, 4, 64, 80),
                attrs=attrs(causal=1, window_left=20, num_global=2))
    feeds = case.feeds(dtype=np.float16)
    model = build(case, opset=18, dtype=TensorProto.FLOAT16)
    expected = case.reference({k: v.astype(np.float64) if v.dtype == np.float16 else v for k, v in feeds.items()})
    kernel = session(model, with_library=True).run(None, feeds)[0]
    function = session(model, with_library=False).run(None, feeds)[0]
    assert kernel.dtype == np.float16
    assert np.abs(kernel.astype(np.float64) - expected).max() < 2e-3
    assert np.abs(function.astype(np.float64) - expected).max() < 2e-3


def test_mixed_nodes_share_one_function_with_placeholders():
    # One node with mask and bias, one without: attach_functions gives the second placeholders.
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "h", "s", "d"]) for n in "QKV"]
    inputs += [helper.make_tensor_value_info("M", TensorProto.BOOL, ["b", "s"]),
               helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, "h", "s", "s"])]
    nodes = [helper.make_node("SparseAttention", ["Q", "K", "V", "M", "A"], ["Y0"], domain="attnexport",
                              window_left=2, window_right=2),
             helper.make_node("SparseAttention", ["Q", "K", "V"], ["Y1"], domain="attnexport", causal=1, num_global=1)]
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("Y0", "Y1")]
    model = attach_functions(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                                               opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    case = Case(batch=2, q_heads=2, kv_heads=2, q_len=10, kv_len=10, mask=True, bias=(1, 2, 10, 10))
    feeds = case.feeds()
    y0, y1 = session(model, with_library=False).run(None, feeds)
    k0, k1 = session(model, with_library=True).run(None, feeds)
    e0 = ref.sparse_attention(feeds["Q"], feeds["K"], feeds["V"], feeds["M"], feeds["A"], window_left=2, window_right=2)
    e1 = ref.sparse_attention(feeds["Q"], feeds["K"], feeds["V"], causal=1, num_global=1)
    for got, want in ((y0, e0), (y1, e1), (k0, e0), (k1, e1)):
        assert np.abs(got - want).max() < 2e-5


@pytest.mark.parametrize("bad", [dict(dilation=0), dict(window_left=-2), dict(num_global=-1), dict(seed=-3)])
def test_invalid_attributes_are_refused(bad):
    case = Case(attrs=attrs(**bad))
    with pytest.raises(UnsupportedError):
        build(case)
    with pytest.raises(ValueError):
        ref.sparse_pattern(4, 4, **{k: v for k, v in bad.items()})
    # The kernel refuses them too (a model written by hand, without attach_functions' checks).
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in "QKV"]
    node = helper.make_node("SparseAttention", ["Q", "K", "V"], ["Y"], domain="attnexport", **bad)
    model = helper.make_model(helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("attnexport", 1)], ir_version=8)
    with pytest.raises(Exception, match="SparseAttention"):
        session(model, with_library=True).run(None, {n: np.zeros((1, 1, 4, 4), np.float32) for n in "QKV"})


_ISA_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_sparse_attention_op as t
errors = []
for case in list(t.EDGE_CASES.values()) + t.random_cases(12, seed=7):
    feeds = case.feeds()
    y = t.session(t.build(case), with_library=True).run(None, feeds)[0]
    want = case.reference(feeds)
    errors.append(float(np.abs(y - want).max() / max(1.0, float(np.abs(want).max()) if want.size else 1.0)) if want.size else 0.0)
print(json.dumps(max(errors)))
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_variant_agrees(isa):
    # ATTNEXPORT_CPU_ISA caps the variant (a cap above what the CPU has runs the best it has).
    env = dict(os.environ, ATTNEXPORT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-P", "-c", _ISA_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) < 2e-5
