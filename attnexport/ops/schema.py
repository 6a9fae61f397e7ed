"""Schemas of the attnexport operators: inputs, outputs and attributes with their defaults.

One schema per op is the single description that the rewriter (which emits nodes), the ONNX
function builder (which gives the op reference semantics), the CLI (which documents options) and the
tests share. The C++ kernels implement the same list (custom_ops/cpu/ops/*_op.cc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DOMAIN = "attnexport"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    kind: str  # "float", "int" or "string"
    default: Any
    doc: str
    choices: tuple[Any, ...] = ()

    def check(self, value: Any) -> Any:
        if self.kind == "float":
            value = float(value)
        elif self.kind == "int":
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, int):
                raise ValueError(f"attribute {self.name} must be an int, got {value!r}")
        elif self.kind == "string":
            if not isinstance(value, str):
                raise ValueError(f"attribute {self.name} must be a string, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"attribute {self.name}={value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


@dataclass(frozen=True)
class InputSpec:
    name: str
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class OpSchema:
    name: str
    doc: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    attributes: tuple[AttributeSpec, ...] = field(default_factory=tuple)

    def attribute(self, name: str) -> AttributeSpec:
        for spec in self.attributes:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no attribute {name!r}")

    def input_index(self, name: str) -> int:
        for i, spec in enumerate(self.inputs):
            if spec.name == name:
                return i
        raise KeyError(f"{self.name} has no input {name!r}")

    def complete_attributes(self, **values: Any) -> dict[str, Any]:
        """Every attribute with a value: the given ones checked, the others at their defaults.

        Nodes are always written with all attributes explicit, so a converted model says exactly
        what it computes whatever defaults a reader assumes.
        """
        unknown = set(values) - {a.name for a in self.attributes}
        if unknown:
            raise ValueError(f"{self.name} has no attribute(s) {', '.join(sorted(unknown))}")
        out = {}
        for spec in self.attributes:
            out[spec.name] = spec.check(values[spec.name]) if spec.name in values else spec.default
        return out


# `scale` defaults to NaN, read as "1/sqrt(Dk)": the default depends on the input shape, and NaN is
# never a meaningful scale, so kernels and functions treat absent and NaN alike.
SCALE = AttributeSpec("scale", "float", math.nan, "logits are scale * q.k; NaN or absent means 1/sqrt(Dk)")
CAUSAL = AttributeSpec(
    "causal", "int", 0, "1: query i sees key j iff j <= i + (Skv - Sq) (bottom-right aligned)", (0, 1)
)

LINEAR_ATTENTION = OpSchema(
    name="LinearAttention",
    doc=(
        "y_i = sum_j phi(q~_i).phi(k~_j) v_j / (sum_j phi(q~_i).phi(k~_j) + eps) over visible keys j, "
        "q~ = sqrt(scale) q, k~ = sqrt(scale) k."
    ),
    inputs=(
        InputSpec("Q", "[B, Hq, Sq, Dk]"),
        InputSpec("K", "[B, Hkv, Skv, Dk]"),
        InputSpec("V", "[B, Hkv, Skv, Dv]"),
        InputSpec("key_padding_mask", "[B, Skv] bool, true = attend", optional=True),
        InputSpec("projection", "[Dk, F] float: Performer's random features (feature_map=favor)", optional=True),
        InputSpec("past_state", "[B, Hkv, F, Dv+2] float32 (or Q's type): per feature f [S_f (Dv) | z_f | m_f] of the keys of "
                  "earlier calls (zeros = none; m_f: favor's log shift, else 0)", optional=True),
    ),
    outputs=(
        InputSpec("Y", "[B, Hq, Sq, Dv]"),
        InputSpec("present_state", "[B, Hkv, F, Dv+2] float32: past_state plus this call's unpadded keys",
                  optional=True),
    ),
    attributes=(
        SCALE,
        CAUSAL,
        AttributeSpec(
            "feature_map",
            "string",
            "elu1",
            "elu1: elu(x)+1; relu; taylor2: [1, x, vec(xx^T)/sqrt2]; favor: exp(W^T x - |x|^2/2)/sqrt(F)",
            ("elu1", "relu", "taylor2", "favor"),
        ),
        AttributeSpec("eps", "float", 1e-6, "added to the normaliser"),
        AttributeSpec(
            "expansion_point",
            "string",
            "zero",
            "taylor2: expand exp around 0, the row's mean visible logit, or its maximum (quadratic cost)",
            ("zero", "mean", "max"),
        ),
    ),
)

LSE_ATTENTION = OpSchema(
    name="LseAttention",
    doc=(
        "Heinsen (2024): y_i = sum_j w_ij v_j / sum_j w_ij over visible keys j (past_state's and this call's), "
        "w_ij = sum_d exp(q~_id + k~_jd), q~ = sqrt(scale) q, k~ = sqrt(scale) k; a row with no visible key gives 0. "
        "State [B, Hkv, Dk, Dv+2] float32, per key dimension d: [S_d (Dv) | z_d | m_d] with "
        "m_d = max_j k~_jd, z_d = sum_j exp(k~_jd - m_d), S_d = sum_j exp(k~_jd - m_d) v_j; z_d = 0: empty."
    ),
    inputs=(
        InputSpec("Q", "[B, Hq, Sq, Dk]"),
        InputSpec("K", "[B, Hkv, Skv, Dk]"),
        InputSpec("V", "[B, Hkv, Skv, Dv]"),
        InputSpec("key_padding_mask", "[B, Skv] bool, true = attend", optional=True),
        InputSpec("past_state", "[B, Hkv, Dk, Dv+2] float32: the keys of earlier calls (zeros = none)", optional=True),
    ),
    outputs=(
        InputSpec("Y", "[B, Hq, Sq, Dv]"),
        InputSpec("present_state", "[B, Hkv, Dk, Dv+2] float32: past_state plus this call's unpadded keys "
                  "(always produced: the kernel registration needs a fixed output count for its float32 type)"),
    ),
    attributes=(SCALE, CAUSAL),
)

SPARSE_ATTENTION = OpSchema(
    name="SparseAttention",
    doc=(
        "exact softmax attention restricted to a pattern: with i' = i + Skv - Sq, key j is visible to "
        "query i when causal allows it (j <= i') and either -window_left <= j - i' <= window_right with "
        "(j - i') % dilation == 0, or j < num_global, or 0 <= i' < num_global, or j lies in one of the "
        "BigBird random key blocks of query block i' // block_size; key_padding_mask hides keys; "
        "attn_bias is added to the logits; a row with no visible key gives 0. See "
        "attnexport/ops/sparse_attention.py for the random blocks."
    ),
    inputs=(
        InputSpec("Q", "[B, Hq, Sq, Dk]"),
        InputSpec("K", "[B, Hkv, Skv, Dk]"),
        InputSpec("V", "[B, Hkv, Skv, Dv]"),
        InputSpec("key_padding_mask", "[B, Skv] bool, true = attend", optional=True),
        InputSpec("attn_bias", "additive bias of Q's type, broadcastable to [B, Hq, Sq, Skv]", optional=True),
    ),
    outputs=(InputSpec("Y", "[B, Hq, Sq, Dv]"),),
    attributes=(
        SCALE,
        CAUSAL,
        AttributeSpec("window_left", "int", -1, "keys up to this many positions before i' are in the window; -1 = unbounded"),
        AttributeSpec("window_right", "int", -1, "keys up to this many positions after i' are in the window; -1 = unbounded"),
        AttributeSpec("dilation", "int", 1, "window keys are those with (j - i') % dilation == 0 (>= 1)"),
        AttributeSpec("num_global", "int", 0, "the first num_global positions see and are seen by every position"),
        AttributeSpec("block_size", "int", 0, "BigBird random blocks: block size (0 = no random blocks)"),
        AttributeSpec("num_random_blocks", "int", 0, "BigBird random key blocks per query block"),
        AttributeSpec("seed", "int", 0, "seed of the random blocks (>= 0)"),
    ),
)

SCHEMAS: dict[str, OpSchema] = {LINEAR_ATTENTION.name: LINEAR_ATTENTION, SPARSE_ATTENTION.name: SPARSE_ATTENTION}
SCHEMAS[LSE_ATTENTION.name] = LSE_ATTENTION

CLUSTERED_ATTENTION = OpSchema(
    name="ClusteredAttention",
    doc=(
        "cluster=keys: exact softmax over a near pattern N(i) (SparseAttention's window / dilation / num_global / causal "
        "/ key_padding_mask, no random blocks) and every other key visible to query i replaced by the centre mu_c of its "
        "cluster: y_i = (sum_{j in N(i)} e^{s q_i.k_j} v_j + sum_c e^{s q_i.mu_c} sum_{j in F_c(i)} v_j) / "
        "(sum_{j in N(i)} e^{s q_i.k_j} + sum_c |F_c(i)| e^{s q_i.mu_c}), F_c(i) the far keys of i in cluster c, one "
        "normaliser, max-stabilised over the terms present; a row with nothing visible gives 0. Clusters per (batch, kv "
        "head): deterministic k-means over the visible keys in position order (unscaled vectors, squared Euclidean "
        "distance, ties to the lowest index): centre c starts at visible key floor(c * n_v / M), then `iterations` times "
        "assign every key to its nearest centre and move each centre to its keys' mean (an empty cluster keeps its "
        "centre), then assign once more. The centroids input [Hkv, M, Dk] replaces the k-means (assignment to the nearest "
        "given centroid); causal=1 requires it. cluster=queries (fast-transformers' clustered attention, non-causal, "
        "pattern attributes at their defaults, no centroids input): per (batch, query head) the Sq queries are clustered by "
        "the same k-means, each centre attends exactly (softmax over the visible keys) and each query gets its centre's row. "
        "State mode (past_state given or present_state asked for; cluster=keys, causal=1, centroids, window_left = W >= 0, "
        "dilation 1, Sq = Skv = S new tokens): a bounded KV cache plus a clustered summary. State [B, Hkv, G+R+M+1, "
        "Dk+Dv+1] float32 (G = num_global, R = W+1): G global rows (position g) and R window rows (positions P-R..P-1, "
        "oldest first; P = tokens seen before the call, padded ones included) [k | v | flag] (flag 1: a kept token, "
        "in the window rows only at positions >= G), M cluster rows [0 | sum v | count] of the kept tokens at "
        "positions G..P-R-1 (nearest centroid), a last row [P, 0, ...] (exact to 2^24 tokens); zeros = empty. The call's "
        "tokens take positions P..P+S-1 and Y is the causal op's over everything seen; present_state holds P+S tokens."
    ),
    inputs=(
        InputSpec("Q", "[B, Hq, Sq, Dk]"),
        InputSpec("K", "[B, Hkv, Skv, Dk]"),
        InputSpec("V", "[B, Hkv, Skv, Dv]"),
        InputSpec("key_padding_mask", "[B, Skv] bool, true = attend", optional=True),
        InputSpec("centroids", "[Hkv, M, Dk] of Q's type: fixed key centres (M = num_clusters); needed when causal",
                  optional=True),
        InputSpec("past_state", "[B, Hkv, G+W+1+M+1, Dk+Dv+1] float32: the tokens of earlier calls (zeros = none)",
                  optional=True),
    ),
    outputs=(
        InputSpec("Y", "[B, Hq, Sq, Dv]"),
        InputSpec("present_state", "[B, Hkv, G+W+1+M+1, Dk+Dv+1] float32: past_state plus this call's tokens",
                  optional=True),
    ),
    attributes=(
        SCALE,
        CAUSAL,
        AttributeSpec("window_left", "int", -1, "near window: keys up to this many positions before i'; -1 = unbounded"),
        AttributeSpec("window_right", "int", -1, "near window: keys up to this many positions after i'; -1 = unbounded"),
        AttributeSpec("dilation", "int", 1, "near window keys are those with (j - i') % dilation == 0 (>= 1)"),
        AttributeSpec("num_global", "int", 0, "the first num_global positions are near to every position and see all"),
        AttributeSpec("num_clusters", "int", 32, "M, clusters per (batch, kv head) (keys) or (batch, query head) (queries); >= 1"),
        AttributeSpec("iterations", "int", 10, "Lloyd iterations of the k-means (>= 0; unused with the centroids input)"),
        AttributeSpec("cluster", "string", "keys", "keys: exact near part + clustered far keys; queries: clustered queries",
                      ("keys", "queries")),
    ),
)
SCHEMAS[CLUSTERED_ATTENTION.name] = CLUSTERED_ATTENTION

NYSTROM_ATTENTION = OpSchema(
    name="NystromAttention",
    doc=(
        "Nyströmformer's low-rank attention through landmarks, non-causal. Per (batch, query head h, kv head "
        "h // (Hq/Hkv)), over the n_v visible keys in order: m_k = min(num_landmarks, n_v) key landmarks L_k, "
        "m_q = min(num_landmarks, Sq) query landmarks L_q (segment c of n rows = rows floor(c*n/m) .. "
        "floor((c+1)*n/m)-1, so no segment is empty; landmarks: their means, or kmeans: `iterations` Lloyd "
        "steps from the rows floor(c*n/m), nearest by |mu|^2 - 2 x.mu, ties to the lowest index, an empty "
        "cluster keeps its centre); F1 = softmax(s Q L_k^T) [Sq, m_k], M = softmax(s L_q L_k^T) [m_q, m_k], "
        "F3 = softmax(s L_q K_vis^T) [m_q, n_v]; Y = F1 X with X = argmin |M X - F3 V|^2 + ridge |X|^2 "
        "(solver sketch: sketch-preconditioned LSQR on the stacked system [M; sqrt(ridge) I]; direct: Cholesky "
        "of M^T M + ridge I) or X = Z F3 V with Z Nyströmformer's Newton-Schulz pseudo-inverse of M after "
        "newton_iterations steps (solver newton_schulz). No visible key: Y = 0. With num_landmarks >= n_v "
        "the key landmarks are the keys and Y is softmax attention (up to the ridge)."
    ),
    inputs=(
        InputSpec("Q", "[B, Hq, Sq, Dk]"),
        InputSpec("K", "[B, Hkv, Skv, Dk]"),
        InputSpec("V", "[B, Hkv, Skv, Dv]"),
        InputSpec("key_padding_mask", "[B, Skv] bool, true = attend", optional=True),
    ),
    outputs=(InputSpec("Y", "[B, Hq, Sq, Dv]"),),
    attributes=(
        SCALE,
        AttributeSpec("causal", "int", 0, "must be 0: a landmark averages future tokens, so causal=1 is refused", (0, 1)),
        AttributeSpec("num_landmarks", "int", 64, "landmarks m per (batch, head) (>= 1)"),
        AttributeSpec("landmarks", "string", "segment_means", "segment_means or kmeans (cluster centres)",
                      ("segment_means", "kmeans")),
        AttributeSpec("iterations", "int", 3, "kmeans: Lloyd steps (>= 0)"),
        AttributeSpec("solver", "string", "sketch", "how the m x m landmark system is solved",
                      ("sketch", "newton_schulz", "direct")),
        AttributeSpec("newton_iterations", "int", 6, "newton_schulz: iterations (>= 0)"),
        AttributeSpec("ridge", "float", 1e-2, "sketch, direct: Tikhonov weight (> 0; M's rows sum to 1)"),
    ),
)
SCHEMAS[NYSTROM_ATTENTION.name] = NYSTROM_ATTENTION
