"""The CLI's happy paths: inspect (table and JSON), convert (dry run, options, layer selection, JSON),
verify (table, JSON, tolerance), bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attnexport.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=os.environ.copy(), timeout=600)


def test_inspect_json(zoo_model, tmp_path):
    result = cli("inspect", zoo_model("llama", "dynamo18"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["sites"]) == 2
    site = data["sites"][0]
    assert site["num_heads"] == 8 and site["num_kv_heads"] == 2 and site["head_dim"] == 8
    assert site["mask"]["describe"] == "causal+key_padding"
    assert site["methods"]["linear"] == "ok"


def test_inspect_table(zoo_model, tmp_path):
    result = cli("inspect", zoo_model("vit", "dynamo23"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "onnx.Attention" in result.stdout and "2 attention site" in result.stdout


def test_convert_dry_run_writes_nothing(zoo_model, tmp_path):
    result = cli("convert", zoo_model("gpt2", "dynamo18"), "-o", tmp_path / "x.onnx", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_convert_layers_and_feature_map(zoo_model, tmp_path):
    out = tmp_path / "one_layer.onnx"
    result = cli("convert", zoo_model("gpt2", "torchscript17"), "-o", out, "--layers", "1", "--feature-map", "favor",
                 "--num-features", "24", "--seed", "7", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    actions = [s["action"] for s in plan["sites"]]
    assert actions == ["keep", "replace"]
    assert plan["sites"][0]["reason"] == "not selected by --layers"
    assert plan["sites"][1]["attributes"]["feature_map"] == "favor"
    assert plan["sites"][1]["extra_inputs"] == {"projection": [8, 24]}
    assert plan["options"]["seed"] == 7
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LinearAttention") == 1 and ops.count("Softmax") == 1
    assert any(p.key == "attnexport.plan" for p in model.metadata_props)
    verified = cli("verify", zoo_model("gpt2", "torchscript17"), out, "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["passed"]


def test_verify_tolerance_fails_with_exit_1(zoo_model, tmp_path):
    source = zoo_model("bert", "dynamo18")
    out = tmp_path / "b.onnx"
    assert cli("convert", source, "-o", out, cwd=tmp_path).returncode == 0
    ok = cli("verify", source, out, "--seq-len", "9", cwd=tmp_path)
    assert ok.returncode == 0 and "PASSED" in ok.stdout, ok.stdout + ok.stderr
    strict = cli("verify", source, out, "--tolerance", "1e-9", cwd=tmp_path)
    assert strict.returncode == 1
    assert "converted differs from original" in strict.stderr


def test_bench_runs_both_models(zoo_model, tmp_path):
    source = zoo_model("bert", "dynamo18")
    out = tmp_path / "b.onnx"
    assert cli("convert", source, "-o", out, cwd=tmp_path).returncode == 0
    result = cli("bench", source, out, "--seq-len", "16,32", "--repeat", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["seq_len"] for r in rows] == [16, 32]
    for row in rows:
        assert row["original"]["median_ms"] > 0 and row["converted"]["median_ms"] > 0
        assert row["converted"]["peak_mb"] > 0
