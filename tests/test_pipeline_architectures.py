"""The spine on models nobody here wrote: transformers BERT, GPT-2, LLaMA (GQA 8:2) and ViT in small
random configurations, each exported three ways. For each: inspect finds one site per layer; convert
replaces them all; the converted model runs in ONNX Runtime with and without the op library and the
two agree; verify passes; the input file is untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import attnexport
from attnexport import inputs, model_io, zoo
from attnexport.rewrite import recorded_plan
from ortutil import max_abs, session

# The spine's four architectures; tests/test_architecture_matrix.py covers the others.
CASES = [(arch, exporter) for arch in ("bert", "gpt2", "llama", "vit") for exporter in zoo.EXPORTERS]
EXPECTED_MASK = {"bert": "key_padding", "gpt2": "causal+key_padding", "llama": "causal+key_padding", "vit": "none"}
EXPECTED_KV_HEADS = {"bert": 4, "gpt2": 4, "llama": 2, "vit": 4}


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("arch,exporter", CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_inspect_convert_run_verify(arch, exporter, zoo_model, tmp_path):
    source = zoo_model(arch, exporter)
    before = _digest(source)
    spec = zoo.ARCHITECTURES[arch]

    sites = attnexport.inspect(source)
    assert len(sites) == spec.num_layers, [s.name for s in sites]
    for site in sites:
        assert site.replaceable, site.reason
        assert site.mask.describe() == EXPECTED_MASK[arch]
        assert site.num_kv_heads == EXPECTED_KV_HEADS[arch]
        assert site.scale == pytest.approx(1 / np.sqrt(site.head_dim), rel=1e-6)

    out = tmp_path / "converted.onnx"
    result = attnexport.convert(source, out, method="linear")
    assert result.replaced == spec.num_layers
    assert _digest(source) == before, "the input model was modified"

    converted = onnx.load(str(out))
    onnx.checker.check_model(converted, full_check=True)
    original = onnx.load(source)
    assert [i.name for i in converted.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in converted.graph.output] == [o.name for o in original.graph.output]
    ops = [n.op_type for n in converted.graph.node]
    assert ops.count("LinearAttention") == spec.num_layers
    assert "Softmax" not in ops and "Attention" not in ops
    assert recorded_plan(model_io.load(out))["method"] == "linear"

    feeds = inputs.synthesize(model_io.load(source), inputs.ProbeShape(batch=1 if (arch, exporter) == ("llama", "dynamo23") else 2, seq_len=9))
    with_kernels = session(converted, with_library=True).run(None, feeds)[0]
    with_functions = session(converted, with_library=False).run(None, feeds)[0]
    assert np.isfinite(with_kernels).all()
    assert max_abs(with_kernels, with_functions) <= 1e-4 * max(1.0, float(np.abs(with_functions).max()))

    report = attnexport.verify(source, out, seq_len=11, batch=1 if (arch, exporter) == ("llama", "dynamo23") else 2)
    assert report.passed, [p for c in report.comparisons for p in c.problems]
    assert _digest(source) == before


@pytest.mark.parametrize("arch,exporter", [("bert", "dynamo18"), ("gpt2", "torchscript17"), ("llama", "dynamo18"),
                                           ("bert", "dynamo23")])
def test_padded_keys_do_not_leak(arch, exporter, zoo_model, tmp_path):
    """Key padding is wired through: changing the token ids under padding leaves every real token's output
    unchanged, in the original and in the converted model (kernels and functions)."""
    source = zoo_model(arch, exporter)
    out = tmp_path / "converted.onnx"
    attnexport.convert(source, out, method="linear")
    feeds = inputs.synthesize(model_io.load(source), inputs.ProbeShape(batch=2, seq_len=12))
    mask = feeds["attention_mask"]
    mask[0, 9:] = 0   # right padding
    mask[1, :4] = 0   # left padding
    changed = dict(feeds)
    ids = feeds["input_ids"].copy()
    ids[mask == 0] = (ids[mask == 0] + 7) % 100
    changed["input_ids"] = ids
    real = mask.astype(bool)
    for model, with_library in ((source, False), (str(out), True), (str(out), False)):
        s = session(model, with_library=with_library)
        a = s.run(None, feeds)[0]
        b = s.run(None, changed)[0]
        assert max_abs(a[real], b[real]) <= 1e-5, (model, with_library)
        assert max_abs(a[~real], b[~real]) > 0, "the padded positions should have changed"


@pytest.mark.parametrize("feature_map,expansion_point", [("elu1", "zero"), ("relu", "zero"), ("taylor2", "zero"),
                                                        ("taylor2", "mean"), ("taylor2", "max"), ("favor", "zero")])
def test_every_feature_map_converts_and_verifies(feature_map, expansion_point, zoo_model, tmp_path):
    source = zoo_model("llama", "torchscript17")
    out = tmp_path / f"{feature_map}.onnx"
    options = attnexport.MethodOptions(feature_map=feature_map, expansion_point=expansion_point)
    attnexport.convert(source, out, method="linear", options=options)
    report = attnexport.verify(source, out, seq_len=10)
    assert report.passed, [p for c in report.comparisons for p in c.problems]
    outputs = [c for c in report.comparisons if c.kind == "output"]
    assert outputs and all(np.isfinite(c.kernel_vs_original["max_abs"]) for c in outputs)
