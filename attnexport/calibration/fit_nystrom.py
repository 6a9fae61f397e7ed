"""Calibration of NystromAttention: the number of landmarks m per site — the smallest m (fewer
landmarks, less work) whose relative output error on the calibration data stays within the budget —
then a per-head output map when it lowers the error on held-out batches."""

from __future__ import annotations

from attnexport.calibration import output_map
from attnexport.calibration.search import Context, SiteFit, output_error, with_attributes
from attnexport.methods import Replacement
from attnexport.sites import AttentionSite

DEFAULT_BUDGET = 0.05
LANDMARKS = (4, 8, 16, 24, 32, 48, 64, 96, 128)


def fit(site: AttentionSite, replacement: Replacement, ctx: Context) -> SiteFit:
    budget = ctx.budget if ctx.budget is not None else DEFAULT_BUDGET
    before = output_error(replacement, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    longest = max(ctx.recording.load(site.index, b).k.shape[2] for b in ctx.fit_batches + ctx.check_batches)
    candidates = [m for m in LANDMARKS if m < longest] or [longest]
    tried: dict[int, float] = {}
    chosen = None
    # Errors fall as m grows: bisect for the smallest m within the budget.
    lo, hi = 0, len(candidates) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = with_attributes(replacement, num_landmarks=candidates[mid])
        err = output_error(candidate, ctx.recording, site.index, ctx.search_batches, threads=ctx.threads)
        tried[candidates[mid]] = round(err, 6)
        if err <= budget:
            chosen, hi = candidate, mid - 1
        else:
            lo = mid + 1
    if chosen is None:  # none within the budget: the most landmarks tried
        chosen = with_attributes(replacement, num_landmarks=candidates[-1])
    mapped, info = output_map.refine(chosen, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    parameters = {"num_landmarks": chosen.attributes["num_landmarks"], "budget": budget,
                  "tried": {str(k): v for k, v in sorted(tried.items())}, **info}
    return SiteFit(mapped, parameters, before, after)
