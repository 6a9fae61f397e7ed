"""Resolving an attention operand to a [B, H, S, D] tensor.

The structural side proposes: from the operand of the attention MatMul, walk upstream through ops that
only move data (Transpose, Reshape, Expand/Unsqueeze/Tile for grouped KV heads, Cast, Identity) and
through multiplications by a scalar (the attention scale), collecting candidate values. The numeric side
decides: on probe inputs, a candidate X (with a permutation π making it [B, H, S, D]) is the operand's
source iff operand == α · expand_heads(πX) (transposed for Kᵀ), exactly up to round-off. Checking with
numbers, not with reshape arithmetic, makes one rule hold for every exporter's layout choices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnexport.match.constants import is_scalar_like, scalar

PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Expand", "Unsqueeze", "Squeeze", "Tile", "Flatten"}
MAX_STEPS = 16

# Permutations to try, most common first: BHSD, BSHD, BHDS.
_PREFERRED = [(0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 3, 2)]
PERMUTATIONS = _PREFERRED + [p for p in itertools.permutations(range(4)) if p not in _PREFERRED]


@dataclass
class Link:
    """One candidate on the way upstream."""

    value: ir.Value
    scale: float | None  # product of the constant scalars passed so far (None: a non-constant scalar)
    nodes: list[ir.Node]  # the ops between this value and the operand


def upstream_chain(operand: ir.Value) -> list[Link]:
    """The operand and the values it is computed from by layout ops and scalar Mul/Div, nearest first."""
    chain = [Link(operand, 1.0, [])]
    value, scale, nodes = operand, 1.0, []
    for _ in range(MAX_STEPS):
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        if node.op_type in PASS_THROUGH and node.inputs and node.inputs[0] is not None:
            value = node.inputs[0]
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            a, b = node.inputs
            if is_scalar_like(b):
                value, factor = a, scalar(b)
            elif is_scalar_like(a):
                value, factor = b, scalar(a)
            else:
                break
            scale = None if scale is None or factor is None else scale * factor
        elif node.op_type == "Div" and len(node.inputs) == 2 and is_scalar_like(node.inputs[1]):
            value, factor = node.inputs[0], scalar(node.inputs[1])
            scale = None if scale is None or not factor else scale / factor
        else:
            break
        nodes = nodes + [node]
        chain.append(Link(value, scale, nodes))
    return chain


@dataclass
class Resolved:
    link: Link
    perm: tuple[int, ...]
    alpha: float  # operand = alpha * layout(candidate)
    bhsd: np.ndarray  # the probe value in [B, H, S, D]


def resolve(
    chain: list[Link],
    probes: dict[str, np.ndarray],
    operand: np.ndarray,
    *,
    expected: dict[str, int | None],
    transposed: bool,
    grouped: bool,
    num_q_heads: int | None,
    rtol: float,
) -> Resolved | None:
    """The most upstream candidate of `chain` that the operand is a pure relayout (times α) of.

    expected: required sizes of the [B, H, S, D] view ("B", "S", "D"; None = any).
    transposed: the operand is Kᵀ ([.., D, S]).
    grouped: the candidate may have fewer heads than the operand (GQA: head h reads h // group).
    """
    target = np.asarray(operand, dtype=np.float64)
    scale_of_target = float(np.max(np.abs(target))) if target.size else 0.0
    # A candidate already in [B, H, S, D] is preferred (no Transpose to add); then any permutation.
    for perms in ([PERMUTATIONS[0]], PERMUTATIONS[1:]):
        found = _resolve_with(chain, probes, target, scale_of_target, perms, expected=expected,
                              transposed=transposed, grouped=grouped, num_q_heads=num_q_heads, rtol=rtol)
        if found is not None:
            return found
    return None


def _resolve_with(chain, probes, target, scale_of_target, perms, *, expected, transposed, grouped, num_q_heads,
                  rtol) -> Resolved | None:
    for link in reversed(chain):
        array = probes.get(link.value.name)
        if array is None or array.ndim != 4:
            continue
        for perm in perms:
            view = np.transpose(array, perm)
            b, h, s, d = view.shape
            if expected.get("B") not in (None, b) or expected.get("S") not in (None, s) or expected.get("D") not in (None, d):
                continue
            if num_q_heads is not None:
                if grouped and (h == 0 or num_q_heads % h):
                    continue
                if not grouped and h != num_q_heads:
                    continue
            group = (num_q_heads // h) if (grouped and num_q_heads) else 1
            full = np.repeat(view, group, axis=1) if group > 1 else view
            if transposed:
                full = np.swapaxes(full, -1, -2)
            if full.size != target.size:
                continue
            full = np.asarray(full, dtype=np.float64)
            try:
                reshaped = target.reshape(full.shape)
            except ValueError:
                continue
            alpha = _proportionality(reshaped, full, rtol, scale_of_target)
            if alpha is not None:
                return Resolved(link, perm, alpha, view)
    return None


def _proportionality(target: np.ndarray, candidate: np.ndarray, rtol: float, magnitude: float) -> float | None:
    denominator = float(np.vdot(candidate, candidate))
    if denominator == 0.0:
        return 1.0 if magnitude == 0.0 else None
    alpha = float(np.vdot(target, candidate)) / denominator
    if alpha == 0.0:
        return None
    error = float(np.max(np.abs(target - alpha * candidate))) if target.size else 0.0
    return alpha if error <= rtol * max(magnitude, 1e-30) else None
