"""Bad input: each case gives a one-line error naming the problem, a non-zero exit, and writes nothing
(the input is never modified). The CLI runs in a subprocess, as a user runs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import attnexport
from attnexport.errors import LibraryNotFoundError


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "attnexport.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env or os.environ.copy(), timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("attnexport: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


def mlp_model(opset: int = 17) -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def test_not_an_onnx_file(workdir):
    bad = workdir / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    before = snapshot(workdir)
    for command in (["inspect", bad], ["convert", bad, "-o", workdir / "out.onnx"]):
        assert_one_line_error(cli(*command, cwd=workdir), "notes.onnx")
    assert snapshot(workdir) == before


def test_truncated_model(workdir, zoo_model):
    source = Path(zoo_model("bert", "torchscript17")).read_bytes()
    truncated = workdir / "truncated.onnx"
    truncated.write_bytes(source[: len(source) // 2])
    before = snapshot(workdir)
    assert_one_line_error(cli("convert", truncated, "-o", workdir / "out.onnx", cwd=workdir), "truncated.onnx")
    assert snapshot(workdir) == before


def test_missing_file(workdir):
    assert_one_line_error(cli("inspect", workdir / "nope.onnx", cwd=workdir), "no such file")


def test_model_without_attention(workdir):
    path = workdir / "mlp.onnx"
    onnx.save(mlp_model(), path)
    before = snapshot(workdir)
    result = cli("convert", path, "-o", workdir / "out.onnx", cwd=workdir)
    assert_one_line_error(result, "no softmax attention found", "nothing written")
    assert snapshot(workdir) == before
    inspected = cli("inspect", path, cwd=workdir)
    assert inspected.returncode == 0 and "no softmax attention" in inspected.stdout


def test_output_equal_to_input(workdir, zoo_model):
    path = workdir / "bert.onnx"
    path.write_bytes(Path(zoo_model("bert", "torchscript17")).read_bytes())
    before = snapshot(workdir)
    assert_one_line_error(cli("convert", path, "-o", path, cwd=workdir), "is the input model")
    # the same file through another spelling of the path
    assert_one_line_error(cli("convert", path, "-o", workdir / "." / "bert.onnx", cwd=workdir), "is the input model")
    assert snapshot(workdir) == before


def test_output_directory_missing(workdir, zoo_model):
    assert_one_line_error(cli("convert", zoo_model("bert", "torchscript17"), "-o", workdir / "no" / "x.onnx",
                              cwd=workdir), "does not exist")


def test_unknown_method(workdir, zoo_model):
    assert_one_line_error(cli("convert", zoo_model("bert", "torchscript17"), "--method", "magic", "-o",
                              workdir / "x.onnx", cwd=workdir), "unknown method")
    assert not (workdir / "x.onnx").exists()


def test_opset_too_old_and_too_new(workdir):
    old = workdir / "old.onnx"
    onnx.save(mlp_model(opset=11), old)
    assert_one_line_error(cli("inspect", old, cwd=workdir), "opset 11 is older than 13")
    new = workdir / "new.onnx"
    model = mlp_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    onnx.save(model, new)
    assert_one_line_error(cli("inspect", new, cwd=workdir), "newer than the installed onnx")


def test_missing_op_library(workdir, zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript17")
    converted = workdir / "converted.onnx"
    assert cli("convert", source, "-o", converted, cwd=workdir).returncode == 0
    env = os.environ.copy()
    env["ATTNEXPORT_LIBRARY"] = str(tmp_path / "missing" / "libattnexport_ops.so")
    assert_one_line_error(cli("verify", source, converted, cwd=workdir, env=env), "ATTNEXPORT_LIBRARY",
                          "does not name a file")


def test_missing_op_library_python_api(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNEXPORT_LIBRARY", str(tmp_path / "nothing.so"))
    with pytest.raises(LibraryNotFoundError):
        attnexport.library_path()
    with pytest.raises(LibraryNotFoundError):
        attnexport.InferenceSession(mlp_model().SerializeToString())


def test_verify_rejects_unconverted_model(workdir, zoo_model):
    source = zoo_model("bert", "torchscript17")
    assert_one_line_error(cli("verify", source, source, cwd=workdir), "not converted by attnexport")


def test_no_stray_temporary_files_after_success(workdir, zoo_model):
    source = zoo_model("gpt2", "torchscript17")
    result = cli("convert", source, "-o", workdir / "g.onnx", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["g.onnx"]
