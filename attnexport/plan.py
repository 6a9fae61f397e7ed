"""The plan: which site gets which replacement, decided before anything in the model changes.

The plan is data: it can be printed (`convert --dry-run`), it is recorded in the converted model's
metadata, and the rewriter follows it without further decisions.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from attnexport.errors import UnsupportedError
from attnexport.methods import MethodOptions, Replacement, get_method
from attnexport.sites import AttentionSite


@dataclass
class SitePlan:
    site: AttentionSite
    replacement: Replacement | None  # None: the site is left as it is
    skip_reason: str = ""

    @property
    def selected(self) -> bool:
        return self.replacement is not None

    def summary(self) -> dict[str, Any]:
        out = {"site": self.site.index, "name": self.site.name, "source": self.site.source,
               "mask": self.site.mask.describe(), "output": self.site.output}
        if self.replacement is None:
            out["action"] = "keep"
            out["reason"] = self.skip_reason
        else:
            out["action"] = "replace"
            out["op"] = self.replacement.op.name
            out["attributes"] = {k: _jsonable(v) for k, v in self.replacement.attributes.items()}
            out["extra_inputs"] = {k: list(v.shape) for k, v in self.replacement.extra_inputs.items()}
            out["exact"] = self.replacement.exact
            if self.replacement.output_map is not None:
                out["output_map"] = list(self.replacement.output_map[0].shape)
        return out


@dataclass
class Plan:
    method: str
    options: MethodOptions
    sites: list[SitePlan] = field(default_factory=list)

    @property
    def selected(self) -> list[SitePlan]:
        return [s for s in self.sites if s.selected]

    @property
    def exact(self) -> bool:
        return all(s.replacement.exact for s in self.selected)

    def to_json(self) -> str:
        options = {k: _option_json(v) for k, v in asdict(self.options).items() if v is not None and not
                   (isinstance(v, (dict, str)) and not v)}
        return json.dumps({"method": self.method, "options": options, "sites": [s.summary() for s in self.sites]},
                          indent=None, separators=(",", ":"))


def _option_json(value: Any) -> Any:
    """Arrays among the options (clustered's --centroids) are recorded by shape, not by value."""
    if isinstance(value, np.ndarray):
        return {"shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: _option_json(v) for k, v in value.items()}
    return value


def parse_layers(spec: str | None, count: int) -> set[int] | None:
    """'0,2,5-7' -> {0, 2, 5, 6, 7}; None or 'all' -> every site."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise UnsupportedError(f"--layers: cannot read {part!r} (use e.g. 0,2,5-7)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else start
        if start < 0:
            start = end = count + start
        for i in range(start, end + 1):
            if not 0 <= i < count:
                raise UnsupportedError(f"--layers: site {i} does not exist (the model has {count} sites: 0-{count - 1})")
            chosen.add(i)
    return chosen


def make_plan(sites: list[AttentionSite], method: str, options: MethodOptions | None = None, *,
              layers: str | None = None, min_seq_len: int | None = None) -> Plan:
    options = options or MethodOptions()
    implementation = get_method(method)
    chosen = parse_layers(layers, len(sites))
    plan = Plan(method=method, options=options)
    for site in sites:
        reason = ""
        if chosen is not None and site.index not in chosen:
            reason = "not selected by --layers"
        elif not site.replaceable:
            reason = site.reason
        elif min_seq_len and site.extra.get("static_kv_len") and site.extra["static_kv_len"] < min_seq_len:
            reason = f"sequence length {site.extra['static_kv_len']} is below --min-seq-len {min_seq_len}"
        else:
            reason = implementation.unsupported(site) or implementation.skipped(site, options) or ""
        if reason:
            plan.sites.append(SitePlan(site, None, reason))
        else:
            plan.sites.append(SitePlan(site, implementation.replacement(site, options)))
    return plan


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
