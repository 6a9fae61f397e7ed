"""attnexport calibrate on a small BERT whose attention is made sharp (random BERTs attend almost
uniformly, which every approximation gets right): for each method the calibrated model is closer to the
original on held-out inputs than the uncalibrated conversion, what was fitted is in the metadata and the
graph, the input model is untouched, and bad calibration data gets a one-line error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from attnexport import api
from attnexport.calibration import METADATA_CALIBRATION
from attnexport.methods import METHODS, MethodOptions, favor_projection
from attnexport.runtime import create_session

SEQ = 40
SHARPNESS = 4.0  # query and key weights are scaled by this: logits by its square


@pytest.fixture(scope="module")
def sharp_bert(tmp_path_factory) -> Path:
    import torch

    from attnexport import zoo

    arch = zoo.ARCHITECTURES["bert"]
    torch.manual_seed(0)
    model = arch.build().eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(SHARPNESS)
            layer.attention.self.key.weight.mul_(SHARPNESS)
    wrapped = zoo._wrapper(model, arch)
    path = tmp_path_factory.mktemp("calibrate") / "bert.onnx"
    names = list(arch.inputs)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    with zoo._quiet(True), torch.no_grad():
        torch.onnx.export(wrapped, zoo.example_inputs(arch), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes)
    return path


def token_batch(count: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids with right padding of random length (at least half of each row is real)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (count, SEQ)).astype(np.int64)
    mask = np.ones((count, SEQ), dtype=np.int64)
    for row in range(count):
        mask[row, rng.integers(SEQ // 2, SEQ + 1):] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def calib_npz(sharp_bert) -> Path:
    path = sharp_bert.parent / "calib.npz"
    np.savez(path, **token_batch(64, seed=1))
    return path


HELD_OUT = token_batch(24, seed=2)


def output_error(original: Path, converted: str | Path) -> float:
    """Relative error of the last hidden state over the real (unpadded) tokens of the held-out inputs."""
    ref = create_session(str(original), with_library=False).run(None, HELD_OUT)[0]
    out = create_session(str(converted), with_library=True).run(None, HELD_OUT)[0]
    rows = HELD_OUT["attention_mask"][..., None].astype(bool)
    return float(np.sqrt(np.sum(np.where(rows, out - ref, 0) ** 2) / np.sum(np.where(rows, ref, 0) ** 2)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = [("linear", "elu1"), ("linear", "relu"), ("linear", "taylor2"), ("linear", "favor"), ("lse", None)]


@pytest.mark.parametrize(("method", "feature_map"), CASES, ids=[f"{m}-{f}" if f else m for m, f in CASES])
def test_calibration_lowers_the_held_out_error(sharp_bert, calib_npz, tmp_path, method, feature_map):
    options = MethodOptions(feature_map=feature_map or "elu1")
    before = digest(sharp_bert)
    plain = api.convert(sharp_bert, tmp_path / "plain.onnx", method=method, options=options)
    result = api.calibrate(sharp_bert, tmp_path / "calibrated.onnx", method=method, options=options, data=calib_npz,
                           batch_size=8)
    assert digest(sharp_bert) == before  # the input model is never modified
    uncalibrated, calibrated = output_error(sharp_bert, plain.output_path), output_error(sharp_bert, result.output_path)
    assert calibrated < uncalibrated, (calibrated, uncalibrated)

    model = onnx.load(result.output_path)
    meta = {p.key: p.value for p in model.metadata_props}
    record = json.loads(meta[METADATA_CALIBRATION])
    assert record["method"] == method and record["examples"] == 64 and set(record["sites"]) == {"0", "1"}
    plan = json.loads(meta["attnexport.plan"])
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n for n in model.graph.node if n.domain == "attnexport"]
    assert len(ops) == 2
    for site_plan, op in zip(plan["sites"], ops):
        fitted = record["sites"][str(site_plan["site"])]
        params = fitted["parameters"]
        assert fitted["error_calibrated"] <= fitted["error_uncalibrated"]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        if "scale" in params:  # the fitted temperature is the op's scale
            assert attributes["scale"] == pytest.approx(params["scale"], rel=1e-6)
        if feature_map == "taylor2":
            assert attributes["expansion_point"].decode() == params["expansion_point"]
        if feature_map == "favor":  # the chosen draw is the projection initializer
            projection = initializers[op.input[4]]
            expected = favor_projection(8, params["num_features"], seed=params["seed"])
            np.testing.assert_array_equal(projection, expected)
        if params["output_map"]:
            assert site_plan["output_map"] == [4, 8, 8]
            consumer = next(n for n in model.graph.node if op.output[0] in n.input)
            assert consumer.op_type == "MatMul" and initializers[consumer.input[1]].shape == (4, 8, 8)

    # kernels and reference functions of the calibrated model agree (verify's three-way check)
    report = api.verify(sharp_bert, result.output_path, feeds=HELD_OUT)
    assert all(c.kernel_vs_function["rel"] < 1e-4 for c in report.comparisons)


def test_sparse_windows_meet_the_budget(sharp_bert, calib_npz, tmp_path):
    loose = api.calibrate(sharp_bert, tmp_path / "loose.onnx", method="sparse", data=calib_npz, budget=0.3,
                          batch_size=8)
    tight = api.calibrate(sharp_bert, tmp_path / "tight.onnx", method="sparse", data=calib_npz, budget=0.02,
                          batch_size=8)
    for result, budget in ((loose, 0.3), (tight, 0.02)):
        for fit in result.fits.values():
            window = fit.parameters["window"]
            tried = {int(k): v for k, v in fit.parameters["tried"].items()}
            if window >= 0:  # the chosen window met the budget on the fit batches, narrower ones did not
                assert tried[window] <= budget
                assert all(err > budget for w, err in tried.items() if w < window)
                assert fit.replacement.attributes["window_left"] == window
            assert fit.error_after < 2 * budget  # and stays close to it on the held-out calibration batches
    windows = lambda r: [f.parameters["window"] for f in r.fits.values()]  # noqa: E731
    assert all(0 <= w < SEQ for w in windows(loose))
    assert all(t == -1 or t >= w for t, w in zip(windows(tight), windows(loose)))
    assert output_error(sharp_bert, tight.output_path) < output_error(sharp_bert, loose.output_path)


def test_independent_fit_and_layers(sharp_bert, calib_npz, tmp_path):
    result = api.calibrate(sharp_bert, tmp_path / "one.onnx", method="lse", data=calib_npz, layers="1",
                           sequential=False, batch_size=16)
    assert set(result.fits) == {1} and result.record["sequential"] is False
    assert sum(n.domain == "attnexport" for n in onnx.load(result.output_path).graph.node) == 1


# -- the command line ---------------------------------------------------------------------------------

def cli(*args, cwd):
    return subprocess.run([sys.executable, "-P", "-m", "attnexport.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("attnexport: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_calibrate_writes_and_reports(sharp_bert, calib_npz, tmp_path):
    out = tmp_path / "cli.onnx"
    result = cli("calibrate", sharp_bert, "--method", "linear", "--feature-map", "taylor2", "--data", calib_npz,
                 "-o", out, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and out.is_file()
    assert {s["parameters"]["expansion_point"] for s in report["calibration"]["sites"].values()} <= {"zero", "mean", "max"}


def test_cli_errors(sharp_bert, calib_npz, tmp_path):
    out = tmp_path / "out.onnx"
    before = digest(sharp_bert)
    assert_one_line_error(cli("calibrate", sharp_bert, "--method", "bogus", "--data", calib_npz, "-o", out,
                              cwd=tmp_path), "unknown method 'bogus'")
    assert_one_line_error(cli("calibrate", sharp_bert, "-o", out, cwd=tmp_path), "--data", "--texts")
    wrong_name = tmp_path / "wrong_name.npz"
    np.savez(wrong_name, input_ids=np.zeros((2, 8), np.int64), attention_mask=np.ones((2, 8), np.int64),
             pixel_values=np.zeros((2, 3)))
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", wrong_name, "-o", out, cwd=tmp_path),
                          "pixel_values is not an input of the model")
    missing = tmp_path / "missing.npz"
    np.savez(missing, input_ids=np.zeros((2, 8), np.int64))
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", missing, "-o", out, cwd=tmp_path),
                          "lacks the model input(s) attention_mask")
    wrong_rank = tmp_path / "wrong_rank.npz"
    np.savez(wrong_rank, input_ids=np.zeros((2, 8, 1), np.int64), attention_mask=np.ones((2, 8), np.int64))
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", wrong_rank, "-o", out, cwd=tmp_path),
                          "input_ids has shape [2, 8, 1]", "rank 2")
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, input_ids=np.zeros((2, 8), np.int64), attention_mask=np.ones((3, 8), np.int64))
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", uneven, "-o", out, cwd=tmp_path),
                          "disagree on the number of examples")
    not_npz = tmp_path / "not.npz"
    not_npz.write_text("hello")
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", not_npz, "-o", out, cwd=tmp_path),
                          "not a readable .npz")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(cli("calibrate", sharp_bert, "--texts", empty, "-o", out, cwd=tmp_path), "holds no text")
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\nanother text\n")
    assert_one_line_error(cli("calibrate", sharp_bert, "--texts", texts, "-o", out, cwd=tmp_path),
                          "needs a tokenizer", "--tokenizer")
    assert_one_line_error(cli("calibrate", sharp_bert, "--texts", texts, "--tokenizer", tmp_path / "nowhere", "-o", out,
                              cwd=tmp_path), "cannot be loaded")
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", calib_npz, "--method", "sparse", "--budget", "0",
                              "-o", out, cwd=tmp_path), "--budget")
    assert_one_line_error(cli("calibrate", sharp_bert, "--data", calib_npz, "-o", sharp_bert, cwd=tmp_path),
                          "is the input model")
    assert not out.exists() and digest(sharp_bert) == before


def test_texts_use_the_tokenizer_the_model_records(tmp_path):
    """fidelity's MiniLM export names its tokenizer; --texts finds it without --tokenizer."""
    from attnexport import fidelity
    from attnexport.calibration.data import METADATA_TOKENIZER

    original = fidelity.export_minilm(tmp_path / "minilm.onnx")
    meta = {p.key: p.value for p in onnx.load(original, load_external_data=False).metadata_props}
    assert meta[METADATA_TOKENIZER] == fidelity.TOKENIZER_NAME
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(fidelity.sentences()[:24]) + "\n")
    result = api.calibrate(original, tmp_path / "cal.onnx", method="sparse", texts=texts, layers="0", budget=0.3,
                           batch_size=8)
    assert result.record["examples"] == 24 and result.record["data"] == "texts:calib.txt"
    assert set(result.fits) == {0} and result.fits[0].parameters["window"] >= 0


def test_nystrom_landmarks_meet_the_budget(sharp_bert, calib_npz, tmp_path):
    """nystrom trades accuracy for speed like sparse: the fewest landmarks within the budget (the
    uncalibrated default, 64 landmarks for 40 tokens, is all but exact and not the comparison)."""
    result = api.calibrate(sharp_bert, tmp_path / "nystrom.onnx", method="nystrom", data=calib_npz, budget=0.1,
                           batch_size=8)
    ops = [n for n in onnx.load(result.output_path).graph.node if n.op_type == "NystromAttention"]
    assert len(ops) == 2
    for op, fit in zip(ops, result.fits.values()):
        landmarks = fit.parameters["num_landmarks"]
        tried = {int(k): v for k, v in fit.parameters["tried"].items()}
        assert landmarks < SEQ and tried[landmarks] <= 0.1
        assert all(err > 0.1 for m, err in tried.items() if m < landmarks)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        assert attributes["num_landmarks"] == landmarks
        assert fit.error_after < 0.2
