"""convert --recurrent: decoders exported with their KV cache (transformers GPT-2 and LLaMA with grouped
KV heads, random weights) become models with a fixed-size state per layer, and running them token by
token (carrying the state) gives what the non-recurrent converted model gives on the whole sequence.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from attnexport import api, decoders
from attnexport.cli import main
from attnexport.errors import AttnExportError
from attnexport.methods import MethodOptions
from attnexport.recurrent import METADATA_RECURRENT
from ortutil import session

# (architecture, exporter): GPT-2 by dynamo (the graph reads the past length off the cache's shape),
# LLaMA (8 query heads on 2 kv heads) by TorchScript (its reshapes read the cache's shape through the
# grouped-head expansion).
SUBJECTS = [("gpt2", "dynamo18"), ("llama", "torchscript17")]


@pytest.fixture(scope="module")
def cached_decoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    made: dict[tuple[str, str], str] = {}

    def get(arch: str, exporter: str) -> str:
        if (arch, exporter) not in made:
            made[(arch, exporter)] = decoders.export(arch, exporter, root / f"{arch}_{exporter}.onnx",
                                                     lm_head=arch == "gpt2")
        return made[(arch, exporter)]

    return get


def zeros_for(sess, batch: int) -> dict[str, np.ndarray]:
    """Empty past caches (length 0) for the non-recurrent model."""
    feeds = {}
    for spec in sess.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros([batch, spec.shape[1], 0, spec.shape[3]], np.float32)
    return feeds


def run_recurrent(sess, ids: np.ndarray, mask: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Feeds the tokens in chunks of `sizes`, each call with the mask over everything so far and the
    previous call's present_state.<l> as past_state.<l> (zeros first)."""
    batch = ids.shape[0]
    states = {s.name: np.zeros([batch] + list(s.shape[1:]), np.float32)
              for s in sess.get_inputs() if s.name.startswith("past_state.")}
    names = [o.name for o in sess.get_outputs()]
    outputs, start = [], 0
    for size in sizes:
        feeds = {"input_ids": ids[:, start:start + size], "attention_mask": mask[:, :start + size], **states}
        results = sess.run(None, feeds)
        outputs.append(results[0])
        states = {n.replace("present_state.", "past_state."): r for n, r in zip(names, results)
                  if n.startswith("present_state.")}
        start += size
    return np.concatenate(outputs, axis=1)


def check_recurrent(source: str, tmp_path, method: str, options: MethodOptions | None = None,
                    state_shape: list[int] | None = None, arch: str = "gpt2") -> None:
    """The recurrent conversion of `source`, run in one call, in chunks and token by token, gives the
    non-recurrent conversion's outputs on the whole sequence (real tokens; kernels and functions)."""
    whole = api.convert(source, tmp_path / f"whole_{method}.onnx", method=method, options=options)
    recurrent = api.convert(source, tmp_path / f"recurrent_{method}.onnx", method=method, options=options,
                            recurrent=True)
    assert recurrent.replaced == whole.replaced == 2

    model = onnx.load(recurrent.output_path, load_external_data=False)
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    assert not any(n.startswith("past_key_values") for n in names_in)
    assert not any(n.startswith("present.") for n in names_out)
    assert [n for n in names_in if n.startswith("past_state.")] == ["past_state.0", "past_state.1"]
    assert [n for n in names_out if n.startswith("present_state.")] == ["present_state.0", "present_state.1"]
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_RECURRENT])
    assert meta["layers"][0]["replaces_inputs"] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert meta["layers"][0]["replaces_outputs"] == ["present.0.key", "present.0.value"]
    state = next(i for i in model.graph.input if i.name == "past_state.0")
    assert [d.dim_value for d in state.type.tensor_type.shape.dim][1:] == state_shape

    spec = decoders.describe(arch)
    batch, n = 2, 13
    rng = np.random.default_rng(0)
    ids = rng.integers(0, spec.vocab, (batch, n)).astype(np.int64)
    mask = np.ones((batch, n), np.int64)
    mask[1, :3] = 0  # left padding in the second sequence
    for with_library in (True, False):
        whole_sess = session(whole.output_path, with_library=with_library)
        expected = whole_sess.run(None, {"input_ids": ids, "attention_mask": mask, **zeros_for(whole_sess, batch)})[0]
        rec_sess = session(recurrent.output_path, with_library=with_library)
        for sizes in ([n], [5, 1, 1, 1, 3, 1, 1], [1] * n):
            got = run_recurrent(rec_sess, ids, mask, sizes)
            real = mask.astype(bool)  # padded positions' outputs are meaningless in both
            err = float(np.abs(got - expected)[real].max())
            assert err <= 2e-5 * max(1.0, float(np.abs(expected).max())), (method, with_library, sizes, err)


@pytest.mark.parametrize("arch, exporter", SUBJECTS)
def test_recurrent_decoding_matches_the_whole_sequence(arch, exporter, cached_decoder, tmp_path, op_library):
    spec = decoders.describe(arch)
    check_recurrent(cached_decoder(arch, exporter), tmp_path, "lse",
                    state_shape=[spec.num_kv_heads, spec.head_dim, spec.head_dim + 2], arch=arch)


@pytest.mark.parametrize("feature_map", ["elu1", "favor"])
def test_linear_attention_recurrent(feature_map, cached_decoder, tmp_path, op_library):
    """--method linear --recurrent: LinearAttention's state (S | z | favor's shifts) carries the sequence."""
    spec = decoders.describe("llama")
    options = MethodOptions(feature_map=feature_map, num_features=12)
    features = spec.head_dim if feature_map == "elu1" else 12
    check_recurrent(cached_decoder("llama", "torchscript17"), tmp_path, "linear", options,
                    state_shape=[spec.num_kv_heads, features, spec.head_dim + 2], arch="llama")


def test_cli_recurrent_and_the_one_line_errors(cached_decoder, zoo_model, tmp_path, op_library):
    source = cached_decoder("gpt2", "dynamo18")
    runner = CliRunner()
    out = tmp_path / "rec.onnx"
    result = runner.invoke(main, ["convert", source, "-o", str(out), "--method", "lse", "--recurrent"])
    assert result.exit_code == 0, result.output
    assert out.exists()
    # attnexport.InferenceSession turns ORT's memory patterns off for it (a new mask length every call)
    import attnexport

    assert attnexport.InferenceSession(str(out)).get_session_options().enable_mem_pattern is False
    assert attnexport.InferenceSession(source).get_session_options().enable_mem_pattern is True
    # A model without a KV cache: one line, nothing written.
    plain = zoo_model("gpt2", "dynamo18")
    bad = tmp_path / "bad.onnx"
    result = runner.invoke(main, ["convert", plain, "-o", str(bad), "--method", "lse", "--recurrent"])
    assert result.exit_code != 0
    assert "--recurrent" in result.output and "KV cache" in result.output
    assert not bad.exists()
    # A method without a state: refused.
    with pytest.raises(AttnExportError, match="state"):
        api.convert(source, tmp_path / "sparse.onnx", method="sparse", recurrent=True)


def _centres(source: str, clusters: int) -> dict[str, np.ndarray]:
    """Random fixed centres for every site (the equivalence holds for any centres)."""
    rng = np.random.default_rng(3)
    return {f"site{s.index}": rng.normal(size=(s.num_kv_heads, clusters, s.head_dim)).astype(np.float32)
            for s in api.inspect(source)}


@pytest.mark.parametrize("arch, exporter", SUBJECTS)
@pytest.mark.parametrize("window, num_global", [(2, 0), (4, 1)])
def test_clustered_recurrent(arch, exporter, window, num_global, cached_decoder, tmp_path, op_library):
    """--method clustered --recurrent: a bounded KV cache (the last window + 1 keys and values, the globals)
    plus per-cluster sums of everything older gives, call by call, what the causal ClusteredAttention gives
    on the whole sequence (13 tokens: most keys leave the window)."""
    source = cached_decoder(arch, exporter)
    spec = decoders.describe(arch)
    clusters = 3
    options = MethodOptions(window=window, num_global=num_global, num_clusters=clusters,
                            centroids=_centres(source, clusters))
    rows = num_global + window + 1 + clusters + 1
    check_recurrent(source, tmp_path, "clustered", options, state_shape=[spec.num_kv_heads, rows, 2 * spec.head_dim + 1],
                    arch=arch)


def test_clustered_recurrent_refusals(cached_decoder, tmp_path):
    """What has no fixed-size state is refused in one line: no centres, an unbounded window, a dilated one."""
    source = cached_decoder("gpt2", "dynamo18")
    centres = _centres(source, 3)
    cases = [(MethodOptions(window=2, num_clusters=3), "centres|centroids"),
             (MethodOptions(window=-1, num_clusters=3, centroids=centres), "finite --window"),
             (MethodOptions(window=4, dilation=2, num_clusters=3, centroids=centres), "--dilation 2")]
    for i, (options, message) in enumerate(cases):
        out = tmp_path / f"refused{i}.onnx"
        with pytest.raises(AttnExportError, match=message):
            api.convert(source, out, method="clustered", options=options, recurrent=True)
        assert not out.exists()


def test_verify_runs_a_recurrent_model_token_by_token(cached_decoder, tmp_path, op_library):
    """verify on a recurrent conversion: the original on the whole sequence vs the recurrent model token by
    token. A clustered window wider than the sequence keeps every key exact, so it must match the original
    to round-off; LseAttention is an approximation, measured, and fails a tolerance it cannot meet."""
    source = cached_decoder("llama", "torchscript17")
    exact = api.convert(source, tmp_path / "window.onnx", method="clustered", recurrent=True,
                        options=MethodOptions(window=64, num_clusters=2, centroids=_centres(source, 2)))
    report = api.verify(source, exact.output_path, seq_len=10)
    assert report.passed and "token by token" in report.method
    (logits,) = report.comparisons
    assert logits.kernel_vs_original["rel"] < 1e-4 and logits.kernel_vs_function["rel"] < 1e-4
    assert logits.shape[1] == 10
    lse = api.convert(source, tmp_path / "lse.onnx", method="lse", recurrent=True)
    approximate = api.verify(source, lse.output_path, seq_len=10)
    assert approximate.passed and approximate.comparisons[0].kernel_vs_original["rel"] > 1e-3
    assert not api.verify(source, lse.output_path, seq_len=10, tolerance=1e-6).passed
