"""Replacement methods: which attention each can represent, and the op node it becomes.

A method turns an AttentionSite into an op of the attnexport domain: it says whether the site's mask
can be represented faithfully (and why not), the op's attributes, and any extra inputs (initializers)
the op needs. Methods are registered by name; the CLI's --method chooses one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnexport.ops.schema import LINEAR_ATTENTION, OpSchema
from attnexport.sites import (
    MASK_BIAS,
    MASK_CAUSAL,
    MASK_CAUSAL_KEY_PADDING,
    MASK_KEY_PADDING,
    MASK_NONE,
    MASK_WINDOW,
    AttentionSite,
)


@dataclass
class MethodOptions:
    """Options of a conversion, as the user gave them (CLI or API)."""

    feature_map: str = "elu1"
    expansion_point: str = "zero"
    eps: float = 1e-6
    num_features: int | None = None  # favor: F (default 2 * Dk)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replacement:
    """What a method emits for one site."""

    op: OpSchema
    attributes: dict[str, Any]
    extra_inputs: dict[str, np.ndarray]  # schema input name -> initializer value
    exact: bool  # True when the replacement computes the original attention (up to round-off)


class Method:
    name: str = ""
    exact = False

    def unsupported(self, site: AttentionSite) -> str | None:
        """Why this method cannot replace `site` faithfully, or None."""
        raise NotImplementedError

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        raise NotImplementedError


class LinearMethod(Method):
    name = "linear"

    def unsupported(self, site: AttentionSite) -> str | None:
        kind = site.mask.kind
        if kind in (MASK_NONE, MASK_CAUSAL, MASK_KEY_PADDING, MASK_CAUSAL_KEY_PADDING):
            return None
        if kind == MASK_BIAS:
            return "the logits carry an additive position bias, which linear attention cannot add (use --method sparse)"
        if kind == MASK_WINDOW:
            return "the mask is a sliding window, which linear attention cannot restrict to (use --method sparse)"
        return f"unsupported mask: {site.mask.detail or kind}"

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        attributes = LINEAR_ATTENTION.complete_attributes(
            scale=site.scale,
            causal=int(site.mask.causal),
            feature_map=options.feature_map,
            eps=options.eps,
            expansion_point=options.expansion_point,
        )
        extra = {}
        if options.feature_map == "favor":
            features = options.num_features or 2 * site.head_dim
            extra["projection"] = favor_projection(site.head_dim, features, seed=options.seed + site.index)
        return Replacement(LINEAR_ATTENTION, attributes, extra, exact=False)


def favor_projection(head_dim: int, num_features: int, *, seed: int) -> np.ndarray:
    """Performer's orthogonal random features W [Dk, F]: blocks of Dk orthogonal directions, each row
    rescaled to the norm of a Gaussian vector (so every column is marginally N(0, I))."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        gaussian = rng.standard_normal((head_dim, head_dim))
        q, _ = np.linalg.qr(gaussian)
        blocks.append(q.T)
    directions = np.concatenate(blocks, axis=0)[:num_features]  # [F, Dk], orthonormal rows per block
    norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=1, keepdims=True)
    return np.ascontiguousarray((directions * norms).T.astype(np.float32))


METHODS: dict[str, Method] = {m.name: m for m in (LinearMethod(),)}


def get_method(name: str) -> Method:
    from attnexport.errors import UnsupportedError

    if name not in METHODS:
        raise UnsupportedError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
