"""convert --method sparse: exact where the model already is sparse or causal, approximate elsewhere.

Subjects: a transformers Mistral with a sliding window (40 keys, wider than the 7/12-token probes, so
only the long mask probe shows it), exported by dynamo (opset 18) and TorchScript (opset 17); GPT-2
with --window full (the causal kernel); a small module with an ALiBi-style additive bias; ONNX
Attention with a banded boolean mask built from Range/Sub/comparisons (opset 23) and with opset 25's
left/right_window_size; BERT with a window and a global token (approximate).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from attnexport import api, zoo
from attnexport.cli import main
from attnexport.errors import NoAttentionError
from attnexport.methods import MethodOptions

SLIDING_WINDOW = 40  # Mistral's sliding_window: each token sees itself and the 39 before it


def _mistral():
    from transformers import MistralConfig, MistralModel

    return MistralModel(MistralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      sliding_window=SLIDING_WINDOW, bos_token_id=0, eos_token_id=0, pad_token_id=0))


zoo.ARCHITECTURES.setdefault("mistral_sliding", zoo.Architecture("mistral_sliding", _mistral,
                                                                  ("input_ids", "attention_mask"), 2, causal=True))


def _convert(path, out, **options):
    layers = options.pop("layers", None)
    return api.convert(path, out, method="sparse", options=MethodOptions(**options), layers=layers)


def _verify_exact(original, converted, **kwargs):
    report = api.verify(original, converted, **kwargs)
    assert report.exact, "the plan should say exact"
    assert report.passed, [c.problems for c in report.comparisons]
    for c in report.comparisons:
        assert c.kernel_vs_original["rel"] < (1e-4 if c.kind == "site" else 1e-3), (c.name, c.kernel_vs_original)
    return report


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
def test_sliding_window_model_converts_exactly(zoo_model, tmp_path, exporter):
    path = zoo_model("mistral_sliding", exporter)
    result = _convert(path, tmp_path / "sparse.onnx")
    assert len(result.sites) == 2
    for site in result.sites:  # the long probe sees the window; at 7 and 12 tokens it looks causal
        assert site.mask.kind == "window", site.mask
        assert (site.mask.window_left, site.mask.window_right) == (SLIDING_WINDOW - 1, 0)
    for p in result.plan.selected:
        a = p.replacement.attributes
        assert (a["causal"], a["window_left"], a["window_right"]) == (1, SLIDING_WINDOW - 1, 0)
        assert p.replacement.exact
    _verify_exact(path, result.output_path, seq_len=100)  # longer than the window: it matters
    if exporter != "torchscript17":
        return  # (one export is enough for the rest; every conversion probes again)
    # A narrower --window than the model's is an approximation, and says so.
    narrower = _convert(path, tmp_path / "narrow.onnx", window=8)
    assert not narrower.plan.exact
    assert narrower.plan.selected[0].replacement.attributes["window_left"] == 8


def test_gpt2_window_full_is_the_exact_causal_kernel(zoo_model, tmp_path):
    path = zoo_model("gpt2", "dynamo18")
    out = tmp_path / "gpt2_full.onnx"
    result = CliRunner().invoke(main, ["convert", path, "-o", str(out), "--method", "sparse", "--window", "full", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    for site in plan["sites"]:
        assert site["action"] == "replace" and site["exact"]
        a = site["attributes"]
        assert (a["causal"], a["window_left"], a["window_right"]) == (1, -1, 0)
    _verify_exact(path, out, seq_len=60)


def test_window_on_causal_site_keeps_w_plus_one_keys(zoo_model, tmp_path):
    path = zoo_model("gpt2", "dynamo18")
    result = _convert(path, tmp_path / "w3.onnx", window=3, num_global=1)
    a = result.plan.selected[0].replacement.attributes
    assert (a["causal"], a["window_left"], a["window_right"], a["num_global"]) == (1, 3, 0, 1)
    assert not result.plan.exact
    report = api.verify(path, result.output_path, seq_len=30, tolerance=10.0)
    assert report.passed  # kernel and function agree; the approximation is measured
    # Applying a window changes a causal model on sequences longer than it.
    assert max(c.kernel_vs_original["rel"] for c in report.comparisons) > 1e-3


def test_bert_window_and_global_token(zoo_model, tmp_path):
    path = zoo_model("bert", "torchscript17")
    result = _convert(path, tmp_path / "bert_w.onnx", window=2, num_global=1, dilation=1)
    a = result.plan.selected[0].replacement.attributes
    assert (a["causal"], a["window_left"], a["window_right"], a["num_global"]) == (0, 2, 2, 1)
    assert not result.plan.exact
    assert api.verify(path, result.output_path, seq_len=24, tolerance=10.0).passed
    # --window full on a bidirectional site is plain exact attention.
    full = _convert(path, tmp_path / "bert_full.onnx", window=-1)
    assert full.plan.exact
    _verify_exact(path, full.output_path, seq_len=24)
    # --causal-only leaves bidirectional sites alone.
    with pytest.raises(NoAttentionError, match="not causal"):
        _convert(path, tmp_path / "none.onnx", window=4, causal_only=True)


def _alibi_module():
    import torch

    class AlibiAttention(torch.nn.Module):
        """One causal attention layer whose logits carry an ALiBi bias -slope_h * |i - j|."""

        def __init__(self, dim=32, heads=4):
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.out = torch.nn.Linear(dim, dim)
            self.register_buffer("slopes", torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)]))

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            pos = torch.arange(s)
            distance = (pos[None, :] - pos[:, None]).abs().to(x.dtype)
            causal = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
            bias = -self.slopes[:, None, None] * distance + causal  # [H, S, S]
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
            y = scores.softmax(-1) @ v
            return self.out(y.transpose(1, 2).reshape(b, s, -1))

    return AlibiAttention()


def test_additive_bias_is_passed_through_exactly(tmp_path):
    import torch

    torch.manual_seed(0)
    path = str(tmp_path / "alibi.onnx")
    with torch.no_grad():
        torch.onnx.export(_alibi_module().eval(), (torch.randn(2, 10, 32),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "sequence"},
                                                                              "y": {0: "batch", 1: "sequence"}})
    (site,) = api.inspect(path)
    assert site.mask.kind == "bias" and site.mask.causal
    result = _convert(path, tmp_path / "alibi_sparse.onnx", window=-1)
    replacement = result.plan.selected[0].replacement
    assert replacement.exact and replacement.value_inputs == {"attn_bias": site.mask.bias_value}
    model = onnx.load(result.output_path)
    (node,) = [n for n in model.graph.node if n.op_type == "SparseAttention"]
    assert node.input[4] == site.mask.bias_value
    _verify_exact(path, result.output_path, seq_len=33)
    # With a window the bias still applies inside it.
    windowed = _convert(path, tmp_path / "alibi_w.onnx", window=4)
    assert not windowed.plan.exact
    assert api.verify(path, windowed.output_path, seq_len=33, tolerance=10.0).passed


def _attention_model(path, opset, *, banded_mask: tuple[int, int] | None = None, **attrs):
    """x [B, S, 32] -> Q/K/V [B, 4, S, 8] -> ONNX Attention (-> Transpose, so the output is no site)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=(32, 32)) * 0.3).astype(np.float32), f"w{n}") for n in "qkv"]
    inits.append(numpy_helper.from_array(np.array([0, 0, 4, 8], np.int64), "heads"))
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]),
                  helper.make_node("Reshape", [f"{n}0", "heads"], [f"{n}1"]),
                  helper.make_node("Transpose", [f"{n}1"], [n], perm=[0, 2, 1, 3])]
    inputs = ["q", "k", "v"]
    if banded_mask is not None:  # bool [S, S]: -left <= j - i <= right, built from Range and comparisons
        left, right = banded_mask
        inits += [numpy_helper.from_array(np.array(v, np.int64), name) for v, name in
                  ((0, "zero"), (1, "one"), (-left, "neg_left"), (right, "right"), ([1], "axis1"), ([0], "axis0"))]
        nodes += [helper.make_node("Shape", ["x"], ["xs"], start=1, end=2),
                  helper.make_node("Squeeze", ["xs", "axis0"], ["s"]),
                  helper.make_node("Range", ["zero", "s", "one"], ["pos"]),
                  helper.make_node("Unsqueeze", ["pos", "axis1"], ["rows"]),
                  helper.make_node("Unsqueeze", ["pos", "axis0"], ["cols"]),
                  helper.make_node("Sub", ["cols", "rows"], ["offset"]),
                  helper.make_node("GreaterOrEqual", ["offset", "neg_left"], ["after_left"]),
                  helper.make_node("LessOrEqual", ["offset", "right"], ["before_right"]),
                  helper.make_node("And", ["after_left", "before_right"], ["band"])]
        inputs.append("band")
    nodes += [helper.make_node("Attention", inputs, ["y0"], **attrs),
              helper.make_node("Transpose", ["y0"], ["y"], perm=[0, 1, 2, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "sequence", 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("opset, band, attrs, expected", [
    (23, (20, 3), {}, (20, 3)),  # a boolean banded attn_mask wider than the short probes
    (25, None, {"left_window_size": 3, "right_window_size": 2}, (3, 2)),
    (25, None, {"is_causal": 1, "left_window_size": 5}, (5, 0)),
    (25, (1, 30), {"left_window_size": 4, "right_window_size": -1}, (1, 30)),  # the narrower of the two
])
def test_onnx_attention_windows_convert_exactly(tmp_path, opset, band, attrs, expected):
    path = _attention_model(str(tmp_path / "att.onnx"), opset, banded_mask=band, **attrs)
    (site,) = api.inspect(path)
    assert site.source == "onnx.Attention"
    assert (site.mask.window_left, site.mask.window_right) == expected, site.mask
    result = _convert(path, tmp_path / "att_sparse.onnx")
    a = result.plan.selected[0].replacement.attributes
    assert (a["window_left"], a["window_right"]) == expected
    _verify_exact(path, result.output_path, seq_len=45, batch=2)
