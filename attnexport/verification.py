"""verify: run the original, the converted model with the kernels, and the converted model with the
reference functions only (no library), and compare every graph output and every replaced site.

Two questions, two thresholds:
- do the kernels compute what the op's definition says? kernel vs function must agree to round-off
  (relative error below ROUNDOFF of the dtype) — always checked;
- how far is the approximation from the original? kernel vs original must stay within the user's
  tolerance (exact conversions: within round-off; approximate ones: only when --tolerance is given).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from attnexport import inputs, model_io
from attnexport.errors import AttnExportError, VerificationError
from attnexport.probe import model_with_outputs
from attnexport.match import PREPARED, prepare
from attnexport.rewrite import recorded_plan
from attnexport.runtime import create_session, external_data_dir

# Relative (to the reference's largest magnitude) agreement expected between two float computations of
# the same definition in a different order, per dtype; graph outputs go through many layers, so they
# get the looser bound.
ROUNDOFF = {"float32": {"site": 1e-4, "output": 1e-3}, "float16": {"site": 1e-2, "output": 3e-2}}


@dataclass
class Comparison:
    name: str
    kind: str  # "output" or "site"
    shape: list[int]
    kernel_vs_function: dict[str, float]
    kernel_vs_original: dict[str, float]
    function_vs_original: dict[str, float]
    passed: bool = True
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    original: str
    converted: str
    method: str
    exact: bool
    tolerance: float | None
    feeds: dict[str, list[int]]
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_json(self) -> str:
        out = asdict(self)
        out["passed"] = self.passed
        return json.dumps(out, indent=2)


def metrics(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(other, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "rel": float("inf"), "cosine": float("nan")}
    if a.size == 0:
        return {"max_abs": 0.0, "rel": 0.0, "cosine": 1.0}
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        mismatch = np.isfinite(a) != np.isfinite(b)
        if mismatch.any():
            return {"max_abs": float("inf"), "rel": float("inf"), "cosine": float("nan")}
        a, b = a[finite], b[finite]
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a, b) / norm) if norm > 0 else (1.0 if diff == 0 else 0.0)
    return {"max_abs": diff, "rel": diff / scale if scale > 0 else diff, "cosine": cosine}


def load_feeds(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise AttnExportError(f"--inputs {path}: not a readable .npz file ({e})") from None


def verify(original: str | Path, converted: str | Path, *, feeds: dict[str, np.ndarray] | None = None,
           seq_len: int | None = None, batch: int = 2, tolerance: float | None = None,
           threads: int | None = None, providers=None) -> VerifyReport:
    original_model = model_io.load(original)
    converted_model = model_io.load(converted)
    if converted_model.metadata_props.get(PREPARED):
        prepare(original_model)  # e.g. inline functions as convert did, so site names exist in both
    plan = recorded_plan(converted_model)
    if plan is None:
        raise AttnExportError(f"{converted}: not converted by attnexport (no plan in its metadata)")
    from attnexport.verify_recurrent import is_recurrent, verify_recurrent

    if is_recurrent(converted_model):  # its cache is a state: compare token by token
        if feeds is not None:
            raise AttnExportError("--inputs is not supported for recurrent models yet (synthesised tokens are used)")
        return verify_recurrent(original_model, converted_model, plan, (str(original), str(converted)),
                                seq_len=seq_len, batch=batch, tolerance=tolerance, threads=threads, providers=providers)
    _check_same_signature(original_model, converted_model, original, converted)
    if feeds is None:
        shape = inputs.ProbeShape(batch=batch, seq_len=seq_len or 16)
        feeds = inputs.synthesize(original_model, shape)
    else:
        known = {s.name for s in inputs.signature(original_model)}
        missing = known - set(feeds)
        if missing:
            raise AttnExportError(f"--inputs lacks {', '.join(sorted(missing))}")
    output_names = [v.name for v in original_model.graph.outputs]
    site_names = [s["output"] for s in plan["sites"] if s.get("action") == "replace" and s.get("output")]
    names = output_names + [n for n in site_names if n not in output_names]

    reference = _run(original_model, names, feeds, with_library=False, threads=threads, providers=providers)
    with_kernels = _run(converted_model, names, feeds, with_library=True, threads=threads, providers=providers)
    with_functions = _run(converted_model, names, feeds, with_library=False, threads=threads, providers=None)

    exact = all(s.get("exact", False) for s in plan["sites"] if s.get("action") == "replace")
    comparisons = []
    for name in names:
        kind = "output" if name in output_names else "site"
        dtype = "float16" if np.asarray(reference[name]).dtype == np.float16 else "float32"
        roundoff = ROUNDOFF[dtype][kind]
        c = Comparison(
            name=name, kind=kind, shape=list(np.shape(reference[name])),
            kernel_vs_function=metrics(with_functions[name], with_kernels[name]),
            kernel_vs_original=metrics(reference[name], with_kernels[name]),
            function_vs_original=metrics(reference[name], with_functions[name]),
        )
        if not c.kernel_vs_function["rel"] <= roundoff:
            c.problems.append(f"kernel and function disagree (rel {c.kernel_vs_function['rel']:.2e} > {roundoff:g})")
        limit = roundoff if exact else tolerance
        if limit is not None and kind == "output" and not c.kernel_vs_original["rel"] <= limit:
            c.problems.append(f"converted differs from original (rel {c.kernel_vs_original['rel']:.2e} > {limit:g})")
        c.passed = not c.problems
        comparisons.append(c)
    return VerifyReport(original=str(original), converted=str(converted), method=plan.get("method", "?"),
                        exact=exact, tolerance=tolerance, feeds={k: list(v.shape) for k, v in feeds.items()},
                        comparisons=comparisons)


def _run(model: ir.Model, names: list[str], feeds, *, with_library: bool, threads, providers) -> dict[str, np.ndarray]:
    proto: onnx.ModelProto = model_with_outputs(model, names)
    session = create_session(proto, with_library=with_library, threads=threads, providers=providers,
                             base_dir=external_data_dir(model))
    accepted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in accepted})
    return dict(zip(names, values))


def _check_same_signature(a: ir.Model, b: ir.Model, a_path, b_path) -> None:
    def sig(values):
        return [(v.name, v.dtype) for v in values]

    if sig(a.graph.inputs) != sig(b.graph.inputs) or [v.name for v in a.graph.outputs] != [v.name for v in b.graph.outputs]:
        raise AttnExportError(f"{b_path} does not have the inputs and outputs of {a_path}; was it converted from it?")


def raise_if_failed(report: VerifyReport) -> None:
    if not report.passed:
        first = next(p for c in report.comparisons for p in c.problems)
        raise VerificationError(f"verification failed: {first}")
