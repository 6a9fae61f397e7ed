"""Fuzzing convert with hypothesis: random attention graphs from the variant space of tests/graphs.py,
plus random corruptions. Properties, for every example:

- convert never raises anything but attnexport's one-line errors (AttnExportError);
- the input file is byte-identical afterwards;
- what convert writes passes the onnx checker and loads in ONNX Runtime, and verifies
  (kernels vs reference functions to round-off);
- an uncorrupted graph is found (one site) and, unless its mask or softcap rules the method out,
  converted.

ATTNEXPORT_FUZZ_EXAMPLES sets the number of examples (default 1000; CI runs the default).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnexport
from attnexport.errors import AttnExportError, NoAttentionError

import graphs
from graphs import AttentionSpec

EXAMPLES = int(os.environ.get("ATTNEXPORT_FUZZ_EXAMPLES", "1000"))  # split over the two methods below
CORRUPTIONS = (None, None, None, "dangling_input", "wrong_rank", "input_scale", "missing_initializer", "truncate",
               "not_onnx", "drop_output")


@pytest.fixture(scope="module", autouse=True)
def short_long_probe():
    """The long mask-only probe (sliding windows wider than the short probes) runs at a length that suits
    these tiny graphs; the code path is the same."""
    from attnexport.match import probing

    saved = probing.LONG_PROBE_LENGTHS
    probing.LONG_PROBE_LENGTHS = (37,)
    yield
    probing.LONG_PROBE_LENGTHS = saved


@st.composite
def specs(draw) -> AttentionSpec:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    gqa = draw(st.sampled_from(graphs.GQA)) if heads > 1 else "none"
    kv_heads = heads if gqa == "none" else draw(st.sampled_from([h for h in (1, 2) if heads % h == 0 and h < heads]))
    dtype = draw(st.sampled_from(["float32", "float32", "float16"]))
    kv_cache = draw(st.booleans()) and draw(st.booleans())
    cross = (not kv_cache) and draw(st.booleans()) and draw(st.booleans())
    masks = [m for m in graphs.MASKS if not (cross and m.startswith(("causal", "window", "alibi")))]
    if kv_cache:
        masks = [m for m in masks if m not in ("causal_const",)]
    layout = draw(st.sampled_from(graphs.LAYOUTS))
    if layout == "merged_all":  # [B*H, S, S] scores take only masks that broadcast as [Sq, Skv]
        masks = [m for m in masks if m in ("none", "causal_trilu", "causal_range", "causal_const", "window")]
    opset = draw(st.sampled_from([13, 14, 17, 18, 21, 23]))
    mask = draw(st.sampled_from([m for m in masks if not (m == "causal_trilu" and opset < 14)]))  # Trilu: opset 14
    return AttentionSpec(
        hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
        layout=layout, scale=draw(st.sampled_from(graphs.SCALES)),
        product=draw(st.sampled_from(graphs.PRODUCTS)), mask=mask, gqa=gqa,
        nan_guard=draw(st.booleans()), softmax_cast=dtype == "float16" and draw(st.booleans()),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.0, 20.0])), in_function=draw(st.booleans()) and draw(st.booleans()),
        kv_cache=kv_cache, cross=cross, window=draw(st.integers(1, 4)),
        opset=opset, seed=draw(st.integers(0, 2**16)),
    )


def corrupt(model: onnx.ModelProto, how: str | None, path: Path, rng: np.random.Generator) -> None:
    """Write `model` to `path`, damaged in one of several ways."""
    if how == "dangling_input":
        node = model.graph.node[int(rng.integers(len(model.graph.node)))]
        if node.input:
            node.input[int(rng.integers(len(node.input)))] = "nowhere"
    elif how == "wrong_rank":
        reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
        inits = {i.name: i for i in model.graph.initializer}
        for n in reshapes:
            if n.input[1] in inits:
                inits[n.input[1]].CopyFrom(onnx.numpy_helper.from_array(np.array([0, -1], np.int64), n.input[1]))
                break
    elif how == "input_scale":
        # the scale becomes a graph input: it is not a constant, and must not be folded as one
        for n in model.graph.node:
            if n.op_type in ("Mul", "Div") and n.input[1] in {i.name for i in model.graph.initializer}:
                init = next(i for i in model.graph.initializer if i.name == n.input[1])
                if int(np.prod(init.dims)) == 1:
                    model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
                    model.graph.initializer.remove(init)
                    break
    elif how == "missing_initializer" and model.graph.initializer:
        model.graph.initializer.pop(int(rng.integers(len(model.graph.initializer))))
    elif how == "drop_output":
        del model.graph.output[:]
    data = model.SerializeToString()
    if how == "truncate":
        data = data[: int(len(data) * rng.uniform(0.1, 0.9))]
    elif how == "not_onnx":
        data = bytes(rng.integers(0, 256, size=200, dtype=np.uint8))
    path.write_bytes(data)


FUZZ = dict(max_examples=max(1, EXAMPLES // 2), deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
CASES = dict(spec=specs(), corruption=st.sampled_from(CORRUPTIONS), seed=st.integers(0, 2**31 - 1))


@settings(**FUZZ)
@given(**CASES)
def test_fuzz_linear(spec, corruption, seed, tmp_path_factory):
    check_convert(spec, corruption, "linear", seed, tmp_path_factory)


@settings(**FUZZ)
@given(**CASES)
def test_fuzz_sparse(spec, corruption, seed, tmp_path_factory):
    check_convert(spec, corruption, "sparse", seed, tmp_path_factory)


def check_convert(spec, corruption, method, seed, tmp_path_factory):
    from attnexport.methods import METHODS as AVAILABLE

    if method not in AVAILABLE:
        pytest.skip(f"method {method} is not available")
    directory = tmp_path_factory.mktemp("fuzz")
    source, out = directory / "model.onnx", directory / "converted.onnx"
    rng = np.random.default_rng(seed)
    corrupt(graphs.build(spec), corruption, source, rng)
    before = hashlib.sha256(source.read_bytes()).digest()
    options = attnexport.MethodOptions()  # sparse: each site's own pattern, an exact replacement
    try:
        result = attnexport.convert(source, out, method=method, options=options)
    except NoAttentionError:
        result = None
    except AttnExportError as e:
        assert "\n" not in str(e), "errors are one line"
        result = None
    assert hashlib.sha256(source.read_bytes()).digest() == before, "the input was modified"
    if result is None:
        assert not out.exists(), "nothing is written on failure"
        if corruption is None:
            expected = graphs.expectation(spec)
            assert not expected.replaceable or method == "linear" and spec.mask in ("window", "alibi"), \
                f"an intact graph was not converted: {spec}"
        return
    assert out.exists()
    report = attnexport.verify(source, out, seq_len=5, batch=2)
    problems = [p for c in report.comparisons for p in c.problems]
    assert report.passed, problems
    if corruption is None:
        assert result.replaced == 1
