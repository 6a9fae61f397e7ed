"""verify for a recurrent conversion (`convert --recurrent`): the original decoder runs the whole sequence
in one call with an empty cache; the recurrent model runs it token by token, carrying its state (zeros
first), with the kernels and with the reference functions. Their outputs on the new tokens (every graph
output the two share, concatenated over the calls along the token axis) are compared as verify compares
any conversion (verification.py): kernel vs function to round-off, converted vs original within
--tolerance when given."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from attnexport import inputs
from attnexport.errors import AttnExportError
from attnexport.recurrent import METADATA_RECURRENT, PAST_LENGTH_INPUT
from attnexport.runtime import create_session, external_data_dir
from attnexport.verification import ROUNDOFF, Comparison, VerifyReport, metrics


def is_recurrent(model: ir.Model) -> bool:
    return METADATA_RECURRENT in model.metadata_props


def verify_recurrent(original: ir.Model, converted: ir.Model, plan: dict, paths: tuple[str, str], *,
                     seq_len: int | None, batch: int, tolerance: float | None, threads: int | None,
                     providers) -> VerifyReport:
    meta = json.loads(converted.metadata_props[METADATA_RECURRENT])
    cache_inputs = {n for layer in meta["layers"] for n in layer["replaces_inputs"]}
    feeds = inputs.synthesize(original, inputs.ProbeShape(batch=batch, seq_len=seq_len or 12, past_len=0))
    mask_name = meta.get("mask_input") if isinstance(meta.get("mask_input"), str) else None
    mask_name = mask_name or next((s.name for s in inputs.signature(original) if inputs.is_mask_input(s)), None)
    shared = [v.name for v in converted.graph.outputs if v.name in {o.name for o in original.graph.outputs}]
    if not shared:
        raise AttnExportError("the recurrent model shares no output with the original (besides the cache); "
                              "nothing to compare")
    reference = _session(original, threads, providers, with_library=False).run(shared, feeds)
    reference = dict(zip(shared, reference))
    tokens = [s.name for s in inputs.signature(original) if s.name not in cache_inputs and s.name != mask_name]
    steps = {lib: _token_by_token(_session(converted, threads, providers if lib else None, with_library=lib),
                                  feeds, tokens, mask_name, shared)
             for lib in (True, False)}
    comparisons = []
    for name in shared:
        dtype = "float16" if np.asarray(reference[name]).dtype == np.float16 else "float32"
        c = Comparison(name=name, kind="output", shape=list(np.shape(reference[name])),
                       kernel_vs_function=metrics(steps[False][name], steps[True][name]),
                       kernel_vs_original=metrics(reference[name], steps[True][name]),
                       function_vs_original=metrics(reference[name], steps[False][name]))
        roundoff = ROUNDOFF[dtype]["output"]
        if not c.kernel_vs_function["rel"] <= roundoff:
            c.problems.append(f"kernel and function disagree (rel {c.kernel_vs_function['rel']:.2e} > {roundoff:g})")
        if tolerance is not None and not c.kernel_vs_original["rel"] <= tolerance:
            c.problems.append(f"converted differs from original (rel {c.kernel_vs_original['rel']:.2e} > {tolerance:g})")
        c.passed = not c.problems
        comparisons.append(c)
    return VerifyReport(original=paths[0], converted=paths[1], method=f"{plan.get('method', '?')} (recurrent, token "
                        "by token)", exact=False, tolerance=tolerance, feeds={k: list(v.shape) for k, v in feeds.items()},
                        comparisons=comparisons)


def _session(model: ir.Model, threads, providers, *, with_library: bool):
    from attnexport.probe import model_with_outputs

    proto = model_with_outputs(model, [v.name for v in model.graph.outputs])
    return create_session(proto, with_library=with_library, threads=threads, providers=providers,
                          base_dir=external_data_dir(model))


def _token_by_token(session, feeds: dict, tokens: list[str], mask_name: str | None, shared: list[str]) -> dict:
    """Run the recurrent model one token per call; the shared outputs concatenated over the calls (axis 1)."""
    specs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    batch = next(np.shape(feeds[n])[0] for n in tokens)
    length = next(np.shape(feeds[n])[1] for n in tokens)
    state = {n: np.zeros([batch] + [int(d) for d in s.shape[1:]], np.float32) for n, s in specs.items()
             if n.startswith("past_state.")}
    pieces: dict[str, list] = {n: [] for n in shared}
    for t in range(length):
        step = {n: feeds[n][:, t:t + 1] for n in tokens if n in specs}
        if mask_name in specs:
            step[mask_name] = feeds[mask_name][:, :t + 1]
        if PAST_LENGTH_INPUT in specs:
            step[PAST_LENGTH_INPUT] = np.array(t, np.int64)
        out = dict(zip(names, session.run(None, {**step, **state})))
        state = {n.replace("present_state.", "past_state."): v for n, v in out.items() if n.startswith("present_state.")}
        for n in shared:
            pieces[n].append(out[n])
    return {n: np.concatenate(v, axis=1) for n, v in pieces.items()}


__all__ = ["is_recurrent", "verify_recurrent"]
