"""Graphs produced by optimizers: onnxruntime's transformer optimizer (com.microsoft Attention from
TorchScript exports of eager-attention BERT; GPT-2 stays decomposed among fused LayerNorms) and
onnxscript's ORT fusions on dynamo exports (com.microsoft Attention and MultiHeadAttention).

Each converts with linear attention and verifies; with `--method sparse` and each site's own pattern
the replacement is exact, which checks the fused ops' mask semantics (e.g. mask_index as valid
lengths) to float32 round-off, on padded inputs too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import attnexport
from attnexport.methods import METHODS


def export_eager(arch: str, path):
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from attnexport import zoo

    torch.manual_seed(0)
    if arch == "bert":
        model = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, attn_implementation="eager"))
    else:
        model = GPT2Model(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    spec = zoo.ARCHITECTURES[arch]
    wrapped = zoo._wrapper(model.eval(), spec)
    args = zoo.example_inputs(spec)
    with zoo._quiet(True), torch.no_grad():
        torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=17, input_names=list(spec.inputs),
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in spec.inputs})
    return path


@pytest.fixture(scope="module")
def ort_optimized(tmp_path_factory):
    from onnxruntime.transformers.optimizer import optimize_model

    root = tmp_path_factory.mktemp("ortopt")
    out = {}
    for arch in ("bert", "gpt2"):
        source = export_eager(arch, root / f"{arch}.onnx")
        optimized = optimize_model(str(source), model_type=arch, num_heads=4, hidden_size=64)
        optimized.save_model_to_file(str(root / f"{arch}_opt.onnx"))
        out[arch] = root / f"{arch}_opt.onnx"
    return out


def ops_of(path) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node}


def right_padded(batch=2, seq=10):
    rng = np.random.default_rng(3)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 3:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}


def test_ort_optimizer_bert_com_microsoft_attention(ort_optimized, tmp_path):
    path = ort_optimized["bert"]
    assert ("com.microsoft", "Attention") in ops_of(path)
    sites = attnexport.inspect(path)
    assert [s.source for s in sites] == ["com.microsoft.Attention"] * 2
    assert all(s.replaceable and s.mask.describe() == "key_padding" for s in sites)
    assert all(s.mask.key_padding_kind == "end_positions" for s in sites)
    out = tmp_path / "linear.onnx"
    attnexport.convert(path, out)
    assert attnexport.verify(path, out, seq_len=12).passed


@pytest.mark.skipif("sparse" not in METHODS, reason="the sparse method has not landed")
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_ort_optimizer_graphs_convert_exactly(arch, ort_optimized, tmp_path):
    path = ort_optimized[arch]
    out = tmp_path / "sparse.onnx"
    attnexport.convert(path, out, method="sparse")
    for feeds in (None, right_padded()):
        report = attnexport.verify(path, out, feeds=feeds, seq_len=12)
        assert report.exact and report.passed, [p for c in report.comparisons for p in c.problems]


@pytest.fixture(scope="module")
def onnxscript_fused(zoo_model, tmp_path_factory):
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for arch in ("bert", "llama", "vit", "gpt2"):
        model = ir.load(zoo_model(arch, "dynamo18"))
        fused, _ = optimize_for_ort(model)
        ir.save(fused, root / f"{arch}.onnx", external_data=f"{arch}.onnx.data")
        out[arch] = root / f"{arch}.onnx"
    return out


@pytest.mark.parametrize("arch,op", [("bert", "Attention"), ("vit", "Attention"), ("llama", "MultiHeadAttention")])
def test_onnxscript_fused_graphs_convert_and_verify(arch, op, onnxscript_fused, tmp_path):
    path = onnxscript_fused[arch]
    assert ("com.microsoft", op) in ops_of(path)
    sites = attnexport.inspect(path)
    assert len(sites) == 2 and all(s.replaceable for s in sites), [s.reason for s in sites]
    assert all(s.source == f"com.microsoft.{op}" for s in sites)
    out = tmp_path / "linear.onnx"
    attnexport.convert(path, out)
    assert attnexport.verify(path, out, seq_len=9, batch=1 if arch == "vit" else 2).passed
    if "sparse" in METHODS:
        exact = tmp_path / "sparse.onnx"
        attnexport.convert(path, exact, method="sparse")
        report = attnexport.verify(path, exact, seq_len=9)
        assert report.exact and report.passed, [p for c in report.comparisons for p in c.problems]


def test_an_optimizer_that_breaks_the_model_is_reported(onnxscript_fused):
    """onnxscript's fusion of this GPT-2 export produces a Gemm on a rank-3 input, which ONNX Runtime
    refuses to load; attnexport reports the sites with that reason instead of failing."""
    sites = attnexport.inspect(onnxscript_fused["gpt2"])
    assert sites and not any(s.replaceable for s in sites)
    assert all("probe" in s.reason for s in sites)
