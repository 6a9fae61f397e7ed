"""convert --method clustered: an exact window plus k-means centres for the keys outside it.

Subjects: a small random BERT (bidirectional, key padding) exported by TorchScript (opset 17) and dynamo
(opset 18), converted with a short window, a global token and a few clusters (approximate: the kernel and
the reference function must agree, the original is measurably different), with a window that covers the
sequence (exact in numbers, though the plan cannot know the length), and with --window full (exact by
plan); GPT-2 (causal), which needs fitted centres (--centroids) and is refused in one line without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from attnexport import api
from attnexport.cli import main
from attnexport.errors import NoAttentionError, UnsupportedError
from attnexport.methods import MethodOptions


def _convert(path, out, **options):
    return api.convert(path, out, method="clustered", options=MethodOptions(**options))


def _nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "ClusteredAttention"]


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
def test_bert_window_global_clusters(zoo_model, tmp_path, exporter):
    path = zoo_model("bert", exporter)
    result = _convert(path, tmp_path / "bert_c.onnx", window=2, num_global=1, num_clusters=3, iterations=4)
    assert result.replaced == 2 and not result.plan.exact
    for p in result.plan.selected:
        a = p.replacement.attributes
        assert (a["causal"], a["window_left"], a["window_right"], a["num_global"]) == (0, 2, 2, 1)
        assert (a["num_clusters"], a["iterations"], a["cluster"]) == (3, 4, "keys")
    nodes = _nodes(result.output_path)
    assert len(nodes) == 2
    # Every attribute is written on the node, whatever the reader's defaults.
    assert set(_attributes(nodes[0])) >= {"scale", "causal", "window_left", "window_right", "dilation", "num_global",
                                          "num_clusters", "iterations", "cluster"}
    report = api.verify(path, result.output_path, seq_len=24, tolerance=10.0)
    assert report.passed, [c.problems for c in report.comparisons]  # kernel and function agree
    assert max(c.kernel_vs_function["rel"] for c in report.comparisons) < 1e-4
    # Keys outside the window are approximated: the model changes, measurably.
    assert max(c.kernel_vs_original["rel"] for c in report.comparisons) > 1e-4


def test_far_field_beats_the_window_alone(zoo_model, tmp_path):
    """The clustered far field adds what the window drops: closer to the original than SparseAttention with
    the same window, and closer still with more clusters."""
    path = zoo_model("bert", "torchscript17")
    errors = {}
    for name, method, options in (("window", "sparse", MethodOptions(window=2, num_global=1)),
                                  ("clusters4", "clustered", MethodOptions(window=2, num_global=1, num_clusters=4)),
                                  ("clusters16", "clustered", MethodOptions(window=2, num_global=1, num_clusters=16))):
        out = api.convert(path, tmp_path / f"{name}.onnx", method=method, options=options).output_path
        report = api.verify(path, out, seq_len=40, tolerance=10.0)
        errors[name] = max(c.kernel_vs_original["rel"] for c in report.comparisons if c.kind == "site")
    assert errors["clusters16"] < errors["clusters4"] < errors["window"], errors


def test_window_covering_the_sequence_is_exact(zoo_model, tmp_path):
    path = zoo_model("bert", "torchscript17")
    covering = _convert(path, tmp_path / "cover.onnx", window=30, num_clusters=2)
    assert not covering.plan.exact  # the plan cannot know that inputs stay shorter than the window
    report = api.verify(path, covering.output_path, seq_len=24, tolerance=1e-3)
    for c in report.comparisons:
        assert c.kernel_vs_original["rel"] < (1e-4 if c.kind == "site" else 1e-3), (c.name, c.kernel_vs_original)
    full = _convert(path, tmp_path / "full.onnx", window=-1, num_clusters=2)
    assert full.plan.exact
    report = api.verify(path, full.output_path, seq_len=24)
    assert report.exact and report.passed, [c.problems for c in report.comparisons]


def test_query_clustering_converts(zoo_model, tmp_path):
    path = zoo_model("bert", "torchscript17")
    result = _convert(path, tmp_path / "queries.onnx", num_clusters=4, cluster="queries")
    a = result.plan.selected[0].replacement.attributes
    assert (a["cluster"], a["window_left"], a["window_right"], a["num_global"]) == ("queries", -1, -1, 0)
    assert not result.plan.exact
    with pytest.raises(UnsupportedError, match="--cluster queries has no near pattern"):
        _convert(path, tmp_path / "q2.onnx", window=2, num_clusters=4, cluster="queries")
    with pytest.raises(NoAttentionError, match="query clustering"):
        _convert(zoo_model("gpt2", "dynamo18"), tmp_path / "q3.onnx", num_clusters=4, cluster="queries")
    report = api.verify(path, result.output_path, seq_len=24, tolerance=10.0)
    assert report.passed and max(c.kernel_vs_function["rel"] for c in report.comparisons) < 1e-4


def test_causal_sites_need_centroids(zoo_model, tmp_path):
    path = zoo_model("gpt2", "dynamo18")
    with pytest.raises(NoAttentionError, match="--centroids"):
        _convert(path, tmp_path / "none.onnx", window=4, num_clusters=3)
    assert not (tmp_path / "none.onnx").exists()
    sites = api.inspect(path)
    rng = np.random.default_rng(0)
    centroids = {f"site{s.index}": rng.normal(size=(s.num_kv_heads, 3, s.head_dim)).astype(np.float32) for s in sites}
    # One site's centres only: that site is replaced, the other kept with the reason.
    partial = _convert(path, tmp_path / "partial.onnx", window=4, centroids={"site1": centroids["site1"]})
    assert [p.site.index for p in partial.plan.selected] == [1]
    assert "--centroids" in partial.plan.sites[0].skip_reason
    npz = tmp_path / "centres.npz"
    np.savez(npz, **centroids)
    out = tmp_path / "gpt2_c.onnx"
    result = CliRunner().invoke(main, ["convert", path, "-o", str(out), "--method", "clustered", "--window", "4",
                                       "--clusters", "3", "--centroids", str(npz), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    for site in plan["sites"]:
        assert site["action"] == "replace" and not site["exact"]
        assert (site["attributes"]["causal"], site["attributes"]["window_right"]) == (1, 0)
        assert site["extra_inputs"] == {"centroids": [sites[0].num_kv_heads, 3, sites[0].head_dim]}
    for node in _nodes(out):
        assert node.input[4] and not any(node.input[5:])  # centroids is the fifth input; no past_state
    report = api.verify(path, str(out), seq_len=30, tolerance=10.0)
    assert report.passed and max(c.kernel_vs_function["rel"] for c in report.comparisons) < 1e-4


def test_option_errors(zoo_model, tmp_path):
    path = zoo_model("bert", "torchscript17")
    with pytest.raises(UnsupportedError, match="needs --window"):
        _convert(path, tmp_path / "a.onnx", num_clusters=4)
    with pytest.raises(UnsupportedError, match="needs --clusters"):
        _convert(path, tmp_path / "b.onnx", window=4)
    with pytest.raises(UnsupportedError, match="--clusters 0"):
        _convert(path, tmp_path / "c.onnx", window=4, num_clusters=0)
    with pytest.raises(UnsupportedError, match="--iterations -1"):
        _convert(path, tmp_path / "d.onnx", window=4, num_clusters=4, iterations=-1)
    site = api.inspect(path)[0]
    wrong = {"site0": np.zeros((site.num_kv_heads, 3, site.head_dim + 1), np.float32)}
    with pytest.raises(UnsupportedError, match=r"site0: shape \[4, 3, 9\]"):
        _convert(path, tmp_path / "e.onnx", window=4, centroids=wrong)
    right = {"site0": np.zeros((site.num_kv_heads, 3, site.head_dim), np.float32)}
    with pytest.raises(UnsupportedError, match="3 clusters, --clusters says 5"):
        _convert(path, tmp_path / "f.onnx", window=4, num_clusters=5, centroids=right)
    assert not list(tmp_path.glob("*.onnx"))


def _cli(*args, cwd):
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    *env.get("PYTHONPATH", "").split(os.pathsep)] if p)
    return subprocess.run([sys.executable, "-P", "-m", "attnexport.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("attnexport: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors_are_one_line(zoo_model, tmp_path):
    bert, gpt2 = zoo_model("bert", "torchscript17"), zoo_model("gpt2", "dynamo18")
    out = tmp_path / "out.onnx"
    _one_line_error(_cli("convert", gpt2, "-o", out, "--method", "clustered", "--window", "4", "--clusters", "8",
                         cwd=tmp_path), "causal", "--centroids", "site<i>")
    _one_line_error(_cli("convert", bert, "-o", out, "--method", "clustered", "--clusters", "8", cwd=tmp_path),
                    "--window")
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    _one_line_error(_cli("convert", bert, "-o", out, "--method", "clustered", "--window", "4", "--centroids", bad,
                         cwd=tmp_path), "bad.npz")
    assert not out.exists()
