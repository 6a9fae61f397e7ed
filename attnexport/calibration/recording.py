"""Recording: run a model on the calibration batches with every site's Q, K, V ([B, H, S, D]), key
padding flags and attention output exposed as extra graph outputs (on a copy; the model passed in is
never changed), and keep them on disk, one file per (batch, site), so memory stays bounded by one batch.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from attnexport.errors import AttnExportError
from attnexport.probe import model_with_outputs
# The rewriter's own helpers bring Q, K, V to [B, H, S, D] exactly as the replacement op will read them.
from attnexport.rewrite import _Graph, _key_padding_from_lengths, _project, _to_bhsd
from attnexport.runtime import create_session, external_data_dir
from attnexport.sites import AttentionSite


@dataclass
class SiteBatch:
    """One batch of one site: what the op sees and what the original attention produced."""

    q: np.ndarray  # [B, Hq, Sq, Dk]
    k: np.ndarray  # [B, Hkv, Skv, Dk]
    v: np.ndarray  # [B, Hkv, Skv, Dv]
    y: np.ndarray  # [B, Hq, Sq, Dv] target (the original model's attention output)
    key_padding_mask: np.ndarray | None  # [B, Skv] bool

    @property
    def query_rows(self) -> np.ndarray:
        """[B, Sq] bool: rows that count in the error (padded query positions of a self-attention do not:
        nothing downstream reads them)."""
        b, _, sq, _ = self.q.shape
        if self.key_padding_mask is not None and self.key_padding_mask.shape[1] == sq:
            return self.key_padding_mask.astype(bool)
        return np.ones((b, sq), dtype=bool)


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (external tensors keep pointing at their files)."""
    proto = ir.serde.serialize_model(model)
    copy = ir.serde.deserialize_model(proto)
    base = external_data_dir(model)
    if base:
        ir.external_data.set_base_dir(copy.graph, base)
    copy.metadata_props.update(model.metadata_props)
    return copy


class _ExposingGraph(_Graph):
    """The rewriter's graph helper, naming what it adds apart from a converted model's own nodes."""

    def fresh(self, stem: str) -> str:
        return super().fresh(f"calibration/{stem}")


def _exposed(model: ir.Model, sites: list[AttentionSite]) -> tuple[ir.Model, dict[int, dict[str, str]]]:
    """A copy of `model` with nodes computing each site's Q, K, V in [B, H, S, D] form and its key padding
    flags; returns it with, per site index, the names of those values and of the site's output."""
    copy = copy_model(model)
    g = _ExposingGraph(copy)
    names: dict[int, dict[str, str]] = {}
    added = []
    for site in sites:
        stem = f"calibration{site.index}"
        sources = [None, None, None]
        if site.projection is not None:
            sources, nodes = _project(g, site.projection, stem)
            added += nodes
        entry = {"y": site.output}
        for key, operand, source in zip("qkv", (site.q, site.k, site.v), sources):
            value, nodes = _to_bhsd(g, operand, f"{stem}_{key}", source)
            added += nodes
            entry[key] = value.name
        if site.mask.key_padding_input:
            if site.mask.key_padding_kind == "end_positions":
                flags, nodes = _key_padding_from_lengths(g, site.mask.key_padding_input, g.value(entry["k"]), stem,
                                                         site.mask.key_padding_offset)
            else:
                flags, nodes = g.key_padding_flags(site.mask.key_padding_input)
            added += nodes
            entry["mask"] = flags.name
        names[site.index] = entry
    for node in added:
        copy.graph.append(node)
    TopologicalSortPass()(copy)
    return copy, names


def _to_bhsd_array(y: np.ndarray, site: AttentionSite) -> np.ndarray:
    if site.output_layout == "bhsd":
        return y
    if site.output_layout == "bsd":
        b, s, _ = y.shape
        return y.reshape(b, s, site.num_heads, -1).transpose(0, 2, 1, 3)
    if site.output_layout == "bh_merged":
        return y.reshape(-1, site.num_heads, *y.shape[1:])
    raise AttnExportError(f"internal error: unknown output layout {site.output_layout!r}")


class Recording:
    """Site values of every calibration batch, on disk under a temporary directory (removed by close())."""

    def __init__(self, sites: list[AttentionSite], root: str | Path | None = None):
        self.sites = {s.index: s for s in sites}
        self._dir = Path(tempfile.mkdtemp(prefix="attnexport-calibration-", dir=root))
        self.batches = 0

    def record(self, model: ir.Model, batches: list[dict[str, np.ndarray]], *, site_indices: list[int] | None = None,
               targets: bool = True, with_library: bool = False, threads: int | None = None) -> None:
        """Run `model` (the original, or one with some sites already replaced) on every batch and store
        the chosen sites' Q, K, V, flags, and (targets=True) outputs. Sites whose Q, K, V were recorded
        before are overwritten; targets=False keeps the recorded outputs (those of the original)."""
        chosen = [self.sites[i] for i in (site_indices if site_indices is not None else self.sites)]
        exposed, names = _exposed(model, chosen)
        wanted = [n for s in chosen for key, n in names[s.index].items() if targets or key != "y"]
        proto = model_with_outputs(exposed, wanted)
        try:
            session = create_session(proto, with_library=with_library, threads=threads,
                                     base_dir=external_data_dir(model), quiet=True)
        except Exception as e:
            raise AttnExportError(f"the model with its attention exposed does not load: {_first_line(e)}") from None
        accepted = {i.name for i in session.get_inputs()}
        for b, feeds in enumerate(batches):
            try:
                values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in accepted})))
            except Exception as e:
                raise AttnExportError(f"running the model on calibration batch {b} failed: {_first_line(e)}") from None
            for site in chosen:
                entry = names[site.index]
                arrays = {key: values[name] for key, name in entry.items() if name in values}
                if "y" in arrays:
                    arrays["y"] = _to_bhsd_array(arrays["y"], site)
                if "mask" in arrays:
                    arrays["mask"] = arrays["mask"].astype(bool)
                for key, array in arrays.items():
                    np.save(self._path(b, site.index, key), np.ascontiguousarray(array))
        self.batches = max(self.batches, len(batches))

    def _path(self, batch: int, site: int, key: str) -> Path:
        return self._dir / f"b{batch:05d}_s{site:04d}_{key}.npy"

    def load(self, site: int, batch: int) -> SiteBatch:
        def get(key):
            path = self._path(batch, site, key)
            return np.load(path) if path.exists() else None

        return SiteBatch(get("q"), get("k"), get("v"), get("y"), get("mask"))

    def iterate(self, site: int, batches: list[int]) -> Iterator[SiteBatch]:
        for b in batches:
            yield self.load(site, b)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
