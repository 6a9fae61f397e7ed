"""The real all-MiniLM-L6-v2 with a clustered far field: the long (joined) inputs are fixed and long enough,
and on them the far field brings the embeddings closer to the original than the window alone."""

from __future__ import annotations

from attnexport import api, fidelity
from attnexport.methods import MethodOptions


def test_joined_inputs_are_fixed_and_long():
    evaluation = fidelity.passages(min_tokens=128).evaluation
    a, b = fidelity.joined(evaluation), fidelity.joined(evaluation)
    assert a == b and len(a) >= 40
    counts = [len(ids) for ids in fidelity.tokenizer()(a)["input_ids"]]
    assert min(counts) >= fidelity.MAX_POSITIONS
    # Consecutive passages, in order, none used twice.
    first = next(k for k in range(1, len(evaluation)) if " ".join(evaluation[:k]) == a[0])
    assert a[1].startswith(evaluation[first] + " ")
    shorter = fidelity.joined(evaluation, 300)
    assert len(shorter) > len(a)


def test_minilm_clustered_beats_the_window_alone_on_long_inputs(tmp_path):
    original = fidelity.export_minilm(tmp_path / "minilm.onnx")
    texts = fidelity.joined(fidelity.passages(min_tokens=128).evaluation)[:4]
    limit = fidelity.MAX_POSITIONS
    reference = fidelity.embed(original, texts, threads=2, max_tokens=limit)
    cosines = {}
    for name, method, options in (("window", "sparse", MethodOptions(window=16, num_global=1)),
                                  ("clustered", "clustered", MethodOptions(window=16, num_global=1, num_clusters=32))):
        converted = api.convert(original, tmp_path / f"{name}.onnx", method=method, options=options)
        assert converted.replaced == 6
        out = fidelity.embed(converted.output_path, texts, threads=2, max_tokens=limit)
        cosines[name] = fidelity.compare(reference, out, k=2)["mean_cosine"]
    assert cosines["window"] < cosines["clustered"] < 1 - 1e-4, cosines
