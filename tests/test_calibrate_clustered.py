"""attnexport calibrate --method clustered: per site the cheapest window + cluster count within the budget
(on the sharp BERT of test_calibrate), fixed centres fitted for causal sites so that a decoder with a KV
cache becomes a fixed-state recurrent model (--recurrent), and --save-centroids for convert."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from attnexport import api, decoders
from attnexport.calibration import METADATA_CALIBRATION
from attnexport.calibration.fit_clustered import grid
from attnexport.cli import main
from attnexport.errors import AttnExportError
from attnexport.methods import MethodOptions
from attnexport.runtime import create_session
from test_calibrate import calib_npz, output_error, sharp_bert  # noqa: F401 (fixtures)


def test_grid_is_cheapest_first_and_stops_at_a_covering_window():
    pairs = grid(64, 32, longest=40, causal=False)
    costs = [2 * w + 1 + m for w, m in pairs]
    assert costs == sorted(costs)
    assert {w for w, _ in pairs} == {8, 16, 32, 64}  # 64 covers 40 keys; 128 is not tried
    assert {m for _, m in pairs} == {8, 16, 32}
    assert grid(16, 8, longest=1000, causal=True) == [(8, 8), (16, 8)]


def test_clustered_calibration_meets_the_budget(sharp_bert, calib_npz, tmp_path):  # noqa: F811
    plain = api.convert(sharp_bert, tmp_path / "plain.onnx", method="clustered",
                        options=MethodOptions(window=8, num_clusters=8))
    result = api.calibrate(sharp_bert, tmp_path / "cal.onnx", method="clustered", data=calib_npz, budget=0.1,
                           batch_size=8, options=MethodOptions(window=32, num_clusters=16))
    model = onnx.load(result.output_path)
    record = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_CALIBRATION])
    ops = [n for n in model.graph.node if n.op_type == "ClusteredAttention"]
    assert len(ops) == 2 and record["method"] == "clustered"
    for op, fit in zip(ops, result.fits.values()):
        params = fit.parameters
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        assert (attributes["window_left"], attributes["num_clusters"]) == (params["window"], params["clusters"])
        assert params["window"] <= 32 and params["clusters"] <= 16
        key = f"w{params['window']}+m{params['clusters']}"
        if params["within_budget"]:  # the first candidate within the budget; every cheaper one missed it
            tried = list(params["tried"].items())
            position = [k for k, _ in tried].index(key)
            assert tried[position][1] <= 0.1 and all(err > 0.1 for _, err in tried[:position])
        assert params["centres"] in ("run-time k-means", "fitted")
        assert (params["centres"] == "fitted") == (len(op.input) > 4 and bool(op.input[4]))
        assert fit.error_after < 2 * 0.1  # close to the budget on the held-out calibration batches
    # the smallest candidate, uncalibrated, is worse on held-out inputs
    assert output_error(sharp_bert, result.output_path) < output_error(sharp_bert, plain.output_path)


@pytest.fixture(scope="module")
def gpt2_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    source = decoders.export("gpt2", "dynamo18", root / "gpt2_kv.onnx", lm_head=True)
    spec = decoders.describe("gpt2")
    rng = np.random.default_rng(5)
    ids = rng.integers(0, spec.vocab, (24, 32)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for name in decoders.input_names(spec.num_layers)[2:]:
        feeds[name] = np.zeros((len(ids), spec.num_kv_heads, 0, spec.head_dim), np.float32)
    data = root / "calib.npz"
    np.savez(data, **feeds)
    return source, data, spec


def test_causal_decoder_gets_fitted_centres_and_a_state(gpt2_cache, tmp_path):
    source, data, spec = gpt2_cache
    with pytest.raises(AttnExportError, match="--centroids"):  # convert alone refuses causal sites
        api.convert(source, tmp_path / "refused.onnx", method="clustered", options=MethodOptions(window=4, num_clusters=4))
    centres = tmp_path / "centres.npz"
    out = tmp_path / "rec.onnx"
    result = CliRunner().invoke(main, ["calibrate", source, "-o", str(out), "--method", "clustered", "--data", str(data),
                                       "--window", "8", "--clusters", "8", "--batch-size", "8", "--recurrent",
                                       "--save-centroids", str(centres), "--json"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.output)["calibration"]["sites"]
    assert all(s["parameters"]["centres"] == "fitted" for s in sites.values())
    saved = dict(np.load(centres))
    assert sorted(saved) == [f"site{i}" for i in sorted(map(int, sites))]
    for i, s in sites.items():
        assert saved[f"site{i}"].shape == (spec.num_kv_heads, s["parameters"]["clusters"], spec.head_dim)
    # The recurrent model carries past_state.<l> / present_state.<l> and decodes token by token like the
    # non-recurrent conversion with the same centres and sizes does on the whole sequence.
    sess = create_session(str(out), with_library=True)
    states = {i.name: np.zeros([1] + list(i.shape[1:]), np.float32) for i in sess.get_inputs()
              if i.name.startswith("past_state.")}
    assert len(states) == spec.num_layers
    ids = np.random.default_rng(9).integers(0, spec.vocab, (1, 20)).astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    logits = []
    for t in range(ids.shape[1]):
        outs = dict(zip(names, sess.run(None, {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                                              **states})))
        logits.append(outs[names[0]])
        states = {n.replace("present_state.", "past_state."): v for n, v in outs.items() if n.startswith("present_state.")}
    stepwise = np.concatenate(logits, axis=1)
    windows = {s["parameters"]["window"] for s in sites.values()}
    clusters = {s["parameters"]["clusters"] for s in sites.values()}
    # one size at every layer here (random weights attend almost uniformly): convert can rebuild the model
    assert len(windows) == len(clusters) == 1, (windows, clusters)
    whole = api.convert(source, tmp_path / "whole.onnx", method="clustered",
                        options=MethodOptions(window=windows.pop(), num_clusters=clusters.pop(), centroids=saved))
    ref_sess = create_session(whole.output_path, with_library=True)
    past = {i.name: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32) for i in ref_sess.get_inputs()
            if i.name.startswith("past_key_values")}
    expected = ref_sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), **past})[0]
    np.testing.assert_allclose(stepwise, expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(stepwise).all()
