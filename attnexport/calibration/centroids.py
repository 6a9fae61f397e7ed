"""Fixed key centres for ClusteredAttention, fitted on recorded keys: the op's deterministic k-means
(clustered_reference.kmeans: centre c starts at row floor(c·n/M), `iterations` Lloyd steps, ties to the
lowest index, an empty cluster keeps its centre) over the kept keys of the calibration batches, per kv
head. Distances as |μ|² − 2 x·μ by matrix products, so tens of thousands of keys cost little; more than
`max_rows` keys per head are thinned to an evenly spaced subset (in recording order)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from attnexport.errors import UnsupportedError

MAX_ROWS = 32768


def kmeans(points: np.ndarray, num_clusters: int, iterations: int) -> np.ndarray:
    """Centres [M, d] (float64) of the deterministic k-means of the rows of `points` [n, d]."""
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros((num_clusters, x.shape[1]))
    centres = x[[c * n // num_clusters for c in range(num_clusters)]].copy()
    for _ in range(iterations):
        assign = nearest(x, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=num_clusters)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre (|μ|² − 2 x·μ; argmin takes the first of equal minima)."""
    return np.argmin((centres * centres).sum(axis=1)[None, :] - 2.0 * x @ centres.T, axis=1)


def recorded_keys(recording, site: int, batches: list[int], max_rows: int = MAX_ROWS) -> list[np.ndarray]:
    """Per kv head, the kept keys [n, Dk] of `batches` (float64), thinned to at most max_rows."""
    per_head: list[list[np.ndarray]] | None = None
    for batch in recording.iterate(site, batches):
        k = np.asarray(batch.k, dtype=np.float64)  # [B, Hkv, S, Dk]
        keep = (np.ones((k.shape[0], k.shape[2]), bool) if batch.key_padding_mask is None
                else np.asarray(batch.key_padding_mask, bool))  # [B, S]
        per_head = per_head or [[] for _ in range(k.shape[1])]
        for h in range(k.shape[1]):
            per_head[h].append(k[:, h][keep])
    out = []
    for rows in per_head or []:
        x = np.concatenate(rows) if rows else np.zeros((0, 0))
        if len(x) > max_rows:
            x = x[np.linspace(0, len(x) - 1, max_rows).round().astype(int)]
        out.append(x)
    return out


def fit_centroids(recording, site: int, batches: list[int], num_clusters: int, iterations: int = 10,
                  max_rows: int = MAX_ROWS) -> np.ndarray:
    """[Hkv, M, Dk] float32 centres of the site's recorded keys."""
    keys = recorded_keys(recording, site, batches, max_rows)
    return np.stack([kmeans(x, num_clusters, iterations) for x in keys]).astype(np.float32)


def check_path(model_path: str | Path, path: str | Path) -> Path:
    """Where --save-centroids may write: an .npz name in an existing directory, not the model."""
    from attnexport import model_io

    if Path(path).suffix != ".npz":
        raise UnsupportedError(f"--save-centroids {path}: give a file name ending in .npz")
    return model_io.check_output_path(model_path, path)


def save_fitted(fits: dict, path: str | Path, model_path: str | Path) -> Path:
    """Write the fitted centres of every site that has them, as `convert --centroids` reads them (array
    site<i> [Hkv, M, Dk]), atomically; never over the model."""
    arrays = {f"site{i}": np.asarray(f.replacement.extra_inputs["centroids"], np.float32)
              for i, f in sorted(fits.items()) if "centroids" in f.replacement.extra_inputs}
    if not arrays:
        raise UnsupportedError("--save-centroids: no site has fitted centres (bidirectional sites kept the run-time "
                               "k-means); nothing written")
    target = check_path(model_path, path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


__all__ = ["MAX_ROWS", "fit_centroids", "kmeans", "nearest", "recorded_keys", "check_path", "save_fitted"]
