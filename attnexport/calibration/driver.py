"""The calibration driver: find the sites, record the original's attention on the calibration data,
fit each site's replacement, write the converted model with the fitted parameters as its attributes
and initializers, and record what was fitted in its metadata.

Sites are fitted in order, and (sequential=True, the default) each site's Q, K, V are recorded from
the model with every earlier site already replaced by its fitted op, while the target stays the
original's attention output: later sites learn to correct what earlier replacements changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from attnexport import model_io, rewrite
from attnexport.calibration import (fit_clustered, fit_favor, fit_feature_map, fit_lse, fit_nystrom, fit_sparse,
                                    fit_taylor2)
from attnexport.calibration.data import CalibrationData
from attnexport.calibration.op_runner import library_available
from attnexport.calibration.recording import Recording, copy_model
from attnexport.calibration.search import Context, SiteFit
from attnexport.errors import AttnExportError, NoAttentionError, UnsupportedError
from attnexport.match import find_sites
from attnexport.methods import MethodOptions, Replacement, centroids_key, get_method
from attnexport.plan import Plan, SitePlan, make_plan

METADATA_CALIBRATION = "attnexport.calibration"
CALIBRATED_METHODS = ("linear", "nystrom", "sparse", "lse", "clustered")
SEARCH_BATCHES = 4  # grid searches score candidates on this many fit batches


@dataclass
class CalibrationResult:
    input_path: str
    output_path: str
    plan: Plan
    fits: dict[int, SiteFit] = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # what went into the metadata


def _fitter(method: str, options: MethodOptions) -> Callable[[object, Replacement, Context], SiteFit]:
    if method == "linear":
        if options.feature_map == "taylor2":
            return fit_taylor2.fit
        if options.feature_map == "favor":
            return lambda site, r, ctx: fit_favor.fit(site, r, ctx, num_features=options.num_features,
                                                      seed=options.seed)
        return fit_feature_map.fit
    if method == "lse":
        return fit_lse.fit
    if method == "sparse":
        return fit_sparse.fit
    if method == "nystrom":
        return fit_nystrom.fit
    if method == "clustered":
        return lambda site, r, ctx: fit_clustered.fit(site, r, ctx, iterations=options.iterations)
    raise UnsupportedError(f"--method {method}: calibrate knows {', '.join(CALIBRATED_METHODS)}")


def calibrate(model_path: str | Path, output_path: str | Path, data: CalibrationData | Callable, *,
              method: str = "linear", options: MethodOptions | None = None, layers: str | None = None,
              budget: float | None = None, sequential: bool = True, threads: int | None = None,
              progress: Callable[[str], None] | None = None, recurrent: bool = False) -> CalibrationResult:
    """Fit `method`'s replacement of every attention site of the model at `model_path` to the original's
    outputs on `data` (a CalibrationData, or a function of the loaded model that returns one); write
    the calibrated model atomically to `output_path` (never over the input). `recurrent`: the model is a
    decoder exported with its KV cache, written with a fixed-size state per layer (attnexport.recurrent)."""
    say = progress or (lambda _: None)
    options = options or MethodOptions()
    get_method(method)  # an unknown name gets the registry's message
    if method not in CALIBRATED_METHODS:
        raise UnsupportedError(f"--method {method}: calibrate knows {', '.join(CALIBRATED_METHODS)}")
    if budget is not None and not budget > 0:
        raise UnsupportedError(f"--budget {budget}: give a relative output error > 0 (e.g. 0.05)")
    fitter = _fitter(method, options)
    output = model_io.check_output_path(model_path, output_path)
    say("loading the model")
    model = model_io.load(model_path)
    if callable(data):
        data = data(model)
    if not data.batches:
        raise AttnExportError("the calibration data holds no examples")
    signature = ([(v.name, v.dtype, str(v.shape)) for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    say("finding attention (one probe run)")
    # Synthesised probe inputs, as convert uses: the mask classification wants unpadded rows.
    sites = find_sites(model)
    if not sites:
        raise NoAttentionError(f"{model_path}: no softmax attention found; nothing written")
    if method == "clustered":
        options = _clustered_caps(sites, options)
    plan = make_plan(sites, method, options, layers=layers)
    if not plan.selected:
        reasons = "; ".join(sorted({p.skip_reason for p in plan.sites}))
        raise NoAttentionError(f"{model_path}: none of the {len(sites)} attention sites can be replaced by "
                               f"'{method}' ({reasons}); nothing written")
    selected = [p.site for p in plan.selected]
    fit_batches, check_batches = data.split()
    search = fit_batches[::max(1, len(fit_batches) // SEARCH_BATCHES)][:SEARCH_BATCHES]  # spread over the lengths
    ctx_base = dict(fit_batches=fit_batches, search_batches=search, check_batches=check_batches,
                    budget=budget, threads=threads)
    started = time.perf_counter()
    fits: dict[int, SiteFit] = {}
    with Recording(selected) as recording:
        say(f"recording {len(selected)} sites on {data.count} examples ({len(data.batches)} batches)")
        recording.record(model, data.batches, threads=threads)
        ctx = Context(recording=recording, **ctx_base)
        for n, site_plan in enumerate(plan.selected):
            site = site_plan.site
            if sequential and fits:
                say(f"site {site.index}: recording its inputs with {len(fits)} earlier sites replaced")
                partial = _converted(model, plan, fits)
                recording.record(partial, data.batches, site_indices=[site.index], targets=False,
                                 with_library=library_available(), threads=threads)
            say(f"site {site.index} ({n + 1}/{len(plan.selected)}): fitting")
            fit = fitter(site, site_plan.replacement, ctx)
            fits[site.index] = replace(fit, replacement=_in_dtype(fit.replacement, site.dtype))
    final = _final_plan(plan, fits)
    record = {"method": method, "data": data.source, "examples": data.count, "batches": len(data.batches),
              "fit_batches": len(fit_batches), "check_batches": len(check_batches), "sequential": sequential,
              "budget": budget, "seconds": round(time.perf_counter() - started, 1),
              "sites": {str(i): f.summary() for i, f in fits.items()}}
    say("writing")
    if recurrent:
        from attnexport import recurrent as recurrent_rewrite

        recurrent_rewrite.apply(model, final)  # changes the signature by design: cache -> state
    else:
        rewrite.apply(model, final)
    model.metadata_props[METADATA_CALIBRATION] = json.dumps(record, separators=(",", ":"))
    if not recurrent and ([(v.name, v.dtype, str(v.shape)) for v in model.graph.inputs],
                          [v.name for v in model.graph.outputs]) != signature:
        raise AttnExportError("internal error: the rewrite changed the graph's inputs or outputs; nothing written")
    from attnexport.api import _check_model_file

    model_io.save_atomic(model, output, validate=lambda path: _check_model_file(path, model_path))
    return CalibrationResult(str(model_path), str(output), final, fits, record)


def _clustered_caps(sites, options: MethodOptions) -> MethodOptions:
    """--window and --clusters are the largest sizes fit_clustered tries (defaults 128 and 64); a causal
    site without given centres gets zeros of that count so that it is planned (its fitter replaces them
    with centres fitted on the recorded keys)."""
    window = fit_clustered.DEFAULT_WINDOW_CAP if options.window is None or options.window < 0 else options.window
    clusters = options.num_clusters or fit_clustered.DEFAULT_CLUSTER_CAP
    given = dict(options.centroids or {})
    for site in sites:
        key = centroids_key(site)
        if site.mask.causal and key not in given:
            given[key] = np.zeros((site.num_kv_heads, clusters, site.head_dim), np.float32)
    return replace(options, window=window, num_clusters=clusters, centroids=given)


def _final_plan(plan: Plan, fits: dict[int, SiteFit]) -> Plan:
    sites = [SitePlan(p.site, fits[p.site.index].replacement) if p.site.index in fits else p for p in plan.sites]
    return Plan(method=plan.method, options=plan.options, sites=sites)


def _converted(model, plan: Plan, fits: dict[int, SiteFit]):
    """A copy of `model` with the sites fitted so far replaced (the rest as in the original)."""
    partial = Plan(method=plan.method, options=plan.options,
                   sites=[SitePlan(p.site, fits[p.site.index].replacement) if p.site.index in fits
                          else SitePlan(p.site, None, "not fitted yet") for p in plan.sites])
    return rewrite.apply(copy_model(model), partial)


def _in_dtype(replacement: Replacement, dtype: str) -> Replacement:
    """Fitted initializers in the site's element type (float16 models get float16 maps)."""
    if replacement.output_map is None:
        return replacement
    weight, bias = replacement.output_map
    return replace(replacement, output_map=(weight.astype(np.dtype(dtype)), bias.astype(np.dtype(dtype))))


def recorded_calibration(model) -> dict | None:
    text = model.metadata_props.get(METADATA_CALIBRATION)
    return json.loads(text) if text else None
