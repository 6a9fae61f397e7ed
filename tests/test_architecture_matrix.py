"""Breadth: the zoo's architectures beyond BERT, GPT-2, LLaMA and ViT (those are in
test_pipeline_architectures.py), each exported with one exporter (chosen so that every exporter and every
mask form appears; scripts/architecture_matrix.py runs all three for the README's table).

For each: inspect finds one site per attention layer (encoder-decoders: encoder self + decoder self +
decoder cross per layer) with the expected mask, heads and scale; convert --method linear replaces what
linear attention can take and verify passes; the sites it cannot take (a position bias, a sliding window)
say why, and --method sparse --window full replaces every site exactly (the converted model matches the
original to round-off). Encoder-decoders are also verified with a decoder shorter than the (padded)
encoder, so cross-attention runs with Sq != Skv. The input file is never modified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import attnexport
from attnexport import zoo
from attnexport.methods import METHODS

BIAS = "the logits carry an additive position bias"
WINDOW = "the mask is a sliding window"


@dataclass(frozen=True)
class Expect:
    exporter: str
    masks: tuple[str, ...]  # MaskInfo.describe() per site, in graph order
    kv_heads: int = 4
    scale: float | None = None  # None: 1/sqrt(head_dim)
    linear_refuses: str = ""  # what linear attention's reason says on the sites whose mask it cannot take
    batch: int = 2


KP, CKP = "key_padding", "causal+key_padding"
EXPECTED = {
    "roberta": Expect("dynamo18", (KP, KP)),
    "distilbert": Expect("torchscript17", (KP, KP)),
    "albert": Expect("dynamo23", (KP, KP)),  # one set of weights, two sites
    "mistral": Expect("torchscript17", ("window[-3,+0]+key_padding",) * 2, kv_heads=2, linear_refuses=WINDOW),
    "qwen2": Expect("dynamo18", (CKP, CKP), kv_heads=1),
    "opt": Expect("dynamo23", (CKP, CKP), scale=1.0),  # OPT scales Q before the product
    "gpt_neox": Expect("torchscript17", (CKP, CKP)),
    "bloom": Expect("torchscript17", ("bias", "bias")),
    "t5": Expect("torchscript17", ("bias", "bias", "bias", KP, "bias", KP), scale=1.0, linear_refuses=BIAS),
    "bart": Expect("dynamo18", (KP, KP, "causal", KP, "causal", KP)),
    "swin": Expect("dynamo23", ("bias", "bias"), linear_refuses=BIAS),
    "clip_text": Expect("torchscript17", (CKP, CKP)),
    "clip_vision": Expect("dynamo18", ("none", "none")),
}
_COVERED_ELSEWHERE = {"bert", "gpt2", "llama", "vit"}


def _case(arch: str):
    spec = zoo.ARCHITECTURES[arch]
    exporter = EXPECTED[arch].exporter if arch in EXPECTED else zoo.EXPORTERS[0]
    marks = []
    if not spec.exporters:
        marks.append(pytest.mark.skip(reason=f"no exporter gives a model ONNX Runtime runs: "
                                             f"{'; '.join(f'{e}: {why}' for e, why in spec.export_failures)}"))
    elif spec.export_failure(exporter):
        marks.append(pytest.mark.skip(reason=f"{exporter}: {spec.export_failure(exporter)}"))
    if spec.known_gap:
        marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=spec.known_gap))
    return pytest.param(arch, exporter, marks=marks, id=f"{arch}-{exporter}")


# The zoo's own architectures (other test modules register variants of their own, e.g. a Mistral
# with a wider sliding window, into the same dict of the same process).
ZOO_ARCHITECTURES = [a for a, spec in zoo.ARCHITECTURES.items() if spec.build.__module__ == zoo.__name__]
CASES = [_case(arch) for arch in ZOO_ARCHITECTURES if arch not in _COVERED_ELSEWHERE]


def test_every_architecture_has_an_expectation():
    missing = [a for a in ZOO_ARCHITECTURES if a not in _COVERED_ELSEWHERE and a not in EXPECTED and
               zoo.ARCHITECTURES[a].exporters]
    assert not missing, f"add these architectures to EXPECTED: {missing}"
    families = {zoo.ARCHITECTURES[a].family for a in EXPECTED}
    assert families == {zoo.ENCODER, zoo.DECODER, zoo.ENCODER_DECODER, zoo.VISION}
    assert {e.exporter for e in EXPECTED.values()} == set(zoo.EXPORTERS)


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _problems(report) -> list[str]:
    return [p for c in report.comparisons for p in c.problems]


@pytest.mark.parametrize("arch,exporter", CASES)
def test_inspect_convert_verify(arch, exporter, zoo_model, tmp_path):
    spec = zoo.ARCHITECTURES[arch]
    expect = EXPECTED[arch]
    source = zoo_model(arch, exporter)
    before = _digest(source)

    sites = attnexport.inspect(source)
    assert len(sites) == spec.num_sites, f"{len(sites)} sites found, {spec.num_sites} expected"
    for site in sites:
        assert site.replaceable, f"{site.name}: {site.reason}"
    assert tuple(s.mask.describe() for s in sites) == expect.masks
    for site in sites:
        assert site.num_heads == 4 and site.num_kv_heads == expect.kv_heads, site.name
        scale = expect.scale if expect.scale is not None else 1 / np.sqrt(site.head_dim)
        assert site.scale == pytest.approx(scale, rel=1e-6), site.name
        if site.mask.has_key_padding:
            assert site.mask.key_padding_input == "attention_mask"

    # Linear attention: every site it can take; the others with its reason.
    linear = METHODS["linear"]
    refused = {s.index: linear.unsupported(s) for s in sites if linear.unsupported(s)}
    for index, reason in refused.items():
        assert expect.linear_refuses and reason.startswith(expect.linear_refuses), (sites[index].name, reason)
    assert bool(refused) == bool(expect.linear_refuses)
    if len(refused) < len(sites):
        out = tmp_path / "linear.onnx"
        result = attnexport.convert(source, out, method="linear")
        assert result.replaced == len(sites) - len(refused)
        converted = onnx.load(str(out))
        onnx.checker.check_model(converted, full_check=True)
        ops = [n.op_type for n in converted.graph.node]
        assert ops.count("LinearAttention") == result.replaced
        report = attnexport.verify(source, out, batch=expect.batch)
        assert report.passed, _problems(report)

    # Exact sparse attention takes every site, biases and windows included.
    if refused or spec.family == zoo.ENCODER_DECODER:
        if "sparse" not in METHODS:
            pytest.skip("the sparse method is not in this checkout")
        out = tmp_path / "sparse.onnx"
        result = attnexport.convert(source, out, method="sparse", options=attnexport.MethodOptions(window=-1))
        assert result.replaced == len(sites)
        assert all(p.replacement.exact for p in result.plan.selected)
        report = attnexport.verify(source, out, batch=expect.batch)
        assert report.exact and report.passed, _problems(report)
        if spec.family == zoo.ENCODER_DECODER:
            # Cross-attention with Sq != Skv, padded encoder keys (right and left): still exact.
            report = attnexport.verify(source, out, feeds=_seq2seq_feeds(source))
            assert report.exact and report.passed, _problems(report)
    assert _digest(source) == before, "the input model was modified"


def _seq2seq_feeds(source: str, batch: int = 2, encoder_len: int = 9, decoder_len: int = 5) -> dict[str, np.ndarray]:
    from attnexport import inputs, model_io

    vocab = inputs.vocab_sizes(model_io.load(source)).get("input_ids", 100)
    rng = np.random.default_rng(1)
    mask = np.ones((batch, encoder_len), dtype=np.int64)
    mask[0, encoder_len - 3:] = 0
    mask[1, :2] = 0
    return {"input_ids": rng.integers(2, vocab, (batch, encoder_len)).astype(np.int64), "attention_mask": mask,
            "decoder_input_ids": rng.integers(2, vocab, (batch, decoder_len)).astype(np.int64)}
