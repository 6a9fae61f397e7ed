"""Finding attention: every matcher turns the forms it knows into AttentionSites.

    find_sites(model) -> list[AttentionSite]

Candidates come from structure (onnxscript patterns over the graph); one probe run on synthesised (or
given) inputs confirms them and classifies their masks. A candidate that cannot be represented
faithfully is still reported, with replaceable=False and the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from attnexport.match import decomposed, ms_contrib, onnx_attention
from attnexport.match.probing import run_probes
from attnexport.probe import ProbeError
from attnexport.sites import AttentionSite

MATCHERS = (decomposed.find_candidates, onnx_attention.find_candidates, ms_contrib.find_candidates)


def find_candidates(model: ir.Model) -> list:
    candidates = [c for matcher in MATCHERS for c in matcher(model)]
    order = {id(node): i for i, node in enumerate(model.graph)}
    candidates.sort(key=lambda c: order.get(id(c.anchor), 0))
    return candidates


PREPARED = "attnexport.prepared"
_ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}


def prepare(model: ir.Model) -> list[str]:
    """Bring attention into the main graph where matchers see it: model-local functions that contain
    attention are inlined (deterministically, so verify can inline the original the same way). The
    steps taken are recorded in the model's metadata."""
    steps = []
    if any(node.op_type in _ATTENTION_OPS for f in model.functions.values() for node in f):
        InlinePass()(model)
        steps.append("inline_functions")
    if steps:
        model.metadata_props[PREPARED] = ",".join(steps)
    return steps


def find_sites(model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> list[AttentionSite]:
    """Every attention site of `model` (which is first prepared, in place: see prepare())."""
    prepare(model)
    candidates = find_candidates(model)
    if not candidates:
        return []
    try:
        base, padded = run_probes(model, candidates, feeds)
    except ProbeError as e:
        sites = []
        for i, c in enumerate(candidates):
            site = c.unprobed_site(i)
            site.replaceable = False
            # A reason read off the structure (rotary inside the op, a KV cache, ...) says more than
            # the failed run.
            structural = c.structural_problem() if hasattr(c, "structural_problem") else None
            site.reason = structural or f"not confirmed: {e}; pass real inputs with --inputs"
            sites.append(site)
        return sites
    return [c.build_site(i, base, padded) for i, c in enumerate(candidates)]
