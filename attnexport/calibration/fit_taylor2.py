"""Calibration of LinearAttention with the taylor2 feature map: the expansion point (zero, mean, max)
and a logit temperature (the op's scale), chosen together by grid search, then a per-head output map."""

from __future__ import annotations

from attnexport.calibration import output_map
from attnexport.calibration.search import (
    TEMPERATURES,
    Context,
    SiteFit,
    best_temperature,
    output_error,
    score_all,
    with_attributes,
)
from attnexport.methods import Replacement
from attnexport.ops.reference import EXPANSION_POINTS
from attnexport.sites import AttentionSite


def fit(site: AttentionSite, replacement: Replacement, ctx: Context) -> SiteFit:
    before = output_error(replacement, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    scale = replacement.attributes["scale"]
    candidates = [({"expansion_point": point, "temperature": t},
                   with_attributes(replacement, expansion_point=point, scale=float(scale * t)))
                  for point in EXPANSION_POINTS for t in TEMPERATURES]
    top = min(score_all(candidates, ctx.recording, site.index, ctx.search_batches, threads=ctx.threads),
              key=lambda s: s.error)
    point = top.label["expansion_point"]
    tuned, t, _ = best_temperature(with_attributes(replacement, expansion_point=point), scale, ctx, site.index,
                                   (top.label["temperature"],))  # refines around the grid's best
    mapped, info = output_map.refine(tuned, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    parameters = {"feature_map": "taylor2", "expansion_point": point, "temperature": t,
                  "scale": tuned.attributes["scale"], **info}
    return SiteFit(mapped, parameters, before, after)
