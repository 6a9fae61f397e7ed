"""The Python API: inspect, convert, verify, and an InferenceSession that registers the op library."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from attnexport import model_io, rewrite
from attnexport.errors import AttnExportError, NoAttentionError
from attnexport.library import library_path
from attnexport.match import find_sites
from attnexport.methods import MethodOptions
from attnexport.plan import Plan, make_plan
from attnexport.sites import AttentionSite
from attnexport.verification import VerifyReport, load_feeds, verify

__all__ = ["ConvertResult", "InferenceSession", "calibrate", "convert", "default_output_path", "inspect", "library_path",
           "load_feeds", "verify", "VerifyReport"]

Progress = Callable[[str], None]


def inspect(model_path: str | Path, *, feeds: dict[str, np.ndarray] | None = None) -> list[AttentionSite]:
    """Every attention site of the model, replaceable or not (with the reason)."""
    model = model_io.load(model_path)
    return find_sites(model, feeds)


@dataclass
class ConvertResult:
    input_path: str
    output_path: str | None  # None for a dry run
    plan: Plan
    sites: list[AttentionSite]

    @property
    def replaced(self) -> int:
        return len(self.plan.selected)


def default_output_path(input_path: str | Path, method: str) -> Path:
    path = Path(input_path)
    return path.with_name(f"{path.stem}.{method}.onnx")


def convert(model_path: str | Path, output_path: str | Path | None = None, *, method: str = "linear",
            options: MethodOptions | None = None, layers: str | None = None, min_seq_len: int | None = None,
            feeds: dict[str, np.ndarray] | None = None, dry_run: bool = False,
            progress: Progress | None = None, recurrent: bool = False) -> ConvertResult:
    """Replace the model's softmax attention by `method`; write the result atomically next to (never
    over) the input. Raises NoAttentionError (and writes nothing) when no site can be replaced.

    recurrent: the model is a decoder exported with its KV cache; every cached site reads a fixed-size
    state instead (inputs past_state.<l>, outputs present_state.<l>; see attnexport.recurrent)."""
    say = progress or (lambda _: None)
    suffix = f"{method}-recurrent" if recurrent else method
    output = Path(output_path) if output_path is not None else default_output_path(model_path, suffix)
    if not dry_run:
        output = model_io.check_output_path(model_path, output)
    say("loading the model")
    model = model_io.load(model_path)
    signature = _signature(model)
    say("finding attention (one probe run)")
    sites = find_sites(model, feeds)
    if not sites:
        raise NoAttentionError(f"{model_path}: no softmax attention found; nothing written")
    plan = make_plan(sites, method, options, layers=layers, min_seq_len=min_seq_len)
    if not plan.selected:
        reasons = "; ".join(sorted({f"{p.skip_reason}" for p in plan.sites}))
        raise NoAttentionError(f"{model_path}: none of the {len(sites)} attention sites can be replaced by "
                               f"'{method}' ({reasons}); nothing written")
    if dry_run:
        return ConvertResult(str(model_path), None, plan, sites)
    say(f"replacing {len(plan.selected)} of {len(sites)} sites")
    if recurrent:
        from attnexport import recurrent as recurrent_rewrite

        recurrent_rewrite.apply(model, plan)  # changes the signature by design: cache -> state
    else:
        rewrite.apply(model, plan)
    if not recurrent and _signature(model) != signature:
        raise AttnExportError("internal error: the rewrite changed the graph's inputs or outputs; nothing written")
    say("checking and writing")
    model_io.save_atomic(model, output, validate=lambda path: _check_model_file(path, model_path))
    return ConvertResult(str(model_path), str(output), plan, sites)


def calibrate(model_path: str | Path, output_path: str | Path | None = None, *, method: str = "linear",
              options: MethodOptions | None = None, data: str | Path | None = None, texts: str | Path | None = None,
              tokenizer: str | None = None, batch_size: int = 16, max_tokens: int = 256, layers: str | None = None,
              budget: float | None = None, sequential: bool = True, threads: int | None = None,
              progress: Progress | None = None, recurrent: bool = False):
    """Convert like convert(), with each site's replacement fitted to the original on calibration inputs:
    `data`, an .npz of arrays named like the graph's inputs (examples along axis 0), or `texts`, a file of
    one text per line (tokenized by `tokenizer`, or the one the model records). Returns a
    calibration.CalibrationResult; the fitted parameters are in the model's metadata
    (attnexport.calibration) and its plan (attnexport.plan). `recurrent`: as in convert(). See
    attnexport/calibration/."""
    from attnexport.calibration import calibrate as run_calibrate
    from attnexport.calibration import data as calibration_data
    from attnexport.errors import UnsupportedError

    if (data is None) == (texts is None):
        raise UnsupportedError("calibrate needs exactly one of --data calib.npz and --texts file.txt")
    if batch_size < 1:
        raise UnsupportedError(f"--batch-size {batch_size}: give at least 1")
    output = Path(output_path) if output_path is not None else default_output_path(model_path, f"{method}.calibrated")
    if data is not None:
        def load(model):
            return calibration_data.from_npz(model, data, batch_size)
    else:
        def load(model):
            return calibration_data.from_texts(model, model_path, texts, batch_size, tokenizer=tokenizer,
                                               max_tokens=max_tokens)
    return run_calibrate(model_path, output, load, method=method, options=options, layers=layers, budget=budget,
                         sequential=sequential, threads=threads, progress=progress, recurrent=recurrent)


def _signature(model: ir.Model):
    return ([(v.name, v.dtype, str(v.shape)) for v in model.graph.inputs],
            [(v.name, v.dtype) for v in model.graph.outputs])


def _check_model_file(path: str, input_path: str | Path) -> None:
    """What we write must pass the onnx checker (with shape inference) — unless the input already fails
    it (models with ORT-internal ops in the default domain, e.g. from ORT's optimizers); then it must
    at least load in ONNX Runtime, with and without the op library."""
    problem = _checker_problem(path)
    if problem is None:
        return
    if _checker_problem(str(input_path)) is None:
        raise AttnExportError(f"internal error: the converted model fails the onnx checker ({problem}); nothing written")
    from attnexport.runtime import create_session

    for with_library in (True, False):
        try:
            create_session(path, with_library=with_library, quiet=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise AttnExportError(f"internal error: the converted model does not load in ONNX Runtime ({first}); "
                                  "nothing written") from None


def _checker_problem(path: str) -> str | None:
    try:
        onnx.checker.check_model(path, full_check=True)
        return None
    except Exception as e:
        return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


class InferenceSession(ort.InferenceSession):
    """onnxruntime.InferenceSession with the attnexport op library registered.

    Without the library a converted model still runs (ORT inlines each op's reference function), but
    slowly; this registers the kernels for CPU (and CUDA when the library was built with it). Given no
    `sess_options`, a recurrent model (`convert --recurrent`) gets ORT's memory patterns off: its
    attention mask has a new length every call, and with them on the process grew by 130-375 MiB over
    2k tokens in three of five runs of benchmarks/decode_memory.py (under 10 MiB with them off).
    """

    def __init__(self, path_or_bytes, sess_options: ort.SessionOptions | None = None,
                 providers: Sequence[str] | None = None, **kwargs):
        options = sess_options or ort.SessionOptions()
        if sess_options is None and _is_recurrent(path_or_bytes):
            options.enable_mem_pattern = False
        options.register_custom_ops_library(library_path())
        from attnexport import gpu

        gpu.prepare(providers)  # CUDA: load the nvidia-* wheel libraries; say why it would fall back
        super().__init__(path_or_bytes, options, providers=list(providers or ["CPUExecutionProvider"]), **kwargs)


def _is_recurrent(path_or_bytes) -> bool:
    """Does the model (a path or serialized bytes) carry attnexport.recurrent metadata? False when it
    cannot be read here (ORT then reports the problem)."""
    from attnexport.recurrent import METADATA_RECURRENT

    try:
        model = (onnx.load_from_string(path_or_bytes) if isinstance(path_or_bytes, bytes)
                 else onnx.load(str(path_or_bytes), load_external_data=False))
    except Exception:
        return False
    return any(p.key == METADATA_RECURRENT for p in model.metadata_props)
