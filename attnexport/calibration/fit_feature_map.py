"""Calibration of LinearAttention with the elu1 or relu feature map: a logit temperature (the op's
scale, which also scales what the feature map sees) and a per-head output map. relu is positively
homogeneous, so its scale cancels in the ratio: it gets the map only."""

from __future__ import annotations

from attnexport.calibration import output_map
from attnexport.calibration.search import Context, SiteFit, best_temperature, output_error
from attnexport.methods import Replacement
from attnexport.sites import AttentionSite


def fit(site: AttentionSite, replacement: Replacement, ctx: Context) -> SiteFit:
    before = output_error(replacement, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    tuned, t = replacement, 1.0
    if replacement.attributes["feature_map"] != "relu":
        tuned, t, _ = best_temperature(replacement, replacement.attributes["scale"], ctx, site.index)
    mapped, info = output_map.refine(tuned, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    parameters = {"feature_map": replacement.attributes["feature_map"], "temperature": t,
                  "scale": tuned.attributes["scale"], **info}
    return SiteFit(mapped, parameters, before, after)
