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
