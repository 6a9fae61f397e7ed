"""Rewrite: replace each planned site by one op of the attnexport domain, drop what became dead, attach
the ops' reference functions and record the plan in the model's metadata.

The replacement's output takes over the *name* of the value it replaces, so an attention site's output
has the same name in the original and the converted model (verify compares them by that name).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from attnexport import __version__
from attnexport.ops.schema import DOMAIN, DOMAIN_VERSION
from attnexport.plan import Plan, SitePlan
from attnexport.sites import Operand, Projection

METADATA_PLAN = "attnexport.plan"
METADATA_VERSION = "attnexport.version"


class _Graph:
    """Name lookups and node insertion for one rewrite pass."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.values: dict[str, ir.Value] = {}
        for value in self.graph.inputs:
            self.values[value.name] = value
        for name, value in self.graph.initializers.items():
            self.values[name] = value
        for node in self.graph:
            for out in node.outputs:
                if out.name:
                    self.values[out.name] = out
        self._bool_masks: dict[str, ir.Value] = {}
        self._counter = 0

    def value(self, name: str) -> ir.Value:
        if name not in self.values:
            raise KeyError(f"value {name!r} is not in the graph")
        return self.values[name]

    def fresh(self, stem: str) -> str:
        while True:
            self._counter += 1
            name = f"attnexport/{stem}_{self._counter}"
            if name not in self.values:
                return name

    def initializer(self, stem: str, array: np.ndarray) -> ir.Value:
        name = self.fresh(stem)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        self.values[name] = value
        return value

    def node(self, op_type: str, inputs, attributes=None, *, domain: str = "", stem: str | None = None,
             num_outputs: int = 1) -> ir.Node:
        node = ir.node(op_type, inputs, attributes or {}, domain=domain, name=self.fresh(stem or op_type),
                       num_outputs=num_outputs)
        for index, out in enumerate(node.outputs):
            out.name = self.fresh((stem or op_type) + "_out")
            dtype = _output_dtype(node) if index == 0 else _STATE_DTYPE.get(node.op_type)
            if dtype is not None:
                out.dtype = dtype
            self.values[out.name] = out
        return node

    def key_padding_flags(self, input_name: str) -> tuple[ir.Value, list[ir.Node]]:
        """A bool [B, Skv] value from a graph input (cast once, shared by every site)."""
        if input_name in self._bool_masks:
            return self._bool_masks[input_name], []
        source = self.value(input_name)
        if source.dtype == ir.DataType.BOOL:
            self._bool_masks[input_name] = source
            return source, []
        cast = self.node("Cast", [source], {"to": ir.DataType.BOOL}, stem="key_padding_mask")
        self._bool_masks[input_name] = cast.outputs[0]
        return cast.outputs[0], [cast]


_SAME_AS_FIRST_INPUT = {"Transpose", "Reshape", "Add", "Slice", "Identity", "Gather", "Split", "Unsqueeze", "Concat",
                        "MatMul", "Range"}


# Element type of the second output (the recurrent state) of attnexport ops that have one.
_STATE_DTYPE = {"LseAttention": ir.DataType.FLOAT}


def _output_dtype(node: ir.Node) -> ir.DataType | None:
    """Element type of what the rewriter's own nodes produce, so later steps (function attachment,
    shape inference) see typed values."""
    if node.op_type == "Cast":
        return ir.DataType(node.attributes.get_int("to"))
    if node.op_type == "Shape":
        return ir.DataType.INT64
    if node.op_type == "Less":
        return ir.DataType.BOOL
    if node.domain == DOMAIN or node.op_type in _SAME_AS_FIRST_INPUT:
        first = node.inputs[0] if node.inputs else None
        return first.dtype if first is not None else None
    return None


def _to_bhsd(g: _Graph, operand: Operand, stem: str, source: ir.Value | None = None) -> tuple[ir.Value, list[ir.Node]]:
    """Nodes that bring `operand` to [B, H, S, D] (see Operand for the order of the steps)."""
    value = source if source is not None else g.value(operand.value)
    nodes: list[ir.Node] = []
    if operand.part is not None:
        bounds = [g.initializer(f"{stem}_part_{n}", np.array([x], dtype=np.int64))
                  for n, x in (("start", operand.part[0]), ("end", operand.part[1]), ("axis", -1))]
        part = g.node("Slice", [value, *bounds], stem=f"{stem}_part")
        nodes.append(part)
        value = part.outputs[0]
    if operand.bias is not None:
        start, end = operand.bias_range
        bounds = [g.initializer(f"{stem}_bias_{n}", np.array([x], dtype=np.int64))
                  for n, x in (("start", start), ("end", end), ("axis", 0))]
        part = g.node("Slice", [g.value(operand.bias), *bounds], stem=f"{stem}_bias")
        add = g.node("Add", [value, part.outputs[0]], stem=f"{stem}_add_bias")
        nodes += [part, add]
        value = add.outputs[0]
    if operand.packed_heads is not None:
        shape = g.initializer(f"{stem}_heads_shape", np.array([0, 0, operand.packed_heads, -1], dtype=np.int64))
        reshape = g.node("Reshape", [value, shape], stem=f"{stem}_split_heads")
        transpose = g.node("Transpose", [reshape.outputs[0]], {"perm": [0, 2, 1, 3]}, stem=f"{stem}_bhsd")
        return transpose.outputs[0], nodes + [reshape, transpose]
    if operand.perm is not None:
        transpose = g.node("Transpose", [value], {"perm": list(operand.perm)}, stem=f"{stem}_bhsd")
        nodes.append(transpose)
        value = transpose.outputs[0]
    return value, nodes


def _project(g: _Graph, projection: Projection, stem: str) -> tuple[list[ir.Value], list[ir.Node]]:
    """qkv = input @ weight (+ bias), split into Q, K, V ([B, S, H*D] each)."""
    matmul = g.node("MatMul", [g.value(projection.input), g.value(projection.weight)], stem=f"{stem}_qkv")
    nodes = [matmul]
    qkv = matmul.outputs[0]
    if projection.bias is not None:
        add = g.node("Add", [qkv, g.value(projection.bias)], stem=f"{stem}_qkv_bias")
        nodes.append(add)
        qkv = add.outputs[0]
    sizes = g.initializer(f"{stem}_qkv_sizes", np.array(projection.sizes, dtype=np.int64))
    split = ir.node("Split", [qkv, sizes], {"axis": -1}, num_outputs=3, name=g.fresh(f"{stem}_qkv_split"))
    for out in split.outputs:
        out.name = g.fresh(f"{stem}_qkv_part")
        if qkv.dtype is not None:
            out.dtype = qkv.dtype
        g.values[out.name] = out
    nodes.append(split)
    return list(split.outputs), nodes


def _key_padding_from_lengths(g: _Graph, lengths_name: str, k: ir.Value, stem: str,
                              offset: int = 0) -> tuple[ir.Value, list[ir.Node]]:
    """[B, Skv] bool: key j is real iff j < length[b] + offset (com.microsoft end-position masks)."""
    lengths = g.value(lengths_name)
    shape = g.node("Shape", [k], stem=f"{stem}_k_shape")
    two = g.initializer(f"{stem}_axis2", np.array(2, dtype=np.int64))
    kv_len = g.node("Gather", [shape.outputs[0], two], {"axis": 0}, stem=f"{stem}_kv_len")
    zero = g.initializer(f"{stem}_zero", np.array(0, dtype=np.int64))
    one = g.initializer(f"{stem}_one", np.array(1, dtype=np.int64))
    positions = g.node("Range", [zero, kv_len.outputs[0], one], stem=f"{stem}_positions")
    cast = g.node("Cast", [lengths], {"to": ir.DataType.INT64}, stem=f"{stem}_lengths")
    nodes = [shape, kv_len, positions, cast]
    lengths = cast.outputs[0]
    if offset:
        shifted = g.node("Add", [lengths, g.initializer(f"{stem}_length_offset", np.array(offset, dtype=np.int64))],
                         stem=f"{stem}_lengths_shifted")
        nodes.append(shifted)
        lengths = shifted.outputs[0]
    axis1 = g.initializer(f"{stem}_axis1", np.array([1], dtype=np.int64))
    column = g.node("Unsqueeze", [lengths, axis1], stem=f"{stem}_lengths_column")
    less = g.node("Less", [positions.outputs[0], column.outputs[0]], stem=f"{stem}_key_padding_mask")
    return less.outputs[0], nodes + [column, less]


def _from_bhsd(g: _Graph, y: ir.Value, layout: str, stem: str) -> tuple[ir.Value, list[ir.Node]]:
    if layout == "bhsd":
        return y, []
    if layout == "bsd":  # [B, H, S, Dv] -> [B, S, H*Dv]
        transpose = g.node("Transpose", [y], {"perm": [0, 2, 1, 3]}, stem=f"{stem}_bshd")
        shape = g.initializer(f"{stem}_merge_shape", np.array([0, 0, -1], dtype=np.int64))
        reshape = g.node("Reshape", [transpose.outputs[0], shape], stem=f"{stem}_merge_heads")
        return reshape.outputs[0], [transpose, reshape]
    if layout == "bh_merged":  # [B, H, S, Dv] -> [B*H, S, Dv]
        # Shape + Slice rather than Shape(start=2), which needs opset 15
        full = g.node("Shape", [y], stem=f"{stem}_y_shape")
        bounds = [g.initializer(f"{stem}_tail_{n}", np.array([x], dtype=np.int64)) for n, x in (("start", 2), ("end", 4))]
        tail = g.node("Slice", [full.outputs[0], *bounds], stem=f"{stem}_tail_shape")
        minus_one = g.initializer(f"{stem}_minus_one", np.array([-1], dtype=np.int64))
        shape = g.node("Concat", [minus_one, tail.outputs[0]], {"axis": 0}, stem=f"{stem}_merged_shape")
        reshape = g.node("Reshape", [y, shape.outputs[0]], stem=f"{stem}_merge_batch_heads")
        return reshape.outputs[0], [full, tail, shape, reshape]
    raise ValueError(f"unknown output layout {layout!r}")


def _replace_site(g: _Graph, site_plan: SitePlan) -> None:
    site = site_plan.site
    replacement = site_plan.replacement
    stem = f"site{site.index}"
    new_nodes: list[ir.Node] = []
    sources: list[ir.Value | None] = [None, None, None]
    if site.projection is not None:
        sources, nodes = _project(g, site.projection, stem)
        new_nodes += nodes
    q, nodes = _to_bhsd(g, site.q, f"{stem}_q", sources[0])
    new_nodes += nodes
    k, nodes = _to_bhsd(g, site.k, f"{stem}_k", sources[1])
    new_nodes += nodes
    v, nodes = _to_bhsd(g, site.v, f"{stem}_v", sources[2])
    new_nodes += nodes
    # Values of graphs without value_info carry no type; the probe saw it, and the op's reference
    # function (built per dtype below opset 15) needs it.
    for value in (q, k, v):
        if value.dtype is None and site.dtype:
            value.dtype = ir.DataType.from_numpy(np.dtype(site.dtype))
    inputs: dict[str, ir.Value | None] = {"Q": q, "K": k, "V": v}
    if site.mask.key_padding_input:
        if site.mask.key_padding_kind == "end_positions":
            flags, nodes = _key_padding_from_lengths(g, site.mask.key_padding_input, k, stem,
                                                     site.mask.key_padding_offset)
        else:
            flags, nodes = g.key_padding_flags(site.mask.key_padding_input)
        inputs["key_padding_mask"] = flags
        new_nodes += nodes
    for name, array in replacement.extra_inputs.items():
        inputs[name] = g.initializer(f"{stem}_{name}", array)
    for name, value_name in replacement.value_inputs.items():  # graph values the op reads (attn_bias)
        value, dtype = g.value(value_name), g.value(site.q.value).dtype
        if value.dtype is not None and dtype is not None and value.dtype != dtype:
            cast = g.node("Cast", [value], {"to": dtype}, stem=f"{stem}_{name}")
            new_nodes.append(cast)
            value = cast.outputs[0]
        inputs[name] = value
    schema = replacement.op
    ordered = [inputs.get(spec.name) for spec in schema.inputs]
    while ordered and ordered[-1] is None:
        ordered.pop()
    # Outputs the schema requires (LseAttention always produces present_state).
    outputs = 1 + sum(1 for spec in schema.outputs[1:] if not spec.optional)
    op = g.node(schema.name, ordered, replacement.attributes, domain=DOMAIN, stem=f"{stem}_{schema.name}",
                num_outputs=outputs)
    new_nodes.append(op)
    y = op.outputs[0]
    if replacement.output_map is not None:  # calibrated per-head affine map: Y @ W[h] + b[h]
        weight, bias = replacement.output_map
        matmul = g.node("MatMul", [y, g.initializer(f"{stem}_output_map_weight", weight)], stem=f"{stem}_output_map")
        add = g.node("Add", [matmul.outputs[0], g.initializer(f"{stem}_output_map_bias", bias)],
                     stem=f"{stem}_output_map_bias")
        new_nodes += [matmul, add]
        y = add.outputs[0]
    y, nodes = _from_bhsd(g, y, site.output_layout, stem)
    new_nodes += nodes

    old = g.value(site.output)
    anchor = old.producer()
    g.graph.insert_after(anchor, new_nodes)
    ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
    # The replacement takes over the replaced value's name (graph outputs keep theirs, and verify can
    # find the site's output by name in both models).
    name = old.name
    old.name = g.fresh(f"{stem}_replaced")
    y.name = name
    if y.is_graph_output():  # a graph output keeps its declared type and shape
        y.dtype = old.dtype if old.dtype is not None else y.dtype
        if old.shape is not None:
            y.shape = old.shape
    g.values[name] = y


def apply(model: ir.Model, plan: Plan) -> ir.Model:
    """Rewrite `model` in place by `plan`, attach op functions, record the plan; returns `model`."""
    from attnexport.ops.functions import attach_functions

    g = _Graph(model)
    for site_plan in plan.selected:
        _replace_site(g, site_plan)
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    attach_functions(model)
    model.metadata_props[METADATA_PLAN] = plan.to_json()
    model.metadata_props[METADATA_VERSION] = __version__
    return model


def recorded_plan(model: ir.Model) -> dict | None:
    text = model.metadata_props.get(METADATA_PLAN)
    return json.loads(text) if text else None
