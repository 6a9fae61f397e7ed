"""Classifying an attention mask by evaluating it.

Exporters build masks in many ways (Trilu, Range + comparisons, vmapped index arithmetic, constant
triangles, `(1 - m) * min`, `Where(m, 0, -inf)`, …). Rather than recognising each construction, the
mask value is evaluated on probe inputs and its *behaviour* is classified:

- which (query, key) pairs it leaves visible with an all-ones attention mask (none / causal /
  a band / something else), checked at every probe length;
- whether zeroing entries of a 2-D mask input hides exactly those keys (key padding);
- whether its visible entries are exactly 0 (a pure mask) or carry finite values (an additive bias).

An additive entry counts as masked when it is ≤ MASKED_BELOW (−inf, finfo.min, and the −10000 of
older BERT exports are all far below any real logit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnexport.sites import (
    MASK_BIAS,
    MASK_CAUSAL,
    MASK_CAUSAL_KEY_PADDING,
    MASK_KEY_PADDING,
    MASK_NONE,
    MASK_OTHER,
    MASK_WINDOW,
    MaskInfo,
)

MASKED_BELOW = -1.0e4


@dataclass
class MaskProbe:
    """The mask evaluated on one feed. `padded_input` names the 2-D input zeroed in this feed (None for
    an all-ones feed); `key_flags` is that input's value there."""

    values: np.ndarray | None  # the mask (bool or additive), or None when the site has no mask
    shape: tuple[int, int, int, int]  # [B, Hq, Sq, Skv] of the logits
    padded_input: str | None = None
    key_flags: np.ndarray | None = None


def visibility_and_bias(values: np.ndarray | None, shape: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(visible [B, Hq, Sq, Skv] bool, bias with zeros where masked) of a bool or additive mask."""
    if values is None:
        return np.ones(shape, dtype=bool), np.zeros(shape)
    values = np.asarray(values)
    try:
        values = np.broadcast_to(values, shape)
    except ValueError:
        values = values.reshape(shape)
    if values.dtype == np.bool_:
        return values.copy(), np.zeros(shape)
    values = values.astype(np.float64)
    visible = values > MASKED_BELOW
    return visible, np.where(visible, values, 0.0)


def band_of(visible: np.ndarray) -> tuple[int | None, int | None] | None:
    """(left, right) if `visible` [Sq, Skv] is exactly the band -left <= j - i' <= right (i' = i + Skv - Sq);
    None for unbounded sides; None overall if it is not a band."""
    q_len, kv_len = visible.shape
    offset = (np.arange(kv_len)[None, :] - (np.arange(q_len)[:, None] + kv_len - q_len))
    if not visible.any():
        return None
    left = int(-offset[visible].min())
    right = int(offset[visible].max())
    band = (offset >= -left) & (offset <= right)
    if not np.array_equal(band, visible):
        return None
    # A side reaching as far as the probe's shape allows is unbounded, as far as this probe can tell.
    unbounded_left = left >= int(-offset.min())
    unbounded_right = right >= int(offset.max())
    return (None if unbounded_left else left, None if unbounded_right else right)


def band_of_rows(visible: np.ndarray) -> tuple[int | None, int | None] | None:
    """band_of for a large [Sq, Skv] pattern (the long probe), row by row: no [Sq, Skv] integer arrays."""
    q_len, kv_len = visible.shape
    pos = np.arange(q_len) + (kv_len - q_len)  # i'
    seen = visible.any(axis=1)
    if not seen.any():
        return None
    first = np.argmax(visible, axis=1)
    last = kv_len - 1 - np.argmax(visible[:, ::-1], axis=1)
    left = int((pos - first)[seen].max())
    right = int((last - pos)[seen].max())
    want_first = np.maximum(pos - left, 0)
    want_last = np.minimum(pos + right, kv_len - 1)
    want_seen = want_first <= want_last
    if not np.array_equal(seen, want_seen):
        return None
    count = visible.sum(axis=1)
    rows = seen
    if not (np.array_equal(first[rows], want_first[rows]) and np.array_equal(last[rows], want_last[rows])
            and np.array_equal(count[rows], (want_last - want_first + 1)[rows])):
        return None
    return (None if left >= kv_len - 1 else left, None if right >= q_len - 1 else right)


def long_probe_band(values: np.ndarray) -> tuple[int | None, int | None] | bool | None:
    """The band of a mask evaluated alone at a long sequence length (see probing.LONG_PROBE_LENGTHS);
    None when the mask has no query axis (nothing to learn), False when it is not one band shared by
    every batch entry and head. Only visibility is read (bias and key padding come from the short probes)."""
    values = np.asarray(values)
    if values.ndim < 2 or values.shape[-2] < 2:
        return None
    flat = values.reshape((-1,) + values.shape[-2:])
    first = flat[0] if flat.dtype == np.bool_ else flat[0] > MASKED_BELOW
    for other in flat[1:]:
        if not np.array_equal(first, other if other.dtype == np.bool_ else other > MASKED_BELOW):
            return False
    band = band_of_rows(first)
    return False if band is None else band


def _merge_bands(bands: list[tuple[tuple[int | None, int | None], tuple[int, int]]]):
    """One band from per-probe (band, (left extent, right extent)): a side that reaches the edge of a short
    probe (None) agrees with a bound at a longer probe as long as that bound is at least as wide."""
    merged = []
    for side in (0, 1):
        bounded = {band[side] for band, _ in bands if band[side] is not None}
        if len(bounded) > 1:
            return None
        if bounded:
            bound = bounded.pop()
            if any(band[side] is None and extent[side] > bound for band, extent in bands):
                return None
            merged.append(bound)
        else:
            merged.append(None)
    return tuple(merged)


def classify(base: list[MaskProbe], padded: list[MaskProbe], *, mask_name: str | None,
             long: np.ndarray | None = None) -> MaskInfo:
    """Classify from probes with all-ones masks (`base`, one per probe length) and probes where one 2-D
    mask input was partly zeroed (`padded`). `long` is the mask alone at a long probe length (when the
    model's sequence length is dynamic): a window wider than the short probes shows there (else such a
    window looks causal, or like no mask)."""
    if not base:
        return MaskInfo(kind=MASK_OTHER, detail="the mask could not be evaluated")
    bands = []
    has_bias = False
    for probe in base:
        visible, bias = visibility_and_bias(probe.values, probe.shape)
        if np.any(bias != 0.0):
            has_bias = True
        pattern = visible[0, 0]
        if not (visible == pattern[None, None]).all():
            return MaskInfo(kind=MASK_OTHER, detail="the mask differs between batch entries or heads with no padding")
        band = band_of(pattern)
        if band is None:
            if not pattern.any():
                return MaskInfo(kind=MASK_OTHER, detail="the mask hides every key")
            return MaskInfo(kind=MASK_OTHER, detail="the mask's pattern is neither causal nor a band")
        bands.append((band, (pattern.shape[1] - 1, pattern.shape[0] - 1)))
    if long is not None:
        band = long_probe_band(long)
        if band is False:
            return MaskInfo(kind=MASK_OTHER, detail=f"at sequence length {np.shape(long)[-1]} the mask is not a band")
        if band is not None:
            bands.append((band, (np.shape(long)[-1] - 1, np.shape(long)[-2] - 1)))
    merged = _merge_bands(bands)
    if merged is None:
        seen = sorted({band for band, _ in bands}, key=str)
        return MaskInfo(kind=MASK_OTHER, detail=f"the mask's band changes with the sequence length: {seen}")
    left, right = merged

    key_padding_input = None
    for probe in padded:
        visible, _ = visibility_and_bias(probe.values, probe.shape)
        base_probe = _matching_base(base, probe.shape)
        if base_probe is None:
            continue
        base_visible, _ = visibility_and_bias(base_probe.values, base_probe.shape)
        if np.array_equal(visible, base_visible):
            continue  # this input does not reach the mask
        flags = np.asarray(probe.key_flags) != 0
        if flags.ndim != 2 or flags.shape != (probe.shape[0], probe.shape[3]):
            return MaskInfo(kind=MASK_OTHER, detail=f"the mask depends on {probe.padded_input!r}, whose shape "
                                                    f"{list(flags.shape)} is not [B, Skv]")
        expected = base_visible & flags[:, None, None, :]
        if not np.array_equal(visible, expected):
            return MaskInfo(kind=MASK_OTHER, detail=f"the mask depends on {probe.padded_input!r} beyond hiding padded "
                                                    "keys (e.g. it also masks padded queries)")
        if key_padding_input is not None and key_padding_input != probe.padded_input:
            return MaskInfo(kind=MASK_OTHER, detail="the mask depends on several padding inputs")
        key_padding_input = probe.padded_input

    causal = left is None and right == 0
    info = MaskInfo(causal=causal, key_padding_input=key_padding_input,
                    window_left=left, window_right=right)
    if has_bias:
        info.kind = MASK_BIAS
        info.bias_value = mask_name
        info.detail = "the mask adds finite non-zero values to the logits (a position bias)"
    elif left is None and right is None:
        info.kind = MASK_KEY_PADDING if key_padding_input else MASK_NONE
    elif causal:
        info.kind = MASK_CAUSAL_KEY_PADDING if key_padding_input else MASK_CAUSAL
    else:
        info.kind = MASK_WINDOW
        info.detail = "a sliding-window (banded) mask"
    return info


def _matching_base(base: list[MaskProbe], shape) -> MaskProbe | None:
    for probe in base:
        if probe.shape == shape:
            return probe
    return None
