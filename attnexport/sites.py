"""AttentionSite: the one description of an attention computation that every matcher produces.

Matchers (attnexport/match/) turn whatever form a model holds — decomposed MatMul-Softmax-MatMul, ONNX
`Attention`, com.microsoft ops — into these records; the planner, the rewriter, inspect and verify read
nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Mask kinds
MASK_NONE = "none"
MASK_CAUSAL = "causal"
MASK_KEY_PADDING = "key_padding"
MASK_CAUSAL_KEY_PADDING = "causal+key_padding"
MASK_WINDOW = "window"  # a banded (sliding-window) pattern, possibly with key padding
MASK_BIAS = "bias"  # an additive bias with finite non-zero entries (ALiBi, relative positions, ...)
MASK_OTHER = "other"  # anything else (reason in MaskInfo.detail)


@dataclass
class MaskInfo:
    """What the mask of a site does, established by evaluating it (see match/masks.py)."""

    kind: str = MASK_NONE
    causal: bool = False
    # Visible band relative to the bottom-right-aligned diagonal i' = i + (Skv - Sq):
    # key j is visible to query i iff -window_left <= j - i' <= window_right. None = unbounded.
    window_left: int | None = None
    window_right: int | None = None
    # Graph input whose [B, Skv] entries say which keys are real (non-zero = attend).
    key_padding_input: str | None = None
    # Value holding an additive bias (kind "bias"), broadcastable to [B, H, Sq, Skv].
    bias_value: str | None = None
    detail: str = ""

    @property
    def has_key_padding(self) -> bool:
        return self.key_padding_input is not None

    def describe(self) -> str:
        if self.kind == MASK_WINDOW:
            left = "∞" if self.window_left is None else str(self.window_left)
            right = "∞" if self.window_right is None else str(self.window_right)
            text = f"window[-{left},+{right}]"
            return text + "+key_padding" if self.has_key_padding else text
        return self.kind


@dataclass
class Operand:
    """A site's Q, K or V: a graph value and the permutation that brings it to [B, H, S, D]."""

    value: str
    perm: tuple[int, ...] | None = None  # None: already [B, H, S, D]
    # 3-D [B, S, H*D] inputs (ONNX Attention with packed heads) carry their head count here.
    packed_heads: int | None = None

    def describe(self) -> str:
        if self.packed_heads is not None:
            return f"{self.value} (3-D, {self.packed_heads} heads)"
        return self.value if self.perm is None else f"{self.value} (perm {list(self.perm)})"


@dataclass
class AttentionSite:
    index: int
    name: str  # a readable name: the common prefix of the covered nodes
    source: str  # "decomposed", "onnx.Attention", ...
    q: Operand
    k: Operand
    v: Operand
    output: str  # the value the replacement takes over ([B, Hq, Sq, Dv] unless output_layout says otherwise)
    output_layout: str = "bhsd"  # "bhsd", "bsd" (3-D packed heads) or "bh_merged" ([B*H, S, Dv])
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    scale: float = 0.0
    dtype: str = "float32"
    mask: MaskInfo = field(default_factory=MaskInfo)
    nodes: list[str] = field(default_factory=list)  # names of the nodes the site covers
    probe_shape: tuple[int, int] | None = None  # (Sq, Skv) seen while probing
    replaceable: bool = True
    reason: str = ""  # why not replaceable (when replaceable is False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mask"]["describe"] = self.mask.describe()
        return out
