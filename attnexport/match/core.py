"""The attention core as an onnxscript pattern: MatMul → [scale] → [mask] → Softmax → [NaN guard] → MatMul.

The pattern fixes only the skeleton; its operands (Q, Kᵀ, V, the mask) are free and resolved later
(layout.py traces them back to [B, H, S, D] tensors, masks.py classifies the mask), so one pattern
serves every exporter's way of laying out heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from attnexport.match.constants import scalar


class AttentionCore(pattern.PatternBase):
    def pattern(self, op, query, key_t, value, mask, qk_scale, guard_fill):
        scores = op.MatMul(query, key_t, _outputs=["raw_scores"])
        scores = pattern.OrValue(
            [op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
            tag_var="qk_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        # float16 exports cast the logits to float32 around the Softmax
        scores = pattern.OrValue([op.Cast(scores), scores], tag_var="cast_in", tag_values=[True, False])
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Cast(probs), probs], tag_var="cast_out", tag_values=[True, False])
        # Where(IsNaN(p), 0, p): fully masked rows give zeros instead of NaN
        probs = pattern.OrValue(
            [op.Where(op.IsNaN(probs), guard_fill, probs), probs], tag_var="nan_guard", tag_values=[True, False]
        )
        return op.MatMul(probs, value)


_CORE = AttentionCore()


@dataclass
class CoreMatch:
    """The skeleton of one decomposed attention."""

    output: ir.Value  # the second MatMul's output
    query: ir.Value  # MatMul(query, key_t)
    key_t: ir.Value
    value: ir.Value
    raw_scores: ir.Value  # first MatMul's output
    logits: ir.Value  # Softmax input
    probs: ir.Value  # Softmax output
    mask: ir.Value | None
    qk_scale: ir.Value | None
    qk_scaling: str  # "Mul", "Div" or "None"
    softmax: ir.Node
    nodes: list[ir.Node]


def find_cores(model: ir.Model, graph: ir.Graph | None = None) -> list[CoreMatch]:
    graph = graph or model.graph
    matches = []
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        result = _CORE.match(model, graph, node, check_nodes_are_removable=False)
        if not result:
            continue
        b = result.bindings
        softmax = b["probs"].producer()
        axis = softmax.attributes.get_int("axis", -1)
        rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            continue  # softmax over another axis is not attention over keys
        if b.get("nan_guard") and not _is_zero_constant(b.get("guard_fill")):
            continue
        matches.append(
            CoreMatch(
                output=node.outputs[0],
                query=b["query"],
                key_t=b["key_t"],
                value=b["value"],
                raw_scores=b["raw_scores"],
                logits=softmax.inputs[0],
                probs=b["probs"],
                mask=b.get("mask") if b.get("has_mask") else None,
                qk_scale=b.get("qk_scale") if b.get("qk_scaling") != "None" else None,
                qk_scaling=b.get("qk_scaling", "None"),
                softmax=softmax,
                nodes=list(result.nodes),
            )
        )
    return matches


def _is_zero_constant(value: ir.Value | None) -> bool:
    return scalar(value) == 0.0
