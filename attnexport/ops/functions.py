"""Attaching the ops' ONNX functions to a model, so it runs without the op library.

    attach_functions(model)        # onnx.ModelProto or onnx_ir.Model; modified in place and returned

For every op of the `attnexport` domain that the model uses (main graph, subgraphs, and bodies of
other model-local functions), attach_functions adds (or replaces) one model-local function built for
the model's default-domain opset and covering the node configurations present (`REGISTRY` maps an
op name to the module that builds it). It also:

- completes every attnexport node: all attributes explicit and of the schema's type (ONNX Runtime
  applies a function's attribute defaults to a node that omits one, onnx.reference does not; an int
  `scale=1` would not fit the body's `Constant(value_float=@scale)`), and all optional inputs
  listed, absent ones as "" (onnx.reference rejects a call with fewer inputs than the function has);
- gives a node an absent optional input that the shared function body reads anyway (the op module's
  `placeholders`): a branch that reads an absent input makes the model invalid in ONNX Runtime even
  when the branch is not taken. The placeholder is made by small nodes inserted just before the node,
  so it works in subgraphs and function bodies alike; the kernels ignore it (see linear_attention);
- imports `attnexport` version 1 and, when a function branches on a string attribute, ai.onnx.ml
  (the model's own version, >= 2); raises the IR version to 9 (function attribute defaults).

Nothing else is touched: initializers (loaded, or external and not loaded) are never read.
Raises `UnsupportedError` with a one-line reason when no valid function exists (opset < 13,
nodes of several float types at opset < 15, an unknown attnexport op, an invalid attribute, ai.onnx.ml opset 1).

Models with a node named LinearAttention cannot be run by a plain `onnx.reference.ReferenceEvaluator`
(onnx >= 1.20): it checks every node against ONNX's own schema of that op_type *whatever the node's
domain*, and ONNX has a standard LinearAttention since opset 27. `reference_evaluator(model)` works
around that.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from attnexport.errors import UnsupportedError
from attnexport.ops import linear_attention, sparse_attention
from attnexport.ops import lse_attention
from attnexport.ops import nystrom_attention
from attnexport.ops.function_builder import MIN_ML_OPSET, MIN_OPSET, ML_DOMAIN, Placeholder
from attnexport.ops.schema import DOMAIN, DOMAIN_VERSION, OpSchema

# op name -> module with SCHEMA, build_function(opset, variants, *, ml_opset) and, optionally,
# placeholders(variants) -> {input name: Placeholder}. Adding an op is one line here.
REGISTRY: dict[str, ModuleType] = {
    linear_attention.SCHEMA.name: linear_attention,
    sparse_attention.SCHEMA.name: sparse_attention,
    lse_attention.SCHEMA.name: lse_attention,
    nystrom_attention.SCHEMA.name: nystrom_attention,
}

FUNCTION_IR_VERSION = 9  # FunctionProto.attribute_proto (defaults)


# -- the part shared by both representations ---------------------------------------------------


@dataclass
class _Site:
    """One attnexport node, whatever the representation."""

    schema: OpSchema
    where: str  # for messages
    attributes: dict[str, Any]  # as written on the node (no defaults)
    present: set[str]  # optional inputs the node passes
    dtype: int | None  # element type of its first input, when known
    handle: Any  # representation-specific
    placeholders: dict[str, Placeholder] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)  # optional outputs the node produces

    def variant(self) -> dict[str, Any]:
        values = dict(self.attributes)
        values.update({spec.name: spec.name in self.present for spec in self.schema.inputs if spec.optional})
        values.update({spec.name: spec.name in self.outputs for spec in self.schema.outputs if spec.optional})
        values["dtype"] = self.dtype
        return values


def _module(op_type: str, where: str) -> ModuleType:
    if op_type not in REGISTRY:
        raise UnsupportedError(f"{where}: {DOMAIN}.{op_type} has no ONNX function (known: {', '.join(REGISTRY)})")
    return REGISTRY[op_type]


def _checked_attributes(schema: OpSchema, values: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return {name: schema.attribute(name).check(value) for name, value in values.items()}
    except (KeyError, ValueError) as e:
        raise UnsupportedError(f"{where}: {e.args[0] if e.args else e}") from None


def _plan(sites: list[_Site], opset: int, ml_opset: int | None) -> list[onnx.FunctionProto]:
    """Decide placeholders (stored on the sites) and build one function per op used. Nothing in the
    model is changed here, so a failure leaves the model as it was."""
    if opset < MIN_OPSET:
        raise UnsupportedError(f"default-domain opset {opset} is too old: attnexport needs opset >= {MIN_OPSET}")
    functions = []
    by_op: dict[str, list[_Site]] = {}
    for site in sites:
        by_op.setdefault(site.schema.name, []).append(site)
    for op_type, group in by_op.items():
        module = REGISTRY[op_type]
        placeholders = getattr(module, "placeholders", lambda variants: {})
        for site in group:  # an invalid node, named
            try:
                placeholders([site.variant()])
            except UnsupportedError as e:
                raise UnsupportedError(f"{site.where}: {e}") from None
        needed = placeholders([s.variant() for s in group])
        for site in group:
            site.placeholders = {name: ph for name, ph in needed.items() if name not in site.present}
            site.present |= set(site.placeholders)
        functions.append(module.build_function(opset, [s.variant() for s in group],
                                                ml_opset=MIN_ML_OPSET if ml_opset is None else ml_opset))
    return functions


def _uses_ml(function: onnx.FunctionProto) -> bool:
    return any(o.domain == ML_DOMAIN for o in function.opset_import)


def attach_functions(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto | ir.Model:
    """Attach the model-local functions of the attnexport ops `model` uses; see the module doc.

    Works on an onnx.ModelProto or an onnx_ir.Model, modifies it in place and returns it.
    """
    if isinstance(model, onnx.ModelProto):
        return _attach_proto(model)
    if isinstance(model, ir.Model):
        return _attach_ir(model)
    raise TypeError(f"attach_functions takes an onnx.ModelProto or onnx_ir.Model, not {type(model).__name__}")


# -- onnx.ModelProto ---------------------------------------------------------------------------


def _default_opset(imports) -> int:
    for o in imports:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise UnsupportedError("the model imports no default-domain opset")


def _is_ours(function) -> bool:
    return function.domain == DOMAIN and function.name in REGISTRY


def _proto_graphs(model: onnx.ModelProto) -> Iterator[tuple[Any, Any]]:
    """(owner, node container) of the main graph, every subgraph and every other function body,
    parents before their subgraphs."""

    def walk(owner) -> Iterator[tuple[Any, Any]]:
        yield owner, owner.node
        for node in owner.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)
    for function in model.functions:
        if not _is_ours(function):
            yield from walk(function)


def _proto_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for owner, _ in _proto_graphs(model):
        if isinstance(owner, onnx.GraphProto):
            for info in itertools.chain(owner.input, owner.output, owner.value_info):
                if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                    types[info.name] = info.type.tensor_type.elem_type
            for init in owner.initializer:
                types[init.name] = init.data_type
        else:
            for info in owner.value_info:
                if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                    types[info.name] = info.type.tensor_type.elem_type
    return types


def _proto_sites(model: onnx.ModelProto) -> list[_Site]:
    sites = []
    dtypes = None
    for index, (owner, container) in enumerate(_proto_graphs(model)):
        for position, node in enumerate(container):
            if node.domain != DOMAIN:
                continue
            label = node.name or (node.output[0] if node.output else "?")
            where = f"node {label!r} ({node.op_type})"
            schema = _module(node.op_type, where).SCHEMA
            values = {}
            for attr in node.attribute:
                if attr.ref_attr_name:
                    raise UnsupportedError(f"{where}: attribute {attr.name} refers to @{attr.ref_attr_name}; "
                                           "attnexport nodes need literal attributes")
                value = helper.get_attribute_value(attr)
                values[attr.name] = value.decode() if isinstance(value, bytes) else value
            if len(node.input) > len(schema.inputs):
                raise UnsupportedError(f"{where}: {len(node.input)} inputs, {schema.name} takes {len(schema.inputs)}")
            present = {spec.name for spec, name in zip(schema.inputs, node.input) if spec.optional and name}
            if dtypes is None:
                dtypes = _proto_dtypes(model)
            sites.append(_Site(schema, where, _checked_attributes(schema, values, where), present,
                               dtypes.get(node.input[0]) if node.input else None, (index, position, node),
                               outputs={spec.name for spec, name in zip(schema.outputs, node.output)
                                        if spec.optional and name}))
    return sites


class _Names:
    """Fresh value names that collide with nothing in the model."""

    def __init__(self, used: set[str]):
        self.used = used
        self.counter = itertools.count()

    def __call__(self, stem: str) -> str:
        while True:
            name = f"attnexport/{stem}_{next(self.counter)}"
            if name not in self.used:
                self.used.add(name)
                return name


def _proto_names(model: onnx.ModelProto) -> _Names:
    used: set[str] = set()
    for owner, container in _proto_graphs(model):
        for node in container:
            used.update(node.input)
            used.update(node.output)
        if isinstance(owner, onnx.GraphProto):
            used.update(i.name for i in owner.input)
            used.update(i.name for i in owner.initializer)
        else:
            used.update(owner.input)
    return _Names(used)


def _proto_placeholder(ph: Placeholder, source: str, opset: int, fresh: _Names) -> tuple[list[onnx.NodeProto], str]:
    if ph.kind == "true_mask":
        shape, dims, picked, out = fresh("shape"), fresh("dims"), fresh("dims"), fresh("all_keys")
        return [
            helper.make_node("Shape", [source], [shape]),
            helper.make_node("Constant", [], [dims], value=numpy_helper.from_array(np.array(ph.dims, np.int64))),
            helper.make_node("Gather", [shape, dims], [picked], axis=0),
            helper.make_node("ConstantOfShape", [picked], [out], value=helper.make_tensor("value", TensorProto.BOOL, [1], [True])),
        ], out
    if ph.kind == "zeros":
        zero = fresh("placeholder")
        nodes = [helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.zeros((1, 1), np.float32)))]
        if opset < 15:  # only float32 is supported there
            return nodes, zero
        out = fresh("placeholder")
        return [*nodes, helper.make_node("CastLike", [zero, source], [out])], out
    raise ValueError(f"unknown placeholder kind {ph.kind!r}")


def _attach_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = _default_opset(model.opset_import)
    ml = next((o.version for o in model.opset_import if o.domain == ML_DOMAIN), None)
    sites = _proto_sites(model)
    functions = _plan(sites, opset, ml)

    # Complete the nodes; insert placeholders before the nodes that need them.
    arity = {f.name: len(f.output) for f in functions}
    short = any(len(s.handle[2].output) < arity[s.schema.name] for s in sites)
    fresh = _proto_names(model) if short or any(s.placeholders for s in sites) else None
    inserts: dict[int, dict[int, list[onnx.NodeProto]]] = {}
    for site in sites:
        index, position, node = site.handle
        values = site.schema.complete_attributes(**site.attributes)
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(name, value) for name, value in values.items())
        while len(node.input) < len(site.schema.inputs):
            node.input.append("")
        # Every output the function declares (ONNX Runtime's type inference of a call with fewer
        # outputs than its function fails): an unused name for an optional output the node left out.
        while len(node.output) < arity[site.schema.name]:
            node.output.append(fresh("unused"))
        for name, ph in site.placeholders.items():
            new_nodes, value = _proto_placeholder(ph, node.input[site.schema.input_index(ph.source)], opset, fresh)
            node.input[site.schema.input_index(name)] = value
            inserts.setdefault(index, {}).setdefault(position, []).extend(new_nodes)
    if inserts:
        containers = [container for _, container in _proto_graphs(model)]
        for index in sorted(inserts, reverse=True):  # subgraphs before the graphs that hold them
            container = containers[index]
            nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in container]
            del container[:]
            for position, node in enumerate(nodes):
                container.extend(inserts[index].get(position, []))
                container.append(node)

    # Functions, imports, IR version.
    names = {f.name for f in functions}
    for i in reversed(range(len(model.functions))):
        if _is_ours(model.functions[i]):
            del model.functions[i]
    model.functions.extend(functions)
    _set_import(model.opset_import, DOMAIN, DOMAIN_VERSION, replace=False)
    if any(_uses_ml(f) for f in functions):
        _set_import(model.opset_import, ML_DOMAIN, MIN_ML_OPSET, replace=False)
    if names:
        model.ir_version = max(model.ir_version, FUNCTION_IR_VERSION)
    return model


def _set_import(imports, domain: str, version: int, *, replace: bool) -> None:
    for o in imports:
        if o.domain == domain:
            if replace:
                o.version = version
            return
    imports.append(helper.make_opsetid(domain, version))


# -- onnx_ir.Model -----------------------------------------------------------------------------


def _ir_containers(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    for function in model.functions.values():
        if not _is_ours(function):
            yield function.graph


def _ir_sites(model: ir.Model) -> list[_Site]:
    sites = []
    for graph in _ir_containers(model):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.domain != DOMAIN:
                continue
            label = node.name or (node.outputs[0].name if node.outputs else "?")
            where = f"node {label!r} ({node.op_type})"
            schema = _module(node.op_type, where).SCHEMA
            values = {}
            for name, attr in node.attributes.items():
                if attr.is_ref():
                    raise UnsupportedError(f"{where}: attribute {name} refers to @{attr.ref_attr_name}; "
                                           "attnexport nodes need literal attributes")
                values[name] = attr.value
            if len(node.inputs) > len(schema.inputs):
                raise UnsupportedError(f"{where}: {len(node.inputs)} inputs, {schema.name} takes {len(schema.inputs)}")
            present = {spec.name for spec, value in zip(schema.inputs, node.inputs) if spec.optional and value is not None}
            first = node.inputs[0] if node.inputs else None
            dtype = int(first.dtype) if first is not None and first.dtype is not None else None
            sites.append(_Site(schema, where, _checked_attributes(schema, values, where), present, dtype, node,
                               outputs={spec.name for spec, value in zip(schema.outputs, node.outputs)
                                        if spec.optional and value is not None and value.name}))
    return sites


def _ir_placeholder(ph: Placeholder, source: ir.Value, opset: int) -> tuple[list[ir.Node], ir.Value]:
    if ph.kind == "true_mask":
        shape = ir.node("Shape", [source])
        dims = ir.node("Constant", [], {"value": ir.tensor(np.array(ph.dims, np.int64))})
        picked = ir.node("Gather", [shape.outputs[0], dims.outputs[0]], {"axis": 0})
        ones = ir.node("ConstantOfShape", [picked.outputs[0]], {"value": ir.tensor(np.array([True]))})
        return [shape, dims, picked, ones], ones.outputs[0]
    if ph.kind == "zeros":
        zero = ir.node("Constant", [], {"value": ir.tensor(np.zeros((1, 1), np.float32))})
        if opset < 15:
            return [zero], zero.outputs[0]
        like = ir.node("CastLike", [zero.outputs[0], source])
        return [zero, like], like.outputs[0]
    raise ValueError(f"unknown placeholder kind {ph.kind!r}")


def _attach_ir(model: ir.Model) -> ir.Model:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise UnsupportedError("the model imports no default-domain opset")
    sites = _ir_sites(model)
    functions = _plan(sites, opset, model.opset_imports.get(ML_DOMAIN))

    shared: dict[tuple, ir.Value] = {}
    fresh_ir = None
    if any(len(s.handle.outputs) < len(f.output) for s in sites for f in functions if f.name == s.schema.name):
        used = {v.name for g in _ir_containers(model) for n in ir.traversal.RecursiveGraphIterator(g)
                for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        used |= {v.name for v in model.graph.inputs}
        fresh_ir = _Names(used)
    for site in sites:
        node: ir.Node = site.handle
        for name, value in site.schema.complete_attributes(**site.attributes).items():
            node.attributes[name] = ir.convenience.convert_attribute(name, value)
        if len(node.inputs) < len(site.schema.inputs):
            node.resize_inputs(len(site.schema.inputs))
        declared = next(len(f.output) for f in functions if f.name == site.schema.name)
        if len(node.outputs) < declared:  # see _attach_proto: every output the function declares
            node.resize_outputs(declared)
            for out in node.outputs:
                if not out.name:
                    out.name = fresh_ir("unused")
        for name, ph in site.placeholders.items():
            source = node.inputs[site.schema.input_index(ph.source)]
            key = (id(node.graph), ph, id(source))
            if key not in shared:
                new_nodes, shared[key] = _ir_placeholder(ph, source, opset)
                node.graph.insert_before(node, new_nodes)
            node.replace_input_with(site.schema.input_index(name), shared[key])

    for key in [k for k, f in model.functions.items() if _is_ours(f)]:
        del model.functions[key]
    for proto in functions:
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    if any(_uses_ml(f) for f in functions):
        model.opset_imports.setdefault(ML_DOMAIN, MIN_ML_OPSET)
    if functions:
        model.ir_version = max(model.ir_version, FUNCTION_IR_VERSION)
    return model


# -- running the functions with onnx.reference -------------------------------------------------


def reference_evaluator(model: onnx.ModelProto, **kwargs: Any):
    """An onnx.reference.ReferenceEvaluator for a model with attnexport functions.

    Works around two limits of onnx.reference (1.23): it checks a node against ONNX's own schema of
    the same op_type whatever the node's domain (so attnexport.LinearAttention is refused for lacking
    the attributes of ONNX's LinearAttention-27), and it ignores function attribute defaults. Each
    attnexport function is run as a custom op that fills in defaults and omitted trailing inputs.
    `kwargs` go to ReferenceEvaluator.
    """
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415
    from onnx.reference.op_run import OpFunction, OpRun  # noqa: PLC0415

    def op_class(function: onnx.FunctionProto) -> type:
        impl = ReferenceEvaluator(function)
        defaults = list(function.attribute_proto)
        arity = len(function.input)

        def __init__(self, onnx_node, run_params):  # noqa: N807
            OpFunction.__init__(self, onnx_node, run_params, impl=impl)

        def _load_attributes(self):
            OpRun._load_attributes(self)
            for attr in defaults:
                if not hasattr(self, attr.name):
                    setattr(self, attr.name, self._extract_attribute_value(attr))
                    self.attributes_names_.add(attr.name)

        def _run(self, *inputs, **kw):
            return OpFunction._run(self, *inputs, *([None] * (arity - len(inputs))), **kw)

        return type(function.name, (OpFunction,), {
            "op_domain": function.domain, "op_schema": None, "__init__": __init__,
            "_load_attributes": _load_attributes, "_run": _run,
        })

    ops = [op_class(f) for f in model.functions if f.domain == DOMAIN]
    return ReferenceEvaluator(model, new_ops=ops + list(kwargs.pop("new_ops", [])), **kwargs)


__all__ = ["REGISTRY", "attach_functions", "reference_evaluator"]
