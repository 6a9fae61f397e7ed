"""attnexport.fidelity on the real all-MiniLM-L6-v2: the text set is fixed and long enough, the metrics
mean what they say, and sparse conversions of the real encoder behave (exact with an unbounded window,
measurably different with a short one)."""

from __future__ import annotations

import numpy as np
import pytest

from attnexport import api, fidelity
from attnexport.methods import MethodOptions


def test_passages_are_fixed_long_and_split():
    a, b = fidelity.passages(min_tokens=128), fidelity.passages(min_tokens=128)
    assert a == b
    assert len(a.evaluation) >= 200 and len(a.calibration) >= 200
    assert not set(a.evaluation) & set(a.calibration)
    counts = [len(ids) for ids in fidelity.tokenizer()(a.evaluation)["input_ids"]]
    assert min(counts) >= 128


def test_compare_metrics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16))
    same = fidelity.compare(x, 3.0 * x)  # norms do not matter
    assert same["mean_cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0
    noisy = fidelity.compare(x, x + rng.normal(size=x.shape))
    assert 0.3 < noisy["mean_cosine"] < 0.9 and noisy["min_cosine"] < noisy["mean_cosine"]
    assert noisy["top1_agreement"] < 1.0


def test_minilm_sparse_conversions(tmp_path):
    original = fidelity.export_minilm(tmp_path / "minilm.onnx")
    texts = fidelity.passages(min_tokens=128).evaluation[:12]
    reference = fidelity.embed(original, texts, threads=2)
    full = api.convert(original, tmp_path / "full.onnx", method="sparse", options=MethodOptions(window=-1))
    assert full.replaced == 6 and full.plan.exact
    exact = fidelity.compare(reference, fidelity.embed(full.output_path, texts, threads=2))
    assert exact["min_cosine"] > 1 - 1e-6
    window = api.convert(original, tmp_path / "w16.onnx", method="sparse", options=MethodOptions(window=16, num_global=1))
    approx = fidelity.compare(reference, fidelity.embed(window.output_path, texts, threads=2))
    assert 0.5 < approx["mean_cosine"] < 0.9999
