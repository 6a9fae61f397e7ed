"""Reading constant values (initializers and Constant nodes) without modifying the model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else np.asarray(tensor.numpy())
    except Exception:  # external data missing, unsupported tensor types
        return None


def scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def static_size(value: ir.Value | None) -> int | None:
    """Number of elements when the shape is fully static."""
    if value is None or value.shape is None:
        return None
    size = 1
    for dim in value.shape:
        if not isinstance(dim, int):
            return None
        size *= dim
    return size


def is_scalar_like(value: ir.Value | None) -> bool:
    """A value with one element (by constant, or by static shape)."""
    array = constant_array(value)
    if array is not None:
        return array.size == 1
    return static_size(value) == 1


_SHAPE_ONLY = {"Shape", "Size"}


def data_dependent(value: ir.Value | None, graph_inputs: set[str], limit: int = 64) -> bool:
    """Does `value` depend on the *data* of a graph input (not only on shapes)?

    A scale computed from Shape(x) is the same for every input of a given shape (and probes at two
    lengths confirm it); a scale read from an input tensor is not a constant at all."""
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in graph_inputs and v.const_value is None:
            return True
        node = v.producer()
        if node is None or node.op_type in _SHAPE_ONLY:
            continue
        stack.extend(node.inputs)
    return len(seen) >= limit  # too deep to tell: treat as data-dependent


def is_read(value: ir.Value | None) -> bool:
    """Is the value consumed — by a node, or as a graph output?"""
    if value is None:
        return False
    return bool(value.uses()) or value.is_graph_output()
