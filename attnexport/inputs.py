"""Inputs synthesised from a graph's signature, for probing and verification.

Token ids stay inside the vocabulary (read off the embedding table the ids index), masks are ones,
position ids count up, images and past key/values are random normal. Symbolic dimensions are given
values by role: batch, sequence, past sequence, or their sum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

DEFAULT_VOCAB = 100


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class ProbeShape:
    batch: int = 2
    seq_len: int = 16
    past_len: int = 0
    # Give each distinct sequence-like symbol its own length (seq_len, seq_len + 3, ...), so that e.g.
    # an encoder's and a decoder's lengths differ and Sq != Skv shows in cross-attention.
    distinct: bool = False


def signature(model: ir.Model) -> list[InputSpec]:
    specs = []
    initializer_names = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializer_names:
            continue  # old-style models list initializers as inputs; they have values
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if value.shape is None:
            shape: tuple = ()
        else:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def is_mask_input(spec: InputSpec) -> bool:
    name = spec.name.lower()
    return spec.rank == 2 and ("mask" in name) and not name.startswith("past")


def is_past_input(spec: InputSpec) -> bool:
    name = spec.name.lower()
    return "past" in name or name.startswith("cache") or ".key" in name or ".value" in name


def vocab_sizes(model: ir.Model) -> dict[str, int]:
    """For each integer graph input that indexes an embedding table (Gather on an initializer), the
    number of rows of the smallest such table."""
    sizes: dict[str, int] = {}
    input_names = {v.name for v in model.graph.inputs}
    for node in model.graph.all_nodes():
        if node.op_type != "Gather" or len(node.inputs) < 2:
            continue
        data, indices = node.inputs[0], node.inputs[1]
        if data is None or indices is None or data.const_value is None:
            continue
        source = _through_casts(indices)
        if source is None or source.name not in input_names:
            continue
        rows = data.const_value.shape[0] if data.const_value.shape is not None and len(data.const_value.shape) else 0
        if rows:
            sizes[source.name] = min(rows, sizes.get(source.name, rows))
    return sizes


def _through_casts(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Flatten"):
        value = value.producer().inputs[0]
    return value


_BATCH_NAMES = re.compile(r"batch|^b$|^n$|^bs$", re.I)
_PAST_NAMES = re.compile(r"past|cache", re.I)
_TOTAL_NAMES = re.compile(r"total|\+|all_seq|kv_seq", re.I)
# Names that are past + new by construction. "kv_seq" is not among them: without a cache it is a
# cross-attention length of its own (an encoder's output), so distinct probing varies it.
_SUM_NAMES = re.compile(r"total|\+|all_seq", re.I)


def _dim_value(spec: InputSpec, axis: int, dim, shape: ProbeShape, symbols: dict[str, int] | None = None) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    name = dim or ""
    value = _role_value(spec, axis, name, shape)
    # (A "total" length is past + new: equal to the sequence only because past is 0 here, never distinct.)
    if value == shape.seq_len and shape.distinct and name and symbols is not None and not _SUM_NAMES.search(name):
        if name not in symbols:
            symbols[name] = shape.seq_len + 3 * len(symbols)
        return symbols[name]
    return value


def _role_value(spec: InputSpec, axis: int, name: str, shape: ProbeShape) -> int:
    if _BATCH_NAMES.search(name) or (axis == 0 and not _PAST_NAMES.search(name) and not _TOTAL_NAMES.search(name)):
        return shape.batch
    if _TOTAL_NAMES.search(name):
        return shape.past_len + shape.seq_len
    if _PAST_NAMES.search(name):
        return shape.past_len
    if is_past_input(spec) and spec.rank == 4 and axis == 2:
        return shape.past_len
    if is_mask_input(spec) and axis == 1 and shape.past_len:
        return shape.past_len + shape.seq_len
    return shape.seq_len


def synthesize(model: ir.Model, shape: ProbeShape = ProbeShape(), *, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for every graph input of `model`."""
    rng = np.random.default_rng(seed)
    vocab = vocab_sizes(model)
    feeds: dict[str, np.ndarray] = {}
    symbols: dict[str, int] = {}
    for spec in signature(model):
        dims = tuple(_dim_value(spec, axis, d, shape, symbols) for axis, d in enumerate(spec.shape))
        feeds[spec.name] = _make(spec, dims, rng, vocab.get(spec.name))
    return feeds


def _make(spec: InputSpec, dims: tuple[int, ...], rng: np.random.Generator, vocab: int | None) -> np.ndarray:
    name = spec.name.lower()
    dtype = spec.dtype
    if dtype == np.bool_:
        return np.ones(dims, dtype=bool)
    if np.issubdtype(dtype, np.integer):
        if "mask" in name:
            return np.ones(dims, dtype=dtype)
        if "position" in name or "cache_position" in name:
            last = dims[-1] if dims else 1
            return np.broadcast_to(np.arange(last, dtype=dtype), dims).copy()
        if "token_type" in name or "segment" in name:
            return np.zeros(dims, dtype=dtype)
        high = vocab if vocab else DEFAULT_VOCAB
        return rng.integers(0, high, size=dims).astype(dtype)
    if "mask" in name:
        return np.ones(dims, dtype=dtype)
    return rng.standard_normal(dims).astype(dtype)


def seq_len_of(feeds: dict[str, np.ndarray], model: ir.Model) -> int | None:
    """The sequence length the feeds use (length of the first id or mask input), if any."""
    for spec in signature(model):
        if spec.rank == 2 and spec.name in feeds and np.issubdtype(feeds[spec.name].dtype, np.integer):
            return int(feeds[spec.name].shape[1])
    return None


def has_dynamic_sequence(model: ir.Model) -> bool:
    for spec in signature(model):
        if spec.rank >= 2 and not is_past_input(spec) and not isinstance(spec.shape[1], int):
            return True
    return False


def has_dynamic_batch(model: ir.Model) -> bool:
    for spec in signature(model):
        if spec.rank >= 1 and not isinstance(spec.shape[0], int):
            return True
    return False
