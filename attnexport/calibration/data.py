"""Calibration inputs: batches of graph feeds from an .npz file (arrays named like the graph's inputs,
batch along axis 0) or from a text file (one text per line, tokenized)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from attnexport import inputs as graph_inputs
from attnexport.errors import AttnExportError, UnsupportedError

# Metadata key naming the tokenizer a model was exported with (fidelity.export_minilm records it).
METADATA_TOKENIZER = "attnexport.tokenizer"


class CalibrationDataError(AttnExportError):
    """The calibration data does not fit the model (names, shapes, types) or is empty."""


@dataclass
class CalibrationData:
    """Feeds for the model, split into batches: `fit` batches for fitting, `check` batches to decide
    between candidates that could overfit (an output map is kept only if it helps there too)."""

    batches: list[dict[str, np.ndarray]]
    source: str  # what they came from, for the metadata
    count: int  # number of examples

    def split(self, every: int = 4) -> tuple[list[int], list[int]]:
        """(fit, check) batch indices: every `every`-th batch checks. Interleaved, because text batches are
        sorted by length: a tail split would check only on the longest texts."""
        n = len(self.batches)
        if n < 2:
            return [0], [0]
        check = [i for i in range(n) if i % every == every - 1] or [n - 1]
        return [i for i in range(n) if i not in check], check


def from_npz(model: ir.Model, path: str | os.PathLike, batch_size: int) -> CalibrationData:
    """Arrays named like the graph's inputs, all with the same leading (example) axis."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise CalibrationDataError(f"--data {path}: not a readable .npz file ({_first_line(e)})") from None
    specs = {s.name: s for s in graph_inputs.signature(model)}
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise CalibrationDataError(f"--data {path}: {', '.join(unknown)} is not an input of the model "
                                   f"(inputs: {', '.join(specs)})")
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise CalibrationDataError(f"--data {path}: lacks the model input(s) {', '.join(missing)}")
    counts = set()
    for name, array in arrays.items():
        spec = specs[name]
        if spec.shape and array.ndim != spec.rank:
            raise CalibrationDataError(f"--data {path}: {name} has shape {list(array.shape)}, the model expects rank "
                                       f"{spec.rank} {_shape_text(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise CalibrationDataError(f"--data {path}: {name} has {got} on axis {axis}, the model expects "
                                           f"{want} {_shape_text(spec.shape)}")
        if array.ndim == 0:
            raise CalibrationDataError(f"--data {path}: {name} is a scalar; give a batch of examples along axis 0")
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise CalibrationDataError(f"--data {path}: {name} is {array.dtype}, the model expects {spec.dtype}")
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise CalibrationDataError(f"--data {path}: the arrays disagree on the number of examples (axis 0: "
                                   f"{sorted(counts)})")
    count = counts.pop()
    if count == 0:
        raise CalibrationDataError(f"--data {path}: holds no examples (axis 0 has length 0)")
    batches = [{name: np.ascontiguousarray(a[start:start + batch_size]).astype(specs[name].dtype, copy=False)
                for name, a in arrays.items()} for start in range(0, count, batch_size)]
    return CalibrationData(batches, f"npz:{Path(path).name}", count)


def read_texts(path: str | os.PathLike) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CalibrationDataError(f"--texts {path}: not UTF-8 text") from None
    except OSError as e:
        raise CalibrationDataError(f"--texts {path}: cannot be read ({e.strerror})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise CalibrationDataError(f"--texts {path}: holds no text (one text per line)")
    return texts


def resolve_tokenizer(model: ir.Model, model_path: str | os.PathLike, name: str | None):
    """The tokenizer `name` (a directory or a name transformers knows locally), or the one the model
    records in its metadata; one clear error when there is none."""
    recorded = model.metadata_props.get(METADATA_TOKENIZER)
    chosen = name or recorded
    if not chosen:
        raise UnsupportedError(f"--texts needs a tokenizer and {model_path} records none; pass --tokenizer NAME_OR_DIR "
                               "(a tokenizer directory or a name in the local Hugging Face cache)")
    from attnexport import fidelity

    if chosen == fidelity.TOKENIZER_NAME:  # the bundled all-MiniLM-L6-v2
        chosen = str(fidelity.minilm_dir())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(chosen)
    except Exception as e:
        where = "given by --tokenizer" if name else f"recorded in {model_path}"
        raise UnsupportedError(f"tokenizer {chosen!r} ({where}) cannot be loaded: {_first_line(e)}") from None


def from_texts(model: ir.Model, model_path: str | os.PathLike, path: str | os.PathLike, batch_size: int, *,
               tokenizer: str | None = None, max_tokens: int = 256) -> CalibrationData:
    texts = read_texts(path)
    tok = resolve_tokenizer(model, model_path, tokenizer)
    specs = graph_inputs.signature(model)
    # Batches of similar length: less padding, and padding is what the fit should see least of.
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(texts), batch_size):
        chosen = [texts[i] for i in order[start:start + batch_size]]
        encoded = tok(chosen, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
        feeds = {}
        for spec in specs:
            if spec.name not in encoded:
                raise CalibrationDataError(f"--texts: the model input {spec.name!r} is not something the tokenizer "
                                           f"produces ({', '.join(encoded)}); use --data with an .npz instead")
            feeds[spec.name] = np.asarray(encoded[spec.name]).astype(spec.dtype)
        batches.append(feeds)
    return CalibrationData(batches, f"texts:{Path(path).name}", len(texts))




def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
