"""The attention core as an onnxscript pattern:

    product(Q, K) → [scale] → [softcap] → [mask] → [Cast] → Softmax → [Cast] → [NaN guard] → product(P, V)

where a product is MatMul, com.microsoft FusedMatMul (transB, alpha) or Einsum. The pattern fixes only
the skeleton; its operands (Q, K or Kᵀ, V, the mask) are free and resolved later (layout.py traces them
back to [B, H, S, D] tensors, masks.py classifies the mask), so one pattern serves every exporter's way
of laying out heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from attnexport.match.constants import scalar


class AttentionCore(pattern.PatternBase):
    """One instance per final product op (the pattern API cannot end in a choice)."""

    def __init__(self, output_product: str):
        super().__init__(name=f"AttentionCore[{output_product}]")
        self.output_product = output_product

    def pattern(self, op, query, key, value, mask, qk_scale, guard_fill, cap_in, cap_out):
        scores = pattern.OrValue(
            [
                op.MatMul(query, key, _outputs=["raw_scores"]),
                op.FusedMatMul(query, key, _domain="com.microsoft", _allow_other_attributes=True,
                               _outputs=["raw_scores"]),
                op.Einsum(query, key, _allow_other_attributes=True, _outputs=["raw_scores"]),
            ],
            tag_var="product",
            tag_values=["MatMul", "FusedMatMul", "Einsum"],
        )
        scores = pattern.OrValue(
            [op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
            tag_var="qk_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        # softcap: cap · tanh(s / cap) (Gemma 2, Grok): recognised so that it can be reported
        scores = pattern.OrValue(
            [op.Mul(op.Tanh(op.Div(scores, cap_in)), cap_out), scores], tag_var="softcap", tag_values=[True, False]
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
        if self.output_product == "Einsum":
            return op.Einsum(probs, value, _allow_other_attributes=True)
        return op.MatMul(probs, value)


_CORES = {"MatMul": AttentionCore("MatMul"), "Einsum": AttentionCore("Einsum")}


@dataclass
class CoreMatch:
    """The skeleton of one decomposed attention."""

    output: ir.Value  # the second product's output
    query: ir.Value
    key: ir.Value  # Kᵀ when key_transposed, else K (FusedMatMul transB=1, Einsum "…kd")
    value: ir.Value
    raw_scores: ir.Value  # the first product's output
    logits: ir.Value  # Softmax input
    probs: ir.Value  # Softmax output
    mask: ir.Value | None
    qk_scale: ir.Value | None
    qk_scaling: str  # "Mul", "Div" or "None"
    softmax: ir.Node
    nodes: list[ir.Node]
    key_transposed: bool = True
    product_alpha: float = 1.0  # FusedMatMul's alpha
    softcap: bool = False
    problem: str = ""  # a structural reason the site cannot be replaced

    @property
    def key_t(self) -> ir.Value:  # kept for readers of the older name
        return self.key


def find_cores(model: ir.Model, graph: ir.Graph | None = None) -> list[CoreMatch]:
    graph = graph or model.graph
    matches = []
    for node in list(graph):
        if node.op_type not in ("MatMul", "Einsum") or node.domain not in ("", "ai.onnx"):
            continue
        result = _CORES[node.op_type].match(model, graph, node, check_nodes_are_removable=False)
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
        first = b["raw_scores"].producer()
        key_transposed, alpha, problem = _product(first, node)
        if problem is None:
            continue
        matches.append(
            CoreMatch(
                output=node.outputs[0], query=b["query"], key=b["key"], value=b["value"],
                raw_scores=b["raw_scores"], logits=softmax.inputs[0], probs=b["probs"],
                mask=b.get("mask") if b.get("has_mask") else None,
                qk_scale=b.get("qk_scale") if b.get("qk_scaling") != "None" else None,
                qk_scaling=b.get("qk_scaling", "None"), softmax=softmax, nodes=list(result.nodes),
                key_transposed=key_transposed, product_alpha=alpha, softcap=bool(b.get("softcap")),
                problem=problem if problem else ("softcap (tanh logit capping) is not reproduced by attnexport ops"
                                                 if b.get("softcap") else ""),
            )
        )
    return matches


def _product(first: ir.Node, last: ir.Node) -> tuple[bool, float, str | None]:
    """(is the key operand Kᵀ?, alpha, problem) of the score product; problem None = not attention."""
    if first.op_type == "MatMul":
        transposed, alpha = True, 1.0
    elif first.op_type == "FusedMatMul":
        a = first.attributes
        if a.get_int("transA", 0) or a.get_int("transBatchA", 0) or a.get_int("transBatchB", 0):
            return True, 1.0, None
        transposed, alpha = not a.get_int("transB", 0), a.get_float("alpha", 1.0)
    else:
        parsed = _einsum_scores(first.attributes.get_string("equation", ""))
        if parsed is None:
            return True, 1.0, None
        transposed, alpha = parsed, 1.0
    if last.op_type == "Einsum" and not _einsum_values(last.attributes.get_string("equation", "")):
        return True, 1.0, None
    return transposed, alpha, ""


_EQ = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _einsum_scores(equation: str) -> bool | None:
    """"bhqd,bhkd->bhqk" → False (K as is), "bhqd,bhdk->bhqk" → True (Kᵀ); None if not Q·Kᵀ per head."""
    m = _EQ.match(equation)
    if not m:
        return None
    a, b, out = m.groups()
    if len(a) < 2 or len(b) != len(a) or len(out) != len(a) or a[:-2] != b[:-2] or a[:-2] != out[:-2]:
        return None
    q, d = a[-2], a[-1]
    if b[-1] == d and out[-2:] == q + b[-2]:
        return False
    if b[-2] == d and out[-2:] == q + b[-1]:
        return True
    return None


def _einsum_values(equation: str) -> bool:
    """"bhqk,bhkd->bhqd": P·V per head."""
    m = _EQ.match(equation)
    if not m:
        return False
    a, b, out = m.groups()
    return (len(a) == len(b) == len(out) >= 2 and a[:-2] == b[:-2] == out[:-2] and a[-1] == b[-2]
            and out[-2:] == a[-2] + b[-1])


def _is_zero_constant(value: ir.Value | None) -> bool:
    return scalar(value) == 0.0
