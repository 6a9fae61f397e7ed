"""KV caches: which attention sites attend over keys and values that a decoder carries between calls.

A decoder exported with its cache concatenates, per layer, a graph input (the past keys,
[B, Hkv, P, D] in some layout) with the keys of the new tokens along the sequence axis, attends over
the result and returns it as a graph output (the present keys); the same for values:

    past_key_values.i.key ──► Concat(axis = sequence) ◄── new keys
                                   │
                                   ├──► K of the attention site ──► ...
                                   └──► present.i.key (graph output)

`find_cache(model, site)` recognises that form for a site found by the other matchers (whose K and
V operands are the Concat outputs) and returns where the past comes from, the new keys/values
(with the site's permutation to [B, H, S, D]) and the present outputs. Between the graph input and
the Concat it looks through Identity, Cast and Concats that add nothing (a single input, or
constants with no entries along the axis: an empty initial cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from attnexport.match.constants import constant_array
from attnexport.sites import AttentionSite, Operand

_THROUGH = ("Identity", "Cast")
MAX_STEPS = 8


@dataclass
class CacheSide:
    """Keys (or values) of one site's cache."""

    past_input: str  # the graph input with the past ([B, Hkv, P, D] in the stored layout)
    new: Operand  # the new tokens' keys (values), with the permutation to [B, Hkv, S, D]
    total: str  # the Concat's output: past + new
    present_output: str | None  # the graph output returning `total`, if the model returns it
    seq_axis: int  # the sequence axis of the stored layout
    past_chain: list[str]  # values equal to the past, from the graph input to the Concat's first input


@dataclass
class KVCache:
    site: int
    key: CacheSide
    value: CacheSide


def _graph_values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def _axis(node: ir.Node, rank: int) -> int | None:
    attr = node.attributes.get("axis")
    if attr is None:
        return None
    axis = attr.as_int()
    return axis + rank if axis < 0 else axis


def _empty_along(value: ir.Value, axis: int) -> bool:
    array = constant_array(value)
    return array is not None and array.ndim > axis and array.shape[axis] == 0


def _past_source(value: ir.Value, axis: int, inputs: set[str], chain: list[str] | None = None) -> str | None:
    """The graph input `value` comes from through ops that leave it unchanged, or None; `chain`
    collects the values passed on the way."""
    for _ in range(MAX_STEPS):
        if chain is not None:
            chain.append(value.name)
        if value.name in inputs and value.producer() is None:
            return value.name
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in _THROUGH and node.inputs and node.inputs[0] is not None:
            value = node.inputs[0]
            continue
        if node.op_type == "Concat":
            live = [v for v in node.inputs if v is not None and not _empty_along(v, axis)]
            if len(live) == 1 and _axis(node, 4) == axis:
                value = live[0]
                continue
        return None
    return None


def _side(model: ir.Model, values: dict[str, ir.Value], operand: Operand, what: str) -> CacheSide | str:
    total = values.get(operand.value)
    if total is None or operand.packed_heads is not None:
        return f"the site's {what} are not a 4-D value of the graph"
    node = total.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return f"the site's {what} are not a concatenation of a past input and new {what}"
    perm = operand.perm or (0, 1, 2, 3)
    seq_axis = perm[2]
    if _axis(node, 4) != seq_axis:
        return f"the {what} are concatenated along axis {_axis(node, 4)}, not the sequence axis {seq_axis}"
    inputs = {v.name for v in model.graph.inputs}
    chain: list[str] = []
    sources = [_past_source(node.inputs[0], seq_axis, inputs, chain) if node.inputs[0] is not None else None,
               _past_source(node.inputs[1], seq_axis, inputs) if node.inputs[1] is not None else None]
    if sources[0] is None or sources[1] is not None:
        return f"the first part of the {what}' concatenation is not a graph input (a past cache)"
    new = node.inputs[1]
    if new is None or not new.name:
        return f"the new {what} have no name"
    outputs = [v.name for v in model.graph.outputs]
    present = total.name if total.name in outputs else None
    return CacheSide(past_input=sources[0], new=Operand(new.name, operand.perm), total=total.name,
                     present_output=present, seq_axis=seq_axis, past_chain=chain)


def find_cache(model: ir.Model, site: AttentionSite) -> KVCache | str:
    """The KV cache of `site`, or the reason it has none."""
    values = _graph_values(model)
    key = _side(model, values, site.k, "keys")
    if isinstance(key, str):
        return key
    value = _side(model, values, site.v, "values")
    if isinstance(value, str):
        return value
    if key.past_input == value.past_input:
        return "keys and values come from the same past input"
    return KVCache(site.index, key, value)


__all__ = ["CacheSide", "KVCache", "find_cache"]
