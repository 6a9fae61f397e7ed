"""A per-head affine map on the op's output, fitted by least squares to the original attention output:
for each query head h, y ≈ ŷ W_h + b_h with ŷ the replacement's output [.., Dv] (W_h [Dv, Dv], b_h [Dv]).

Why on the output and not on the features: the output has Dv columns per head whatever the feature map
(favor and taylor2 have F = 2·Dk .. 1 + Dk + Dk² features), the map is two standard ops after the
replacement (MatMul, Add) that need no change to any kernel, and the fit is one small tall
least-squares problem per head. A map on the features would have to sit inside the normalised ratio
of LinearAttention (a change of the op), and its fit is not linear in the parameters.

The map is fitted as a correction of the identity, ridge-regularised towards it: minimise
‖[ŷ 1] D − (y − ŷ)‖² + λ‖D‖², a tall system [[ŷ 1]; √λ I] D = [y − ŷ; 0] per head, solved with all Dv
right-hand sides at once by the sketch-and-precondition solver (attnexport.linalg.sketch_solver).
"""

from __future__ import annotations

import numpy as np

from attnexport.calibration.op_runner import OpRunner
from attnexport.calibration.recording import Recording
from attnexport.linalg.sketch_solver import lstsq
from attnexport.methods import Replacement

# Relative ridge weight: λ = RIDGE · mean squared column norm of [ŷ 1] (scale-free).
RIDGE = 1e-3
MAX_ROWS = 32768  # rows per head used in the fit (a deterministic, evenly spread subset beyond that)


def collect_rows(replacement: Replacement, recording: Recording, site: int, batches: list[int], *,
                 threads: int | None = None, max_rows: int = MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(ŷ, y) per head as [Hq, N, Dv] float64, over the query rows that count."""
    runner = None
    outs, targets = [], []
    for batch in recording.iterate(site, batches):
        runner = runner or OpRunner(replacement, batch, threads=threads)
        y_hat = runner(batch)
        rows = batch.query_rows  # [B, Sq]
        # [B, H, Sq, Dv] -> [H, rows, Dv]
        outs.append(np.transpose(y_hat, (1, 0, 2, 3))[:, rows].astype(np.float64))
        targets.append(np.transpose(batch.y, (1, 0, 2, 3))[:, rows].astype(np.float64))
    y_hat, y = np.concatenate(outs, axis=1), np.concatenate(targets, axis=1)
    if y.shape[1] > max_rows:
        keep = np.linspace(0, y.shape[1] - 1, max_rows).round().astype(np.int64)
        y_hat, y = y_hat[:, keep], y[:, keep]
    return y_hat, y


def fit(y_hat: np.ndarray, y: np.ndarray, *, ridge: float = RIDGE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """W [Hq, Dv, Dv], b [Hq, 1, Dv] (float32) and solver statistics, from per-head rows [Hq, N, Dv]."""
    heads, n, dv = y_hat.shape
    weights = np.zeros((heads, dv, dv))
    biases = np.zeros((heads, 1, dv))
    iterations, worst_residual, converged = 0, 0.0, True
    for h in range(heads):
        a = np.concatenate([y_hat[h], np.ones((n, 1))], axis=1)  # [N, Dv+1]
        lam = ridge * float(np.mean(np.sum(a * a, axis=0)))
        tall = np.concatenate([a, np.sqrt(lam) * np.eye(dv + 1)], axis=0)
        residual = np.concatenate([y[h] - y_hat[h], np.zeros((dv + 1, dv))], axis=0)
        # All Dv columns share the matrix, hence the sketch and its preconditioner: one solve per head.
        correction, info = lstsq(tall, residual, seed=seed + h)
        iterations += int(info.iterations)
        worst_residual = max(worst_residual, float(np.max(info.residual)))
        converged &= bool(np.all(info.converged))
        weights[h] = np.eye(dv) + correction[:dv]
        biases[h, 0] = correction[dv]
    stats = {"rows": int(n), "solves": heads, "iterations": iterations, "converged": bool(converged)}
    return weights.astype(np.float32), biases.astype(np.float32), stats


def with_map(replacement: Replacement, weight: np.ndarray, bias: np.ndarray) -> Replacement:
    from dataclasses import replace

    return replace(replacement, output_map=(weight, bias))


def refine(replacement: Replacement, ctx, site: int) -> tuple[Replacement, dict]:
    """Fit the map on the fit batches; keep it only if it lowers the error on the check batches."""
    from attnexport.calibration.search import output_error

    y_hat, y = collect_rows(replacement, ctx.recording, site, ctx.fit_batches, threads=ctx.threads)
    weight, bias, stats = fit(y_hat, y)
    mapped = with_map(replacement, weight, bias)
    before = output_error(replacement, ctx.recording, site, ctx.check_batches, threads=ctx.threads)
    after = output_error(mapped, ctx.recording, site, ctx.check_batches, threads=ctx.threads)
    info = {"output_map": after < before, "map_check_error": round(after, 6), **{f"map_{k}": v for k, v in stats.items()}}
    return (mapped if after < before else replacement), info
