"""Probe runs for matchers: feeds at one or two sequence lengths (all-ones masks), plus variants with
a 2-D mask input partly zeroed, and the values every candidate asks for, evaluated once per feed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from attnexport import inputs, probe

PROBE_LENGTHS = (7, 12)  # distinct from typical head counts and head dims, and from each other
# A sliding window wider than the short probes looks causal (or like no mask) there, so masks that
# depend on the sequence length are also evaluated alone, batch 1, at one long length: the first of
# these the model runs at. Only the mask is computed, never Q/K or the logits, but exporters build it
# from several [L, L] int64/float intermediates, so the cost grows as L^2: on transformers' Mistral
# exports L = 8197 (every window up to 8195, Mistral's 4096 included) took 48-62 s and 10-11.5 GB,
# L = 2047 about 3 s and 0.8 GB. 2053 = 2*1024 + 5 shows every window up to 2051 keys on either side
# (Phi-3's 2047, Gemma-3's 1024, Longformer's 512); 1029 and 517 serve models whose learned position
# tables (1024, 512) cannot run longer. A wider window is seen only with real inputs longer than it
# (--inputs), which replace every synthesised probe.
LONG_PROBE_LENGTHS = (2053, 1029, 517)


@dataclass
class ProbeRun:
    feeds: dict[str, np.ndarray]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    padded_input: str | None = None  # the 2-D mask input zeroed in this run (padded runs only)
    long_masks: dict[str, np.ndarray] = field(default_factory=dict)  # first base run: masks at a long length


def base_feeds(model: ir.Model, user_feeds: dict[str, np.ndarray] | None = None, *,
               batch: int = 2, distinct: bool = False) -> list[dict[str, np.ndarray]]:
    if user_feeds is not None:
        return [user_feeds]
    if inputs.has_dynamic_sequence(model):
        return [inputs.synthesize(model, inputs.ProbeShape(batch=batch, seq_len=n, distinct=distinct))
                for n in PROBE_LENGTHS]
    return [inputs.synthesize(model, inputs.ProbeShape(batch=batch))]


# Probe feeds to try in turn: distinct lengths for distinct sequence symbols first (so cross-attention
# shows Sq != Skv), then one length for all (exporters may name dims that must be equal differently),
# then batch 1 (some exports run only there, e.g. ORT's RotaryEmbedding in dynamo LLaMA at opset 23).
PROBE_ATTEMPTS = ({"batch": 2, "distinct": True}, {"batch": 2, "distinct": False}, {"batch": 1, "distinct": False})


def padded_variants(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """For every 2-D mask-like input: the feed with its last keys zeroed in batch 0 (right padding) and
    its first keys zeroed in batch 1 (left padding)."""
    variants = []
    for spec in inputs.signature(model):
        if not inputs.is_mask_input(spec) or spec.name not in feeds:
            continue
        flags = np.array(feeds[spec.name], copy=True)
        batch, length = flags.shape
        if length < 2:
            continue
        cut = max(1, length // 4)
        flags[0, length - cut:] = 0
        if batch > 1:
            flags[1, : cut + 1] = 0
        variant = dict(feeds)
        variant[spec.name] = flags
        variants.append((spec.name, variant))
    return variants


def run_probes(model: ir.Model, candidates, user_feeds=None) -> tuple[list[ProbeRun], list[ProbeRun]]:
    """Evaluate what the candidates need on base feeds, and their masks on padded variants."""
    needed = list(dict.fromkeys(name for c in candidates for name in c.values_needed()))
    mask_needed = list(dict.fromkeys(name for c in candidates for name in c.mask_values()))
    attempts = [{}] if user_feeds is not None else list(PROBE_ATTEMPTS)
    if not inputs.has_dynamic_batch(model):
        attempts = [a for a in attempts if a.get("batch", 2) == 2] or attempts[:1]
    error = None
    for attempt in attempts:
        try:
            base = [ProbeRun(feeds, probe.evaluate(model, needed, feeds))
                    for feeds in base_feeds(model, user_feeds, **attempt)]
            break
        except probe.ProbeError as e:
            error = e
    else:
        raise error
    if base:
        base[0].long_masks = long_mask_values(model, candidates, base[0], user_feeds)
    padded = []
    if mask_needed:
        for name, feeds in padded_variants(model, base[0].feeds):
            # The logits' shape comes along so that masks can be broadcast to it.
            extra = [c.core.raw_scores.name for c in candidates if hasattr(c, "core")]
            values = probe.evaluate(model, mask_needed + extra, feeds)
            padded.append(ProbeRun(feeds, values, padded_input=name))
    return base, padded


def long_mask_values(model: ir.Model, candidates, first: ProbeRun, user_feeds=None) -> dict[str, np.ndarray]:
    """Each candidate's mask (those with a query axis) evaluated alone at the first of LONG_PROBE_LENGTHS
    the model runs at; {} for fixed-length models, user feeds, or when none runs."""
    if user_feeds is not None or not inputs.has_dynamic_sequence(model):
        return {}
    names = [c.mask_values()[0] for c in candidates if c.mask_values()]
    names = [n for n in dict.fromkeys(names)
             if n in first.values and np.ndim(first.values[n]) >= 2 and np.shape(first.values[n])[-2] > 1]
    if not names:
        return {}
    for length in LONG_PROBE_LENGTHS:
        feeds = inputs.synthesize(model, inputs.ProbeShape(batch=1, seq_len=length))
        try:
            return probe.evaluate(model, names, feeds)
        except probe.ProbeError:
            continue  # e.g. learned positions shorter than `length`: try a shorter one
    return {}
