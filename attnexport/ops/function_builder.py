"""A small opset-aware emitter of ONNX function bodies.

The op modules (`linear_attention.py`, ...) describe their reference semantics as a sequence of
ONNX nodes through this builder; it is the one place that knows how an operator's signature moved
between opsets, so that one description produces a valid body for every default-domain opset from
13 (the minimum attnexport supports) to the newest:

    ReduceSum            axes an input from 13 (always, here)
    ReduceMax/Min/Mean   axes an attribute before 18, an input from 18
    Unsqueeze/Squeeze    axes an input from 13 (always, here)
    CastLike             from 15; below, a body cannot follow the input's dtype at run time
    Trilu                from 14: not used, masks are built from Range and comparisons
    string Equal         from 19 and unsupported by onnx.reference: strings are turned into ints
                         with ai.onnx.ml.LabelEncoder (ml opset >= 2) instead, see `string_switch`

A model-local function must import exactly the model's default-domain opset (the checker rejects
anything else), hence one builder per target opset.

Names are unique across the whole function, subgraphs included; a subgraph (an `If` branch, a
`Loop` body) is built by a Python callback that emits nodes into its own scope and may read any
name of an enclosing scope.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from attnexport.errors import UnsupportedError

MIN_OPSET = 13
ML_DOMAIN = "ai.onnx.ml"
MIN_ML_OPSET = 2  # LabelEncoder with keys_strings / values_int64s

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL

_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}  # every other Reduce*: 18


@dataclass(frozen=True)
class Placeholder:
    """What `attach_functions` passes for an absent optional input that a shared function body reads.

    kind "true_mask": a bool tensor of `true`, shaped like dims `dims` of input `source`'s shape;
    kind "zeros": a [1, 1] tensor of zeros of input `source`'s element type (a value the op ignores).
    """

    kind: str
    source: str
    dims: tuple[int, ...] = ()


@dataclass(frozen=True)
class Ref:
    """An attribute of the enclosing function, used as an attribute of a body node (`@name`)."""

    name: str
    kind: int  # AttributeProto.FLOAT, INT, STRING, ...


class FunctionBuilder:
    """Emits the nodes of one FunctionProto for a given default-domain opset.

    `op(...)` appends a node to the current scope and returns its output name(s); helpers wrap the
    operators whose signature depends on the opset. `build(...)` returns the FunctionProto.
    """

    def __init__(self, opset: int, *, ml_opset: int = MIN_ML_OPSET):
        if opset < MIN_OPSET:
            raise UnsupportedError(f"default-domain opset {opset} is too old: attnexport needs opset >= {MIN_OPSET}")
        self.opset = opset
        self.ml_opset = ml_opset
        self.uses_ml = False
        self._scopes: list[list[onnx.NodeProto]] = [[]]
        self._ids = itertools.count()

    # -- names and nodes -------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str | None, outputs: int | Sequence[str] = 1, domain: str = "",
           name: str | None = None, **attributes: Any) -> Any:
        """Append `op_type(inputs, **attributes)`; return its output name (a list when several).

        An input None is an omitted optional input. An attribute value `Ref(...)` refers to an
        attribute of the function being built.
        """
        hint = (name or op_type).lower()
        outs = [self.fresh(hint) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node = helper.make_node(op_type, ["" if x is None else x for x in inputs], outs, domain=domain or None)
        for key, value in attributes.items():
            if isinstance(value, Ref):
                node.attribute.append(helper.make_attribute_ref(key, value.kind, ref_attr_name=value.name))
            else:
                node.attribute.append(helper.make_attribute(key, value))
        if domain == ML_DOMAIN:
            self.uses_ml = True
        self._scopes[-1].append(node)
        return outs[0] if len(outs) == 1 else outs

    # -- constants -------------------------------------------------------------------------------

    def const(self, value: Any, dtype: int = FLOAT, name: str = "const") -> str:
        """A Constant holding `value` (a number, a list or an array) as a tensor of `dtype`."""
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        return self.op("Constant", value=numpy_helper.from_array(array), name=name)

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, indices)."""
        return self.const(list(values), INT64, name="ints")

    def attr_float(self, attribute: str) -> str:
        """The float attribute `attribute` of the function, as a float32 scalar."""
        return self.op("Constant", value_float=Ref(attribute, AttributeProto.FLOAT), name=attribute)

    def attr_int(self, attribute: str) -> str:
        """The int attribute `attribute` of the function, as an int64 scalar."""
        return self.op("Constant", value_int=Ref(attribute, AttributeProto.INT), name=attribute)

    def attr_string(self, attribute: str) -> str:
        """The string attribute `attribute` of the function, as a string scalar."""
        return self.op("Constant", value_string=Ref(attribute, AttributeProto.STRING), name=attribute)

    # -- operators whose signature depends on the opset ------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        since = _REDUCE_AXES_INPUT_SINCE.get(op_type, 18)
        if self.opset >= since:
            return self.op(op_type, x, self.ints(*axes), keepdims=int(keepdims))
        return self.op(op_type, x, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))  # axes an input since 13

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.ints(*axes))  # axes an input since 13

    def output_dtype(self, op_name: str, dtypes) -> int | None:
        """Below opset 15 (no CastLike) a function's result is cast to the one element type every node
        shares, read from the nodes when the function is built; None means float32 (or opset >= 15).
        Raises UnsupportedError for nodes of several types there."""
        if self.opset >= 15:
            return None
        types = {t for t in dtypes if t is not None}
        if len(types) > 1:
            names = ", ".join(sorted(helper.tensor_dtype_to_string(t) for t in types))
            raise UnsupportedError(
                f"{op_name} nodes on {names} share one ONNX function, which needs opset >= 15 to follow each "
                f"node's dtype (the model has opset {self.opset}); convert the model to one float type or a newer opset"
            )
        dtype = types.pop() if types else None
        return None if dtype == FLOAT else dtype

    def cast_to_input_dtype(self, x: str, like: str, output_dtype: int | None) -> str:
        """`x` (float32) in the dtype of input `like`: CastLike from opset 15, else `output_dtype`."""
        if self.opset >= 15:
            return self.cast_like(x, like)
        return self.op("Cast", x, to=output_dtype) if output_dtype is not None else self.op("Identity", x)

    def cast_like(self, x: str, like: str) -> str:
        if self.opset < 15:
            raise UnsupportedError(f"CastLike needs opset >= 15 (the model has {self.opset})")
        return self.op("CastLike", x, like)

    def state_parts(self, present: bool, batch: str, kv_heads: str, rows: str, value_dim: str) -> tuple[str, str, str]:
        """A recurrent state [B, Hkv, rows, Dv + 2] = [S | z | m] (input `past_state`, any float type,
        broadcast to that shape; zeros when not `present`) as float32 S [.., Dv], z [.., 1], m [.., 1]."""
        full = self.op("Concat", batch, kv_heads, rows, self.op("Add", value_dim, self.ints(2)), axis=0)
        if present:
            state = self.op("Expand", self.op("Cast", "past_state", to=FLOAT), full)
        else:
            state = self.op("ConstantOfShape", full, value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
        value_end = self.op("Add", value_dim, self.ints(1))
        return (self.op("Slice", state, self.ints(0), value_dim, self.ints(3)),
                self.op("Slice", state, value_dim, value_end, self.ints(3)),
                self.op("Slice", state, value_end, self.op("Add", value_dim, self.ints(2)), self.ints(3)))

    def dims(self, shape: str, *indices: int) -> str:
        """Entries of a shape (1-D int64) as a 1-D int64 tensor."""
        return self.op("Gather", shape, self.ints(*indices), axis=0)

    def dim(self, shape: str, index: int) -> str:
        """One entry of a shape as an int64 scalar."""
        return self.op("Gather", shape, self.const(index, INT64), axis=0)

    # -- control flow ----------------------------------------------------------------------------

    def subgraph(self, name: str, body: Callable[..., Sequence[str]],
                 inputs: Sequence[tuple[str, int, Sequence[int] | None]] = (),
                 output_types: Sequence[int] = ()) -> onnx.GraphProto:
        """Build a subgraph: `body(*input_names)` emits nodes and returns the output names.

        `inputs` are (name hint, element type, shape or None). Outputs are typed with `output_types` (element types, shapes unknown); an output that is an
        input or an outer-scope name is passed through an Identity, as a graph output must be produced
        inside the graph.
        """
        self._scopes.append([])
        input_names = [self.fresh(hint) for hint, _, _ in inputs]
        try:
            outs = list(body(*input_names))
            local = {o for n in self._scopes[-1] for o in n.output}
            outs = [o if o in local else self.op("Identity", o) for o in outs]
        finally:
            nodes = self._scopes.pop()
        if len(outs) != len(output_types):
            raise ValueError(f"subgraph {name}: {len(outs)} outputs, {len(output_types)} types")
        return helper.make_graph(
            nodes,
            self.fresh(name),
            [helper.make_tensor_value_info(n, t, shape) for n, (_, t, shape) in zip(input_names, inputs)],
            [helper.make_tensor_value_info(n, t, None) for n, t in zip(outs, output_types)],
        )

    def if_(self, cond: str, then: Callable[[], Sequence[str]], otherwise: Callable[[], Sequence[str]],
            output_types: Sequence[int]) -> list[str]:
        then_graph = self.subgraph("then", then, output_types=output_types)
        else_graph = self.subgraph("else", otherwise, output_types=output_types)
        outs = self.op("If", cond, outputs=len(output_types), then_branch=then_graph, else_branch=else_graph)
        return [outs] if isinstance(outs, str) else outs

    def string_switch(self, attribute: str, cases: dict[str, Callable[[], Sequence[str]]],
                      output_types: Sequence[int]) -> list[str]:
        """Run the case named by the string attribute `attribute` (a chain of `If`s).

        Only the given cases are built; a value that names none of them runs the last case, so the
        caller must pass every value its nodes use. With a single case nothing branches (and the
        attribute is not read).

        Strings cannot be compared in the default domain before opset 19 (and onnx.reference cannot
        compare them at all), so the attribute is mapped to an int by ai.onnx.ml.LabelEncoder.
        """
        keys = list(cases)
        if not keys:
            raise ValueError("string_switch needs at least one case")
        if len(keys) == 1:
            return list(cases[keys[0]]())
        if self.ml_opset < MIN_ML_OPSET:
            raise UnsupportedError(
                f"the model imports {ML_DOMAIN} opset {self.ml_opset}; branching on {attribute} needs >= {MIN_ML_OPSET}"
            )
        code = self.op("LabelEncoder", self.attr_string(attribute), domain=ML_DOMAIN,
                       keys_strings=keys, values_int64s=list(range(len(keys))), default_int64=-1)

        def chain(i: int) -> list[str]:
            if i == len(keys) - 1:
                return list(cases[keys[i]]())
            cond = self.op("Equal", code, self.const(i, INT64))
            return self.if_(cond, cases[keys[i]], lambda: chain(i + 1), output_types)

        return chain(0)

    def loop(self, trip_count: str, initial: Sequence[str], body: Callable[..., Sequence[str]],
             types: Sequence[int]) -> list[str]:
        """`for i in range(trip_count): state = body(i, *state)`; returns the final state.

        `body(i, *state)` gets the iteration number (int64 scalar) and the carried values, returns
        the new carried values (element types `types`).
        """
        def loop_body(i: str, cond: str, *state: str) -> list[str]:
            return [self.op("Identity", cond), *body(i, *state)]

        # ONNX Runtime wants the shapes of the iteration number and the condition (scalars).
        graph = self.subgraph("loop_body", loop_body, inputs=[("iter", INT64, []), ("cond", BOOL, [])] +
                              [("state", t, None) for t in types], output_types=[BOOL, *types])
        # An explicit `true` condition: onnx.reference reads an omitted one as false (zero iterations).
        outs = self.op("Loop", trip_count, self.const(True, BOOL), *initial, outputs=len(initial), body=graph)
        return [outs] if isinstance(outs, str) else outs

    # -- the function ----------------------------------------------------------------------------

    def build(self, domain: str, name: str, inputs: Sequence[str], outputs: Sequence[str],
              attributes: Sequence[AttributeProto] = (), doc: str = "") -> onnx.FunctionProto:
        """The FunctionProto of the nodes emitted so far.

        `attributes` are the function's attributes with their defaults (FunctionProto.attribute_proto,
        IR >= 9): ONNX Runtime applies them to a node that omits the attribute, onnx.reference does
        not, so writers should still set every attribute on every node.
        """
        if len(self._scopes) != 1:
            raise RuntimeError("build() inside a subgraph")
        imports = [helper.make_opsetid("", self.opset)]
        if self.uses_ml:
            imports.append(helper.make_opsetid(ML_DOMAIN, self.ml_opset))
        function = helper.make_function(domain, name, list(inputs), list(outputs), self._scopes[0], imports,
                                        attributes=[], doc_string=doc or None)
        function.attribute_proto.extend(attributes)
        return function

