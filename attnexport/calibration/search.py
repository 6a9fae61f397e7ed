"""Measuring candidates: the relative output error of a replacement on recorded batches of one site,
and choosing among candidates by it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from attnexport.calibration.op_runner import OpRunner
from attnexport.calibration.recording import Recording, SiteBatch
from attnexport.methods import Replacement


def squared_error(y_hat: np.ndarray, batch: SiteBatch) -> tuple[float, float]:
    """(Σ |ŷ - y|², Σ |y|²) over the query rows that count."""
    rows = batch.query_rows[:, None, :, None]
    diff = np.where(rows, y_hat.astype(np.float64) - batch.y, 0.0)
    ref = np.where(rows, batch.y.astype(np.float64), 0.0)
    return float(np.sum(diff * diff)), float(np.sum(ref * ref))


def output_error(replacement: Replacement, recording: Recording, site: int, batches: Iterable[int], *,
                 threads: int | None = None) -> float:
    """‖ŷ − y‖ / ‖y‖ (Frobenius, over the rows that count) of `replacement` on the recorded batches."""
    runner = None
    err = ref = 0.0
    for batch in recording.iterate(site, list(batches)):
        runner = runner or OpRunner(replacement, batch, threads=threads)
        e, r = squared_error(runner(batch), batch)
        err += e
        ref += r
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


@dataclass
class Scored:
    replacement: Replacement
    error: float
    label: dict  # what distinguishes this candidate (recorded in the metadata)


def score_all(candidates: list[tuple[dict, Replacement]], recording: Recording, site: int, batches: list[int], *,
              threads: int | None = None) -> list[Scored]:
    return [Scored(r, output_error(r, recording, site, batches, threads=threads), label) for label, r in candidates]


@dataclass
class Context:
    """What every fitter works from: the recording and how its batches are used."""

    recording: Recording
    fit_batches: list[int]  # fit parameters (least squares) on these
    search_batches: list[int]  # a few of the fit batches: grid searches score candidates here
    check_batches: list[int]  # held out from fitting: errors reported and maps kept or dropped here
    budget: float | None = None  # largest relative output error allowed (sparse windows, favor features)
    threads: int | None = None


@dataclass
class SiteFit:
    """A fitter's answer for one site: the calibrated replacement and what was chosen, with the error of
    the uncalibrated and the calibrated replacement on the check batches."""

    replacement: Replacement
    parameters: dict
    error_before: float
    error_after: float

    def summary(self) -> dict:
        return {"parameters": self.parameters, "error_uncalibrated": round(self.error_before, 6),
                "error_calibrated": round(self.error_after, 6)}


def with_attributes(replacement: Replacement, **attributes) -> Replacement:
    from dataclasses import replace

    return replace(replacement, attributes={**replacement.attributes, **attributes})


# Logit temperatures tried (multipliers of the site's scale): a geometric grid, 1/4 .. 16 in steps of √2,
# then the best one's neighbours at 2^±1/4.
TEMPERATURES = tuple(2.0 ** (k / 2) for k in range(-4, 9))


def best_temperature(replacement: Replacement, site_scale: float, ctx: Context, site: int,
                     temperatures=TEMPERATURES) -> tuple[Replacement, float, float]:
    """(replacement with the best scale, its multiplier, its search error)."""
    def score(ts):
        return score_all([({"t": t}, with_attributes(replacement, scale=float(site_scale * t))) for t in ts],
                         ctx.recording, site, ctx.search_batches, threads=ctx.threads)

    coarse = min(score(temperatures), key=lambda s: s.error)
    t = coarse.label["t"]
    top = min([coarse, *score([t * 2 ** -0.25, t * 2 ** 0.25])], key=lambda s: s.error)
    return top.replacement, round(top.label["t"], 4), top.error
