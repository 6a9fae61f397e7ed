"""Calibration of LinearAttention with Performer's favor features: the number of features F and the
best of several random draws (the seed decides the projection initializer), then a per-head output
map. With an error budget, the smallest F whose best draw meets it wins (fewer features, faster op);
without one, the lowest error."""

from __future__ import annotations

from dataclasses import replace

from attnexport.calibration import output_map
from attnexport.calibration.search import Context, SiteFit, output_error, score_all
from attnexport.methods import Replacement, favor_projection
from attnexport.sites import AttentionSite

FEATURE_MULTIPLES = (1, 2, 4)  # F = multiple · Dk, unless the user fixed --num-features
DRAWS = 4


def fit(site: AttentionSite, replacement: Replacement, ctx: Context, *, num_features: int | None = None,
        seed: int = 0, draws: int = DRAWS) -> SiteFit:
    before = output_error(replacement, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    dk = site.head_dim
    counts = [num_features] if num_features else [m * dk for m in FEATURE_MULTIPLES]
    best_per_count = []
    for count in counts:
        seeds = [seed + site.index * 1000 + draw for draw in range(draws)]
        candidates = [({"num_features": count, "seed": s},
                       replace(replacement, extra_inputs={"projection": favor_projection(dk, count, seed=s)}))
                      for s in seeds]
        scored = score_all(candidates, ctx.recording, site.index, ctx.search_batches, threads=ctx.threads)
        best_per_count.append(min(scored, key=lambda s: s.error))
    meeting = [s for s in best_per_count if ctx.budget is not None and s.error <= ctx.budget]
    top = meeting[0] if meeting else min(best_per_count, key=lambda s: s.error)
    mapped, info = output_map.refine(top.replacement, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    parameters = {"feature_map": "favor", **top.label, "draws": draws,
                  "search_errors": {str(s.label["num_features"]): round(s.error, 6) for s in best_per_count}, **info}
    return SiteFit(mapped, parameters, before, after)
