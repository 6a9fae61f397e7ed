"""Replacement methods: which attention each can represent, and the op node it becomes.

A method turns an AttentionSite into an op of the attnexport domain: it says whether the site's mask
can be represented faithfully (and why not), the op's attributes, and any extra inputs (initializers)
the op needs. Methods are registered by name; the CLI's --method chooses one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnexport.errors import UnsupportedError
from attnexport.ops.schema import LINEAR_ATTENTION, LSE_ATTENTION, NYSTROM_ATTENTION, SPARSE_ATTENTION, OpSchema
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
    # sparse: one-sided window W (None: the site's own pattern; -1: unbounded, i.e. --window full)
    window: int | None = None
    dilation: int = 1
    num_global: int = 0
    random_blocks: int = 0
    block_size: int = 0
    causal_only: bool = False
    # nystrom: landmarks per head, how they are chosen, the landmark-system solver and its ridge
    num_landmarks: int = 64
    landmarks: str = "segment_means"
    solver: str = "sketch"
    ridge: float = 1e-2
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replacement:
    """What a method emits for one site."""

    op: OpSchema
    attributes: dict[str, Any]
    extra_inputs: dict[str, np.ndarray]  # schema input name -> initializer value
    exact: bool  # True when the replacement computes the original attention (up to round-off)
    # schema input name -> name of a graph value the op reads (e.g. attn_bias: the site's additive bias)
    value_inputs: dict[str, str] = field(default_factory=dict)
    # A per-head affine map applied to the op's output Y [B, Hq, Sq, Dv]: Y @ weight + bias, with weight
    # [Hq, Dv, Dv] and bias [Hq, 1, Dv] (fitted by `attnexport calibrate`); None: no map.
    output_map: tuple[np.ndarray, np.ndarray] | None = None


class Method:
    name: str = ""
    exact = False

    def unsupported(self, site: AttentionSite) -> str | None:
        """Why this method cannot replace `site` faithfully, or None."""
        raise NotImplementedError

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        raise NotImplementedError

    def skipped(self, site: AttentionSite, options: MethodOptions) -> str | None:
        """Why the user's options leave `site` alone (e.g. --causal-only on a bidirectional site), or None."""
        return None


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


class SparseMethod(Method):
    """SparseAttention: exact softmax over a window (+ dilation, global tokens, BigBird random blocks).

    `--window W` is one-sided: a non-causal site sees keys i'-W..i'+W (2W+1), a causal one i'-W..i' (W+1);
    `--window full` (-1) is unbounded. A site whose mask already is a band keeps it, intersected with the
    requested window; an additive bias (ALiBi, relative positions) is passed through as attn_bias. The
    replacement is exact when the op's pattern is the site's own (and no dilation, globals or random
    blocks add or drop keys)."""

    name = "sparse"

    def unsupported(self, site: AttentionSite) -> str | None:
        kind = site.mask.kind
        if kind in (MASK_NONE, MASK_CAUSAL, MASK_KEY_PADDING, MASK_CAUSAL_KEY_PADDING, MASK_WINDOW):
            return None
        if kind == MASK_BIAS:
            if site.mask.bias_value is None:
                return "the additive bias could not be located in the graph"
            if site.output_layout == "bh_merged":
                return "the additive bias is added to [B*H, S, S] logits, not [B, H, Sq, Skv]"
            return None
        return f"unsupported mask: {site.mask.detail or kind}"

    def skipped(self, site: AttentionSite, options: MethodOptions) -> str | None:
        if options.causal_only and not _site_is_causal(site):
            return "not causal (--causal-only)"
        return None

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        mask = site.mask
        causal = _site_is_causal(site)
        # The site's own band (None = unbounded); causal sites see nothing to the right.
        own_left, own_right = mask.window_left, mask.window_right
        if mask.kind in (MASK_NONE, MASK_KEY_PADDING):
            own_left = own_right = None
        if causal:
            own_right = 0 if own_right is None else min(own_right, 0)
        wanted = options.window
        if wanted is not None and wanted < -1:
            raise UnsupportedError(f"--window {wanted}: use a size >= 0 or 'full'")
        if options.dilation < 1 or options.num_global < 0 or options.random_blocks < 0 or options.block_size < 0:
            raise UnsupportedError("--dilation must be >= 1; --global, --random-blocks and --block-size >= 0")
        if options.random_blocks and not options.block_size:
            raise UnsupportedError("--random-blocks needs --block-size")
        limit = None if wanted is None or wanted < 0 else wanted
        left = _narrower(own_left, limit)
        right = _narrower(own_right, limit)
        attributes = SPARSE_ATTENTION.complete_attributes(
            scale=site.scale,
            causal=int(causal),
            window_left=-1 if left is None else left,
            window_right=-1 if right is None else right,
            dilation=options.dilation,
            num_global=options.num_global,
            block_size=options.block_size if options.random_blocks else 0,
            num_random_blocks=options.random_blocks if options.block_size else 0,
            seed=options.seed,
        )
        full_window = left is None and right is None
        same_band = (left, right) == (own_left, own_right)
        adds_nothing = options.num_global == 0 and options.random_blocks == 0
        exact = options.dilation == 1 and same_band and (adds_nothing or full_window)
        value_inputs = {"attn_bias": mask.bias_value} if mask.kind == MASK_BIAS else {}
        return Replacement(SPARSE_ATTENTION, attributes, {}, exact=exact, value_inputs=value_inputs)


def _site_is_causal(site: AttentionSite) -> bool:
    """Causal in the op's sense: no key right of the (bottom-right) diagonal, by mask or band."""
    return site.mask.causal or (site.mask.kind in (MASK_WINDOW, MASK_BIAS) and site.mask.window_right is not None
                                and site.mask.window_right <= 0)


def _narrower(own: int | None, limit: int | None) -> int | None:
    if own is None:
        return limit
    return own if limit is None else min(own, limit)


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


class LseMethod(Method):
    """LseAttention (Heinsen 2024): logits log Σ_d exp(q̃_d + k̃_d) with q̃ = √scale·q, k̃ = √scale·k (the
    site's scale); linear time, and a fixed-size state per kv head when causal (--recurrent)."""

    name = "lse"

    def unsupported(self, site: AttentionSite) -> str | None:
        kind = site.mask.kind
        if kind in (MASK_NONE, MASK_CAUSAL, MASK_KEY_PADDING, MASK_CAUSAL_KEY_PADDING):
            return None
        if kind == MASK_BIAS:
            return "the logits carry an additive position bias, which LseAttention cannot add (use --method sparse)"
        if kind == MASK_WINDOW:
            return "the mask is a sliding window, which LseAttention cannot restrict to (use --method sparse)"
        return f"unsupported mask: {site.mask.detail or kind}"

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        attributes = LSE_ATTENTION.complete_attributes(scale=site.scale, causal=int(site.mask.causal))
        return Replacement(LSE_ATTENTION, attributes, {}, exact=False)


class NystromMethod(Method):
    """NystromAttention: Nyströmformer's landmark approximation, non-causal sites only (a landmark
    averages future tokens). Exact when --landmarks is at least the number of keys (up to the ridge)."""

    name = "nystrom"

    def unsupported(self, site: AttentionSite) -> str | None:
        kind = site.mask.kind
        if kind in (MASK_NONE, MASK_KEY_PADDING):
            return None
        if kind in (MASK_CAUSAL, MASK_CAUSAL_KEY_PADDING):
            return "causal attention: Nyström landmarks average future tokens (use --method sparse, linear or lse)"
        if kind == MASK_BIAS:
            return "the logits carry an additive position bias, which NystromAttention cannot add (use --method sparse)"
        if kind == MASK_WINDOW:
            return "the mask is a sliding window, which NystromAttention cannot restrict to (use --method sparse)"
        return f"unsupported mask: {site.mask.detail or kind}"

    def replacement(self, site: AttentionSite, options: MethodOptions) -> Replacement:
        try:
            attributes = NYSTROM_ATTENTION.complete_attributes(
                scale=site.scale, causal=0, num_landmarks=options.num_landmarks, landmarks=options.landmarks,
                solver=options.solver, ridge=options.ridge)
        except ValueError as error:
            raise UnsupportedError(f"--method nystrom: {error}") from None
        if attributes["num_landmarks"] < 1:
            raise UnsupportedError(f"--landmarks {options.num_landmarks}: must be >= 1")
        if attributes["solver"] != "newton_schulz" and not attributes["ridge"] > 0:
            raise UnsupportedError(f"--ridge {options.ridge}: the {attributes['solver']} solver needs ridge > 0")
        return Replacement(NYSTROM_ATTENTION, attributes, {}, exact=False)


METHODS: dict[str, Method] = {m.name: m for m in (LinearMethod(), SparseMethod(), LseMethod(), NystromMethod())}


def get_method(name: str) -> Method:
    from attnexport.errors import UnsupportedError

    if name not in METHODS:
        raise UnsupportedError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
