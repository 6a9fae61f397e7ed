"""Calibration of ClusteredAttention: per site (layer), the cheapest window and cluster count whose relative
output error on the calibration data stays within the budget, then a per-head output map when it lowers
the held-out error.

Candidates are the windows 8 .. 128 (up to --window) × clusters 8 .. 64 (up to --clusters), tried from
the cheapest, cost = near keys + clusters per query ((W + 1) + M causal, (2W + 1) + M bidirectional);
the first within the budget is taken, or the most accurate one when none is (reported as missing it).
Centres: a causal site needs fixed ones (a query must not see later keys through them), fitted by the
op's k-means over the recorded keys (centroids.py) and written as the `centroids` initializer; a
bidirectional site compares the run-time k-means with fitted centres at the chosen size and keeps the
better."""

from __future__ import annotations

from dataclasses import replace

from attnexport.calibration import output_map
from attnexport.calibration.centroids import fit_centroids
from attnexport.calibration.search import Context, SiteFit, output_error
from attnexport.methods import Replacement
from attnexport.sites import AttentionSite

DEFAULT_BUDGET = 0.05
WINDOWS = (8, 16, 32, 64, 128)
CLUSTERS = (8, 16, 32, 64)
DEFAULT_WINDOW_CAP = 128
DEFAULT_CLUSTER_CAP = 64


def grid(window_cap: int, cluster_cap: int, longest: int, causal: bool) -> list[tuple[int, int]]:
    """(window, clusters) candidates, cheapest first. A window reaching every key is exact (no far
    keys), so windows stop at the first one that covers the longest recorded sequence."""
    windows = [w for w in WINDOWS if w <= window_cap]
    covering = [w for w in windows if w + 1 >= longest]
    windows = [w for w in windows if w + 1 < longest] + covering[:1] or [max(0, min(window_cap, longest))]
    clusters = [m for m in CLUSTERS if m <= cluster_cap] or [cluster_cap]

    def cost(pair):
        w, m = pair
        return ((w + 1) if causal else (2 * w + 1)) + m, w

    return sorted(((w, m) for w in windows for m in clusters), key=cost)


def fit(site: AttentionSite, replacement: Replacement, ctx: Context, *, iterations: int = 10) -> SiteFit:
    """`replacement` carries the caps: its window (--window, -1 = none given) and cluster count
    (--clusters; causal sites come with placeholder centres of that count)."""
    budget = ctx.budget if ctx.budget is not None else DEFAULT_BUDGET
    causal = bool(replacement.attributes["causal"])
    own_window = replacement.attributes["window_left"]
    window_cap = DEFAULT_WINDOW_CAP if own_window < 0 else own_window
    cluster_cap = replacement.attributes["num_clusters"]
    longest = max(ctx.recording.load(site.index, b).k.shape[2] for b in ctx.fit_batches + ctx.check_batches)
    centres: dict[int, object] = {}

    def fitted(m: int):
        if m not in centres:
            centres[m] = fit_centroids(ctx.recording, site.index, ctx.fit_batches, m, iterations)
        return centres[m]

    def candidate(w: int, m: int, fixed: bool) -> Replacement:
        extra = {k: v for k, v in replacement.extra_inputs.items() if k != "centroids"}
        if fixed:
            extra["centroids"] = fitted(m)
        attributes = {**replacement.attributes, "window_left": w, "window_right": 0 if causal else w,
                      "num_clusters": m}
        return replace(replacement, attributes=attributes, extra_inputs=extra, exact=False)

    # Before: the caps as given (causal: with fitted centres, the placeholders mean nothing).
    start = candidate(window_cap, cluster_cap, fixed=causal)
    before = output_error(start, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    tried: dict[str, float] = {}
    chosen = best = None
    for w, m in grid(window_cap, cluster_cap, longest, causal):
        trial = candidate(w, m, fixed=causal)
        err = output_error(trial, ctx.recording, site.index, ctx.search_batches, threads=ctx.threads)
        tried[f"w{w}+m{m}"] = round(err, 6)
        if best is None or err < best[0]:
            best = (err, trial, w, m)
        if err <= budget:
            chosen = (err, trial, w, m)
            break
    within = chosen is not None
    err, trial, w, m = chosen or best
    source = "fitted" if causal else "run-time k-means"
    if not causal:  # bidirectional: fitted centres may beat the per-call k-means
        fixed = candidate(w, m, fixed=True)
        fixed_err = output_error(fixed, ctx.recording, site.index, ctx.search_batches, threads=ctx.threads)
        tried[f"w{w}+m{m} fitted centres"] = round(fixed_err, 6)
        if fixed_err < err:
            trial, source = fixed, "fitted"
    mapped, info = output_map.refine(trial, ctx, site.index)
    after = output_error(mapped, ctx.recording, site.index, ctx.check_batches, threads=ctx.threads)
    parameters = {"window": w, "clusters": m, "centres": source, "budget": budget, "within_budget": within,
                  "tried": tried, **info}
    return SiteFit(mapped, parameters, before, after)


__all__ = ["CLUSTERS", "DEFAULT_BUDGET", "WINDOWS", "fit", "grid"]
