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
    # The value that says which keys are real: a [B, Skv] tensor (non-zero = attend) when
    # key_padding_kind is "flags", or a [B] tensor of valid lengths (keys j < length[b] are real; the
    # right-padding convention of com.microsoft ops' mask_index / key_padding_mask) for "end_positions".
    key_padding_input: str | None = None
    key_padding_kind: str = "flags"
    key_padding_offset: int = 0  # end_positions: length = value + offset (GroupQueryAttention's seqlens_k + 1)
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
    """A site's Q, K or V: a graph value and how it becomes [B, H, S, D].

    In order: `bias[bias_range]` is added (fused ops that add the projection bias inside), the last
    axis is split into `packed_heads` heads ([B, S, H*D] → [B, H, S, D]), or `perm` is applied.
    """

    value: str
    perm: tuple[int, ...] | None = None  # None: already [B, H, S, D]
    # a slice [start, end) of the last axis is taken first (packed QKV in one input)
    part: tuple[int, int] | None = None
    # 3-D [B, S, H*D] inputs (ONNX Attention with packed heads, com.microsoft ops) carry their head count.
    packed_heads: int | None = None
    bias: str | None = None
    bias_range: tuple[int, int] | None = None

    def describe(self) -> str:
        text = self.value
        if self.bias is not None:
            text += f" + {self.bias}[{self.bias_range[0]}:{self.bias_range[1]}]"
        if self.packed_heads is not None:
            return f"{text} (3-D, {self.packed_heads} heads)"
        return text if self.perm is None else f"{text} (perm {list(self.perm)})"


@dataclass
class Projection:
    """Q, K and V computed inside a fused op from one packed projection (com.microsoft Attention):
    qkv = input @ weight (+ bias), split along the last axis into `sizes`, each with `heads` heads."""

    input: str
    weight: str
    bias: str | None
    sizes: tuple[int, int, int]
    heads: int


@dataclass
class AttentionSite:
    index: int
    name: str  # a readable name: the common prefix of the covered nodes
    source: str  # "decomposed", "onnx.Attention", ...
    q: Operand
    k: Operand
    v: Operand
    output: str  # the value the replacement takes over ([B, Hq, Sq, Dv] unless output_layout says otherwise)
    projection: Projection | None = None  # set when Q/K/V must first be computed (then q/k/v name the parts)
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
