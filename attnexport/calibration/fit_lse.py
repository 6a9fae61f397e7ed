"""Calibration of LseAttention: a logit temperature (the op's scale) by grid search, and a per-head
output map when it lowers the error on held-out batches."""

from __future__ import annotations

from attnexport.calibration import output_map
from attnexport.calibration.search import Context, SiteFit, best_temperature, output_error
from attnexport.methods import Replacement
from attnexport.sites import AttentionSite

# Heinsen's logit log Σ_d exp(q̃_d + k̃_d) is dominated by the largest term, so useful temperatures lie
# further from 1 than a dot product's.
LSE_TEMPERATURES = tuple(2.0 ** (k / 2) for k in range(-8, 9))  # 1/16 .. 16


def fit(site: AttentionSite, replacement: Replacement, ctx: Context) -> SiteFit:
    before = output_error(replacement, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    tuned, t, _ = best_temperature(replacement, replacement.attributes["scale"], ctx, site.index, LSE_TEMPERATURES)
    mapped, info = output_map.refine(tuned, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    return SiteFit(mapped, {"temperature": t, "scale": tuned.attributes["scale"], **info}, before, after)
