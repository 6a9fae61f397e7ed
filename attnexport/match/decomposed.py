"""Decomposed attention (MatMul-Softmax-MatMul, any exporter) → AttentionSite.

Structure comes from the core pattern (core.py) and the upstream chains of its operands (layout.py);
the probe run confirms which chain values are Q, K and V and with which scale, and the mask is
classified by evaluation (masks.py).
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx_ir as ir

from attnexport.match import layout
from attnexport.match.constants import data_dependent, scalar
from attnexport.match.core import CoreMatch, find_cores
from attnexport.match.masks import MaskProbe, classify
from attnexport.match.probing import ProbeRun
from attnexport.sites import AttentionSite, Operand


class DecomposedCandidate:
    source = "decomposed"

    def __init__(self, core: CoreMatch, graph_inputs=()):
        self.core = core
        self._heads = 0  # query heads, once resolved (3-D [B*H, S, S] scores need them)
        self.graph_inputs = list(graph_inputs)
        self.q_chain = layout.upstream_chain(core.query)
        self.k_chain = layout.upstream_chain(core.key)
        self.v_chain = layout.upstream_chain(core.value)

    @property
    def anchor(self) -> ir.Node:
        return self.core.softmax

    def values_needed(self) -> list[str]:
        c = self.core
        names = [link.value.name for chain in (self.q_chain, self.k_chain, self.v_chain) for link in chain]
        names += [c.raw_scores.name, c.logits.name, c.output.name, c.key.name]
        if c.mask is not None:
            names.append(c.mask.name)
        if c.qk_scale is not None:
            names.append(c.qk_scale.name)
        return names

    def mask_values(self) -> list[str]:
        return [self.core.mask.name] if self.core.mask is not None else []

    def structural_problem(self) -> str | None:
        return self.core.problem or None

    def unprobed_site(self, index: int) -> AttentionSite:
        c = self.core
        return AttentionSite(index=index, name=site_name(c.nodes), source=self.source,
                             q=Operand(c.query.name), k=Operand(c.key.name), v=Operand(c.value.name),
                             output=c.output.name, nodes=[n.name for n in c.nodes])

    def build_site(self, index: int, base: list[ProbeRun], padded: list[ProbeRun]) -> AttentionSite:
        c = self.core
        site = self.unprobed_site(index)
        if c.problem:
            return _unresolved(site, c.problem)
        run = base[0].values
        raw = run[c.raw_scores.name]
        query, key_t, value = run[c.query.name], run[c.key.name], run[c.value.name]
        rtol = 1e-3 if raw.dtype == np.float16 else 1e-5
        if raw.ndim == 4:
            batch, num_heads, q_len, kv_len = raw.shape
            q = layout.resolve(self.q_chain, run, query, expected={"B": batch, "S": q_len, "D": query.shape[-1]},
                               transposed=False, grouped=False, num_q_heads=num_heads, rtol=rtol)
        elif raw.ndim == 3:
            # [B*H, Sq, Skv]: batch and heads are known once Q is traced to a 4-D tensor
            q_len, kv_len = raw.shape[1:]
            q = layout.resolve(self.q_chain, run, query, expected={"B": None, "S": q_len, "D": query.shape[-1]},
                               transposed=False, grouped=False, num_q_heads=None, rtol=rtol)
            if q is not None:
                batch, num_heads = q.bhsd.shape[:2]
                if batch * num_heads != raw.shape[0]:
                    q = None
        else:
            return _unresolved(site, f"attention scores are {raw.ndim}-D")
        if q is None:
            return _unresolved(site, "could not trace Q back to a [B, H, S, D] tensor")
        k = layout.resolve(self.k_chain, run, key_t, expected={"B": batch, "S": kv_len, "D": q.bhsd.shape[-1]},
                           transposed=c.key_transposed, grouped=True, num_q_heads=num_heads, rtol=rtol)
        if k is None:
            return _unresolved(site, "could not trace K back to a [B, Hkv, S, D] tensor (with h -> h // group)")
        v = layout.resolve(self.v_chain, run, value, expected={"B": batch, "S": kv_len, "D": None},
                           transposed=False, grouped=True, num_q_heads=num_heads, rtol=rtol)
        if v is None:
            return _unresolved(site, "could not trace V back to a [B, Hkv, S, Dv] tensor (with h -> h // group)")
        if abs(v.alpha - 1.0) > 1e-3:
            return _unresolved(site, f"V is scaled by {v.alpha:g} before the product")
        if k.bhsd.shape[1] != v.bhsd.shape[1]:
            return _unresolved(site, "K and V have different numbers of heads")

        post = self._post_scale(run)
        if post is None:
            return _unresolved(site, "the logits are scaled by a non-scalar value")
        if self._scale_from_data():
            return _unresolved(site, "the scale is read from an input tensor, not a constant")
        numeric_scale = q.alpha * k.alpha * post * c.product_alpha
        static = self._static_scale(q, k)
        head_dim = q.bhsd.shape[-1]
        scale = _choose_scale(static, numeric_scale, head_dim)
        if scale is None:
            return _unresolved(site, f"the scale is not constant (numerically {numeric_scale:g})")

        site.q = Operand(q.link.value.name, None if q.perm == (0, 1, 2, 3) else q.perm)
        site.k = Operand(k.link.value.name, None if k.perm == (0, 1, 2, 3) else k.perm)
        site.v = Operand(v.link.value.name, None if v.perm == (0, 1, 2, 3) else v.perm)
        site.num_heads = num_heads
        self._heads = num_heads
        site.num_kv_heads = k.bhsd.shape[1]
        site.head_dim = head_dim
        site.v_head_dim = v.bhsd.shape[-1]
        site.scale = scale
        site.dtype = str(np.dtype(query.dtype))
        site.probe_shape = (q_len, kv_len)
        site.nodes = _covered_nodes(c, (q, k, v))
        out = run[c.output.name]
        site.output_layout = "bhsd" if out.ndim == 4 else "bh_merged"

        # Every probe must agree with the same resolution (guards against coincidences at one shape).
        for other in base[1:]:
            problem = self._recheck(other.values, site, q, k, v)
            if problem:
                return _unresolved(site, problem)
        problem = self._check_logits(run, q.bhsd, k.bhsd, scale, num_heads)
        if problem:
            return _unresolved(site, problem)

        shape_of = {id(r): self._logit_shape(r.values) for r in base + padded}
        site.mask = classify(
            [MaskProbe(r.values.get(c.mask.name) if c.mask is not None else None, shape_of[id(r)]) for r in base],
            [MaskProbe(r.values.get(c.mask.name) if c.mask is not None else None, shape_of[id(r)],
                       r.padded_input, r.feeds[r.padded_input]) for r in padded if shape_of[id(r)] is not None],
            mask_name=c.mask.name if c.mask is not None else None,
            long=base[0].long_masks.get(c.mask.name) if c.mask is not None else None,
        )
        return site

    # -- helpers -----------------------------------------------------------------------------------------

    def _scale_from_data(self) -> bool:
        """Is any scalar factor on the Q, K or score path read from graph input data?"""
        inputs = {v.name for v in self.graph_inputs}
        factors = [self.core.qk_scale] if self.core.qk_scale is not None else []
        for chain in (self.q_chain, self.k_chain):
            for link in chain[1:]:
                for node in link.nodes[-1:]:
                    if node.op_type in ("Mul", "Div"):
                        factors += [x for x in node.inputs if x is not None and x is not link.value]
        return any(data_dependent(f, inputs) for f in factors)

    def _post_scale(self, run: dict[str, np.ndarray]) -> float | None:
        c = self.core
        if c.qk_scale is None:
            return 1.0
        value = run.get(c.qk_scale.name)
        if value is None or np.asarray(value).size != 1:
            return None
        factor = float(np.asarray(value).reshape(()))
        if c.qk_scaling == "Div":
            return 1.0 / factor if factor else None
        return factor

    def _static_scale(self, q: layout.Resolved, k: layout.Resolved) -> float | None:
        c = self.core
        post = 1.0
        if c.qk_scale is not None:
            factor = scalar(c.qk_scale)
            if factor is None or factor == 0.0:
                return None
            post = 1.0 / factor if c.qk_scaling == "Div" else factor
        if q.link.scale is None or k.link.scale is None:
            return None
        return q.link.scale * k.link.scale * post * c.product_alpha

    def _logit_shape(self, values: dict[str, np.ndarray]) -> tuple[int, int, int, int] | None:
        raw = values.get(self.core.raw_scores.name)
        if raw is None:
            return None
        if raw.ndim == 4:
            return tuple(int(d) for d in raw.shape)
        if raw.ndim == 3 and self._heads:
            return (raw.shape[0] // self._heads, self._heads, raw.shape[1], raw.shape[2])
        return None

    def _recheck(self, run, site, q, k, v) -> str | None:
        c = self.core
        for resolved, operand, transposed in ((q, c.query, False), (k, c.key, c.key_transposed), (v, c.value, False)):
            array = run.get(resolved.link.value.name)
            target = run.get(operand.name)
            if array is None or target is None or array.ndim != 4:
                return "the traced Q/K/V differ at another probe length"
            view = np.transpose(array, resolved.perm)
            group = site.num_heads // view.shape[1] if view.shape[1] else 0
            if group == 0 or site.num_heads % view.shape[1]:
                return "head counts change between probe lengths"
            full = np.repeat(view, group, axis=1) if group > 1 else view
            if transposed:
                full = np.swapaxes(full, -1, -2)
            if full.size != target.size:
                return "the traced Q/K/V differ at another probe length"
            err = np.max(np.abs(target.astype(np.float64).reshape(full.shape) - resolved.alpha * full.astype(np.float64)))
            if err > 1e-3 * max(float(np.max(np.abs(target))), 1e-30):
                return "the traced Q/K/V differ at another probe length"
        return None

    def _check_logits(self, run, q_bhsd, k_bhsd, scale, num_heads) -> str | None:
        """Softmax input == scale * Q Kᵀ + mask, on the probe."""
        c = self.core
        logits = run[c.logits.name].astype(np.float64)
        if logits.ndim == 3 and logits.shape[0] == q_bhsd.shape[0] * num_heads:
            logits = logits.reshape(q_bhsd.shape[0], num_heads, *logits.shape[1:])
        if logits.ndim != 4:
            return None
        group = num_heads // k_bhsd.shape[1]
        kk = np.repeat(k_bhsd.astype(np.float64), group, axis=1)
        expected = scale * (q_bhsd.astype(np.float64) @ np.swapaxes(kk, -1, -2))
        if c.mask is not None:
            mask = np.asarray(run[c.mask.name])
            if mask.dtype == np.bool_:
                return "the mask added to the logits is boolean"
            mask = mask.astype(np.float64)
            if mask.ndim == 3 and mask.shape[0] == expected.shape[0] * expected.shape[1]:
                mask = mask.reshape(expected.shape)
            expected = expected + np.broadcast_to(mask, expected.shape)
        finite = np.isfinite(expected) & np.isfinite(logits) & (expected > -1e4)
        if not finite.any():
            return None
        err = float(np.max(np.abs(logits[finite] - expected[finite])))
        magnitude = float(np.max(np.abs(expected[finite])))
        tol = (1e-2 if logits.dtype == np.float16 or run[c.query.name].dtype == np.float16 else 1e-4) * max(magnitude, 1.0)
        if err > tol:
            return f"the logits are not scale * Q Kᵀ + mask on the probe (max error {err:.3g})"
        return None


def find_candidates(model: ir.Model) -> list[DecomposedCandidate]:
    return [DecomposedCandidate(core, model.graph.inputs) for core in find_cores(model)]


def _choose_scale(static: float | None, numeric: float, head_dim: int) -> float | None:
    default = 1.0 / math.sqrt(head_dim)
    if static is not None and math.isclose(static, numeric, rel_tol=1e-3):
        return float(np.float32(static))
    if math.isclose(numeric, default, rel_tol=1e-4):
        return float(np.float32(default))  # e.g. a scale computed from Shape at run time: fold it
    if static is None and numeric > 0:
        return float(np.float32(numeric))
    return None


def _covered_nodes(core: CoreMatch, resolved) -> list[str]:
    names = [n.name for n in core.nodes]
    for r in resolved:
        names += [n.name for n in r.link.nodes]
    return list(dict.fromkeys(names))


def site_name(nodes: list[ir.Node]) -> str:
    names = [n.name for n in nodes if n.name]
    if not names:
        return "attention"
    prefix = os.path.commonprefix(names)
    if "/" in prefix:
        prefix = prefix[: prefix.rfind("/")]
        if prefix:
            return prefix
    softmax = next((n.name for n in nodes if n.op_type == "Softmax"), names[0])
    return softmax


def _unresolved(site: AttentionSite, reason: str) -> AttentionSite:
    site.replaceable = False
    site.reason = reason
    return site
