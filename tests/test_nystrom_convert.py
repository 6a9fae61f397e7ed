"""convert --method nystrom: non-causal sites become NystromAttention; with at least as many landmarks
as keys (and a tiny ridge) the converted BERT reproduces the original, with few landmarks it is an
approximation whose kernel and function still agree; causal sites are refused with the reason."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from attnexport import api
from attnexport.cli import main
from attnexport.errors import NoAttentionError, UnsupportedError
from attnexport.methods import MethodOptions


def _convert(path, out, **options):
    return api.convert(path, out, method="nystrom", options=MethodOptions(**options))


def test_bert_with_a_landmark_per_key_is_near_exact(zoo_model, tmp_path):
    path = zoo_model("bert", "torchscript17")
    result = _convert(path, tmp_path / "nystrom.onnx", num_landmarks=64, ridge=1e-9)
    assert len(result.sites) == 2
    attributes = result.plan.selected[0].replacement.attributes
    assert (attributes["num_landmarks"], attributes["causal"], attributes["solver"]) == (64, 0, "sketch")
    report = api.verify(path, result.output_path, seq_len=24, tolerance=1e-3)
    assert report.passed, [c.problems for c in report.comparisons]
    assert max(c.kernel_vs_original["rel"] for c in report.comparisons) < 1e-3


@pytest.mark.parametrize("solver", ["sketch", "newton_schulz", "direct"])
def test_bert_with_few_landmarks_is_an_approximation(zoo_model, tmp_path, solver):
    path = zoo_model("bert", "torchscript17")
    result = _convert(path, tmp_path / f"nystrom_{solver}.onnx", num_landmarks=4, solver=solver)
    report = api.verify(path, result.output_path, seq_len=24, tolerance=10.0)
    assert report.passed, [c.problems for c in report.comparisons]  # kernel and function agree
    assert max(c.kernel_vs_original["rel"] for c in report.comparisons) > 1e-4  # and it approximates


def test_cli_convert_and_causal_refusal(zoo_model, tmp_path):
    bert = zoo_model("bert", "torchscript17")
    out = tmp_path / "cli.onnx"
    run = CliRunner().invoke(main, ["convert", bert, "-o", str(out), "--method", "nystrom", "--landmarks", "8",
                                    "--landmark-method", "kmeans"])
    assert run.exit_code == 0, run.output
    assert out.exists()
    gpt2 = zoo_model("gpt2", "dynamo18")
    with pytest.raises(NoAttentionError, match="landmarks average future tokens"):
        _convert(gpt2, tmp_path / "gpt2.onnx")
    with pytest.raises(UnsupportedError, match="ridge"):
        _convert(bert, tmp_path / "bad.onnx", ridge=0.0)
