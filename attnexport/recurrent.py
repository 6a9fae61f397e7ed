"""A decoder with a growing KV cache → a recurrent model with a fixed-size state per layer.

`convert --method lse --recurrent` (or `--method linear`, or `--method clustered --centroids FILE`, with
`--recurrent`) takes a decoder exported with its cache: per layer, graph inputs with the past keys and
values, concatenated with the new tokens' keys and values before the attention product, and graph
outputs returning the concatenation (the present cache). Each such attention site becomes one op that
reads only the new keys and values and carries everything earlier in a state of fixed size:

    past_key_values.i.key, past_key_values.i.value   (inputs,  [B, Hkv, P, D], grow with P)
    present.i.key,         present.i.value           (outputs, [B, Hkv, P + S, D])
        ──►
    past_state.<l>                                   (input,  fixed size, float32)
    present_state.<l>                                (output, the same shape)

`<l>` counts the cached sites in graph order (0, 1, ...). The state layouts are the ops' own:
LseAttention [B, Hkv, Dk, Dv + 2] = [S | z | m] (float32), LinearAttention [B, Hkv, F, Dv + 2] =
[S | z | m] (float32; m is favor's shift, 0 otherwise), ClusteredAttention [B, Hkv, G + W + 1 + M + 1,
Dk + Dv + 1] (the globals and the last W + 1 keys and values exactly, per-cluster sums of the values of
everything older, the position; float32): a bounded KV cache plus a clustered summary. Zeros are the
empty state. The mapping is recorded in the model's metadata under
`attnexport.recurrent` (JSON).

What a caller feeds per step (the rest of the signature is the original's):
- the new tokens (`input_ids [B, S]`, S = 1 when decoding token by token);
- the attention mask as the original takes it, covering past and new tokens ([B, P + S]): only its
  last S columns reach the ops (padding of earlier tokens is already in the state), and the model's
  own uses (positions) keep reading it;
- `past_state.<l>`: zeros for the first call, then the previous call's `present_state.<l>`.
The original graph may read the past length from the cache's shape (position ids); the converted
model then computes it as the attention mask's length minus S. A model without a 2-D mask input
gets an int64 scalar input `past_sequence_length` (P) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from attnexport import inputs as model_inputs
from attnexport import probe, rewrite
from attnexport.errors import UnsupportedError
from attnexport.match.kv_cache import KVCache, find_cache
from attnexport.ops.schema import DOMAIN
from attnexport.plan import Plan

METADATA_RECURRENT = "attnexport.recurrent"
PAST_LENGTH_INPUT = "past_sequence_length"
STATE_LAYOUTS = {
    "LseAttention": "[B, Hkv, Dk, Dv + 2] = [S_d (Dv) | z_d | m_d] per key dimension d, float32",
    "LinearAttention": "[B, Hkv, F, Dv + 2] = [S_f (Dv) | z_f | m_f] per feature f (m_f: favor's shift, else 0), "
                       "float32",
    "ClusteredAttention": "[B, Hkv, G + R + M + 1, Dk + Dv + 1]: G global rows and R = W + 1 window rows (oldest "
                          "first) [k | v | flag], M cluster rows [0 | sum v | count], a last row [P, 0, ...], float32",
}


@dataclass
class Layer:
    index: int  # <l>
    site: int
    op: str
    past_state: str
    present_state: str
    state_shape: list
    replaces_inputs: list[str]
    replaces_outputs: list[str]


@dataclass
class RecurrentResult:
    layers: list[Layer] = field(default_factory=list)
    past_length_input: str | None = None  # PAST_LENGTH_INPUT when the model needed it
    mask_input: str | None = None  # the attention mask input that gives the past length

    def to_json(self) -> str:
        layout = {layer.op: STATE_LAYOUTS.get(layer.op, "") for layer in self.layers}
        return json.dumps({
            "layers": [layer.__dict__ for layer in self.layers],
            "state_layout": layout,
            "past_length": (f"input {self.past_length_input}" if self.past_length_input else
                            f"length of {self.mask_input} minus the new tokens" if self.mask_input else "unused"),
            "per_step": "new tokens; the attention mask over past + new tokens (as the original); "
                        "past_state.<l> = zeros first, then the previous present_state.<l>",
        }, separators=(",", ":"), default=str)


def _state_input(replacement, site, batch) -> tuple[list, ir.DataType]:
    """Shape and element type of the state of `site` replaced by `replacement`."""
    op = replacement.op.name
    if op == "LseAttention":
        return [batch, site.num_kv_heads, site.head_dim, site.v_head_dim + 2], ir.DataType.FLOAT
    if op == "LinearAttention":
        fm, d = replacement.attributes["feature_map"], site.head_dim
        if fm == "taylor2" and replacement.attributes["expansion_point"] != "zero":
            raise UnsupportedError("--recurrent: taylor2 with --expansion-point mean or max cannot carry a state "
                                   "(its expansion point needs every past logit); use zero")
        features = {"elu1": d, "relu": d, "taylor2": 1 + d + d * (d + 1) // 2}.get(fm)
        if fm == "favor":
            features = replacement.extra_inputs["projection"].shape[1]
        # float32 whatever the model's type: z_f sums over every key and leaves float16's range.
        return [batch, site.num_kv_heads, features, site.v_head_dim + 2], ir.DataType.FLOAT
    if op == "ClusteredAttention":
        return _clustered_state(replacement, site, batch), ir.DataType.FLOAT
    raise UnsupportedError(f"--recurrent: {op} has no state input")


def _clustered_state(replacement, site, batch) -> list:
    """[B, Hkv, G + R + M + 1, Dk + Dv + 1]: the globals, the window (R = W + 1 positions: the bounded KV
    cache), the per-cluster sums of everything older, the position counter."""
    a = replacement.attributes
    if a["cluster"] != "keys":
        raise UnsupportedError("--recurrent: --cluster queries has no state (every query centre attends to every key)")
    if a["window_left"] < 0:
        raise UnsupportedError("--recurrent: ClusteredAttention keeps the last W keys exactly, so it needs a finite "
                               "--window W (not 'full')")
    if a["dilation"] != 1:
        raise UnsupportedError(f"--recurrent: --dilation {a['dilation']}: a dilated window has no fixed-size state "
                               "(a key moves between the window and the clusters); use --dilation 1")
    if "centroids" not in replacement.extra_inputs:
        raise UnsupportedError("--recurrent: ClusteredAttention needs fitted centres (--centroids FILE.npz)")
    rows = a["num_global"] + a["window_left"] + 1 + a["num_clusters"] + 1
    return [batch, site.num_kv_heads, rows, site.head_dim + site.v_head_dim + 1]


def _caches(model: ir.Model, plan: Plan) -> dict[int, KVCache]:
    caches: dict[int, KVCache] = {}
    for site_plan in plan.sites:
        site = site_plan.site
        found = find_cache(model, site) if site.replaceable or site_plan.selected else "not replaceable"
        if not site_plan.selected:
            if isinstance(found, KVCache):
                raise UnsupportedError(f"--recurrent: site {site.index} ({site.name}) reads a KV cache but is kept "
                                       f"({site_plan.skip_reason}); every cached site must be replaced")
            continue
        if isinstance(found, str):
            raise UnsupportedError(f"--recurrent: site {site.index} ({site.name}) has no KV cache to replace: {found}")
        if not site.mask.causal:
            raise UnsupportedError(f"--recurrent: site {site.index} ({site.name}) is not causal; a recurrent state "
                                   "needs causal attention")
        if not any(spec.name == "past_state" for spec in site_plan.replacement.op.inputs):
            raise UnsupportedError(f"--recurrent: {site_plan.replacement.op.name} has no state input")
        caches[site.index] = found
    if not caches:
        raise UnsupportedError("--recurrent: no attention site reads a KV cache (past key/value inputs "
                               "concatenated with the new keys and values)")
    return caches


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


class _Builder:
    """Small graph edits with fresh names."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.used = set(_values(model)) | set(model.graph.initializers)
        self.counter = 0

    def name(self, stem: str) -> str:
        while True:
            self.counter += 1
            candidate = f"attnexport/recurrent/{stem}_{self.counter}"
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate

    def node(self, op_type: str, inputs, attributes=None, stem: str = "") -> ir.Node:
        node = ir.node(op_type, inputs, attributes or {}, name=self.name(stem or op_type))
        node.outputs[0].name = self.name((stem or op_type) + "_out")
        return node

    def const(self, array, stem: str) -> ir.Node:
        return self.node("Constant", [], {"value": ir.tensor(np.asarray(array))}, stem)


def _new_length(b: _Builder, new: ir.Value, seq_axis: int) -> tuple[ir.Value, list[ir.Node]]:
    """The number of new tokens, as a 1-D int64 [1], from the new keys' shape."""
    shape = b.node("Shape", [new], {"start": seq_axis, "end": seq_axis + 1}, "new_length")
    shape.outputs[0].dtype = ir.DataType.INT64
    return shape.outputs[0], [shape]


def apply(model: ir.Model, plan: Plan) -> RecurrentResult:
    """Rewrite `model` in place by `plan` with every cached site reading a state instead of its cache."""
    caches = _caches(model, plan)
    values = _values(model)
    b = _Builder(model)
    result = RecurrentResult()
    plans = {sp.site.index: sp for sp in plan.selected}
    first = caches[min(caches)]
    anchor_new = values[first.key.new.value]
    new_length, length_nodes = _new_length(b, anchor_new, first.key.seq_axis)
    anchor_node = anchor_new.producer()
    added: list[ir.Node] = list(length_nodes)

    # Key padding: the ops see only the new tokens' columns of the mask (the last S).
    sliced: dict[str, str] = {}
    for index in caches:
        site = plans[index].site
        mask = site.mask.key_padding_input
        if mask is None or site.mask.key_padding_kind == "end_positions":
            if mask is not None:
                raise UnsupportedError(f"--recurrent: site {index}: key padding given as end positions is not supported")
            continue
        if mask not in sliced:
            neg = b.node("Neg", [new_length], stem="new_start")
            end = b.const(np.array([np.iinfo(np.int64).max], np.int64), "end")
            axis = b.const(np.array([1], np.int64), "axis")
            cut = b.node("Slice", [values[mask], neg.outputs[0], end.outputs[0], axis.outputs[0]], stem="new_key_padding")
            cut.outputs[0].dtype = values[mask].dtype
            added += [neg, end, axis, cut]
            sliced[mask] = cut.outputs[0].name
            result.mask_input = mask
        site.mask.key_padding_input = sliced[mask]
    if anchor_node is not None:
        model.graph.insert_after(anchor_node, added)
    else:
        model.graph.extend(added)

    # The ops read the new keys and values only.
    for index, cache in caches.items():
        plans[index].site.k = cache.key.new
        plans[index].site.v = cache.value.new

    rewrite.apply(model, plan)
    _rewire_cache_readers(model, caches, b, result)
    values = _values(model)
    graph_inputs = {v.name: v for v in model.graph.inputs}

    # State inputs and outputs.
    for layer, index in enumerate(sorted(caches)):
        cache, site_plan = caches[index], plans[index]
        op_node = _op_node(values[site_plan.site.output])
        past = graph_inputs[cache.key.past_input]
        batch = past.shape[0] if past.shape is not None else "batch"
        shape, dtype = _state_input(site_plan.replacement, site_plan.site, batch)
        state_in = ir.Value(name=f"past_state.{layer}", type=ir.TensorType(dtype), shape=ir.Shape(shape))
        model.graph.inputs.append(state_in)
        slot = [spec.name for spec in site_plan.replacement.op.inputs].index("past_state")
        if len(op_node.inputs) <= slot:
            op_node.resize_inputs(slot + 1)
        op_node.replace_input_with(slot, state_in)
        if len(op_node.outputs) < 2:  # present_state is optional for LinearAttention
            op_node.resize_outputs(2)
        state_out = op_node.outputs[1]
        state_out.name = f"present_state.{layer}"
        state_out.dtype = dtype
        state_out.shape = ir.Shape(shape)
        model.graph.outputs.append(state_out)
        result.layers.append(Layer(layer, index, op_node.op_type, state_in.name, state_out.name, list(map(str, shape)),
                                   [cache.key.past_input, cache.value.past_input],
                                   [n for n in (cache.key.present_output, cache.value.present_output) if n]))

    # The cache's inputs and outputs go; what else read them is rewired or refused.
    removed_outputs = {n for layer in result.layers for n in layer.replaces_outputs}
    kept = [v for v in model.graph.outputs if v.name not in removed_outputs]
    model.graph.outputs.clear()
    model.graph.outputs.extend(kept)
    RemoveUnusedNodesPass()(model)
    removed_inputs = {n for layer in result.layers for n in layer.replaces_inputs}
    for value in list(model.graph.inputs):
        if value.name in removed_inputs:
            if value.uses():
                users = ", ".join(sorted({u.node.op_type for u in value.uses()}))
                raise UnsupportedError(f"--recurrent: the cache input {value.name} is read by {users} beyond its "
                                       "concatenation with the new tokens; cannot replace it by a state")
            model.graph.inputs.remove(value)
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    from attnexport.ops.functions import attach_functions

    attach_functions(model)
    model.metadata_props[METADATA_RECURRENT] = result.to_json()
    return result


def _op_node(output: ir.Value) -> ir.Node:
    """The attnexport node whose Y reaches the site's output (through the layout ops rewrite adds)."""
    value = output
    for _ in range(4):
        node = value.producer()
        if node is None:
            break
        if node.domain == DOMAIN:
            return node
        value = node.inputs[0]
    raise UnsupportedError("internal error: the replacement op of a cached site was not found")


# Probe shapes (batch, new tokens, past length): every size differs between probes, so an entry of a
# shape is identified as a constant or a multiple of exactly one of B, S, P, P + S.
SHAPE_PROBES = ((2, 3, 4), (1, 5, 7), (3, 2, 9))


def _rewire_cache_readers(model: ir.Model, caches: dict[int, KVCache], b: _Builder, result: RecurrentResult) -> None:
    """Shapes that the rest of the graph reads off the cache (the past length for position ids, the
    total length or head size for reshapes around the attention), directly or through the ops that
    expand and lay out the cached keys and values, are rebuilt from sizes that need no cache: the
    batch B and the new tokens S from the token input, the past length P from the attention mask
    (or a new input). Which size each entry is comes from evaluating the shapes at three (B, S, P)."""
    past_inputs = {side.past_input for c in caches.values() for side in (c.key, c.value)}
    tainted = set(past_inputs)
    for node in model.graph:  # topological order
        if any(v is not None and v.name in tainted for v in node.inputs) and node.op_type != "Shape":
            tainted.update(o.name for o in node.outputs)
    readers = [n for n in model.graph if n.op_type == "Shape" and n.domain in ("", "ai.onnx")
               and n.inputs and n.inputs[0] is not None and n.inputs[0].name in tainted]
    if not readers:
        return
    names = [n.outputs[0].name for n in readers]
    observed, sizes = [], []
    for batch, tokens, past in SHAPE_PROBES:
        feeds = model_inputs.synthesize(model, model_inputs.ProbeShape(batch=batch, seq_len=tokens, past_len=past))
        try:
            observed.append(probe.evaluate(model, names, feeds))
        except probe.ProbeError as e:
            raise UnsupportedError(f"--recurrent: the graph reads the cache's shape, and evaluating it failed: {e}") from None
        sizes.append({"B": batch, "S": tokens, "P": past, "T": past + tokens})
    values = _values(model)
    known: dict[str, ir.Value] = {}
    new_nodes: list[ir.Node] = []

    def size(which: str) -> ir.Value:
        if not known:
            tokens = _token_input(model, past_inputs, result.mask_input)
            if tokens is None:
                raise UnsupportedError("--recurrent: the graph reads the cache's shape, and no token input "
                                       "(input_ids [B, S] or embeddings [B, S, W]) gives the batch and the new tokens")
            batch = b.node("Shape", [values[tokens]], {"start": 0, "end": 1}, "batch")
            count = b.node("Shape", [values[tokens]], {"start": 1, "end": 2}, "new_tokens")
            new_nodes.extend([batch, count])
            mask = result.mask_input or _mask_input(model)
            if mask is not None:
                total = b.node("Shape", [values[mask]], {"start": 1, "end": 2}, "total_length")
                past = b.node("Sub", [total.outputs[0], count.outputs[0]], stem="past_length")
                new_nodes.extend([total, past])
                result.mask_input = mask
            else:
                scalar = ir.Value(name=PAST_LENGTH_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
                model.graph.inputs.append(scalar)
                result.past_length_input = PAST_LENGTH_INPUT
                axes = b.const(np.array([0], np.int64), "axes")
                past = b.node("Unsqueeze", [scalar, axes.outputs[0]], stem="past_length")
                total = b.node("Add", [past.outputs[0], count.outputs[0]], stem="total_length")
                new_nodes.extend([axes, past, total])
            known.update(B=batch.outputs[0], S=count.outputs[0], P=past.outputs[0], T=total.outputs[0])
        return known[which]

    for node, name in zip(readers, names):
        arrays = [np.asarray(run[name]).reshape(-1) for run in observed]
        if len({a.size for a in arrays}) != 1:
            raise UnsupportedError(f"--recurrent: the rank of a shape read off the cache ({name}) changes with its length")
        parts = []
        for entry in range(arrays[0].size):
            fit = _fit([int(a[entry]) for a in arrays], sizes)
            if fit is None:
                raise UnsupportedError(f"--recurrent: entry {entry} of the shape {name} read off the cache is not a "
                                       "constant or a multiple of the batch, new, past or total length")
            which, factor = fit
            if which == "const":
                parts.append(b.const(np.array([factor], np.int64), "dim"))
                continue
            if factor == 1:
                parts.append(None)
                parts[-1] = size(which)
            else:
                mul = b.node("Mul", [size(which), b.const(np.array([factor], np.int64), "factor").outputs[0]], stem="dim")
                new_nodes.append(mul.inputs[1].producer())
                parts.append(mul)
        outs = [p if isinstance(p, ir.Value) else p.outputs[0] for p in parts]
        new_nodes.extend(p for p in parts if isinstance(p, ir.Node))
        concat = b.node("Concat", outs, {"axis": 0}, stem="cache_shape")
        concat.outputs[0].dtype = ir.DataType.INT64
        new_nodes.append(concat)
        ir.convenience.replace_all_uses_with(node.outputs[0], concat.outputs[0], replace_graph_outputs=True)
    model.graph.extend(new_nodes)
    TopologicalSortPass()(model)


def _fit(entries: list[int], sizes: list[dict[str, int]]) -> tuple[str, int] | None:
    """("const", c), or (X, k) with entry = k * X for X in B, S, P, T at every probe."""
    if len(set(entries)) == 1:
        return "const", entries[0]
    for which in ("B", "S", "P", "T"):
        factor, rest = divmod(entries[0], sizes[0][which])
        if rest == 0 and factor > 0 and all(e == factor * s[which] for e, s in zip(entries, sizes)):
            return which, factor
    return None


def _token_input(model: ir.Model, cache_inputs: set[str], mask: str | None) -> str | None:
    """The input with the new tokens: integer ids [B, S], else embeddings [B, S, W]."""
    specs = [s for s in model_inputs.signature(model) if s.name not in cache_inputs and s.name != mask
             and not model_inputs.is_mask_input(s)]
    for spec in specs:
        if spec.rank == 2 and np.issubdtype(spec.dtype, np.integer) and "position" not in spec.name.lower():
            return spec.name
    for spec in specs:
        if spec.rank == 3 and np.issubdtype(spec.dtype, np.floating):
            return spec.name
    return None


def _mask_input(model: ir.Model) -> str | None:
    for spec in model_inputs.signature(model):
        if model_inputs.is_mask_input(spec):
            return spec.name
    return None


__all__ = ["METADATA_RECURRENT", "PAST_LENGTH_INPUT", "RecurrentResult", "apply"]
