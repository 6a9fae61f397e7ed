"""Small Hugging Face transformers models in random configurations, exported to ONNX three ways.

Tests, examples and benchmarks build their subjects here at run time (nothing is downloaded):

    path = zoo.export("gpt2", "dynamo18", "/tmp/gpt2.onnx")

Exporters: "dynamo18" (torch.onnx.export(dynamo=True), opset 18 → decomposed attention), "dynamo23"
(opset 23 → ONNX Attention), "torchscript17" (dynamo=False, opset 17 → decomposed attention). Batch and
sequence dimensions are dynamic. Needs torch and transformers (the `export` extra).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

EXPORTERS = ("dynamo18", "dynamo23", "torchscript17")


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], object]  # -> transformers model in eval mode
    inputs: tuple[str, ...]  # "input_ids", "attention_mask", "pixel_values"
    num_layers: int
    causal: bool
    image_size: int = 0


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64))


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", _bert, ("input_ids", "attention_mask"), 2, causal=False),
    "gpt2": Architecture("gpt2", _gpt2, ("input_ids", "attention_mask"), 2, causal=True),
    "llama": Architecture("llama", _llama, ("input_ids", "attention_mask"), 2, causal=True),
    "vit": Architecture("vit", _vit, ("pixel_values",), 2, causal=False, image_size=32),
}


def _wrapper(model, arch: Architecture):
    import torch

    # Explicit parameters (not *args): both exporters, and dynamo's dynamic_shapes, match them by name.
    class TextModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            extra = {"use_cache": False} if arch.causal else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    class VisionModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).last_hidden_state

    return VisionModel() if arch.inputs == ("pixel_values",) else TextModel()


def example_inputs(arch: Architecture, batch: int = 2, seq_len: int = 16, *, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    if arch.inputs == ("pixel_values",):
        return (torch.randn(batch, 3, arch.image_size, arch.image_size, generator=generator),)
    ids = torch.randint(0, 100, (batch, seq_len), generator=generator)
    return ids, torch.ones(batch, seq_len, dtype=torch.long)


def export(name: str, exporter: str, path: str | os.PathLike, *, seed: int = 0, quiet: bool = True) -> str:
    """Export architecture `name` with `exporter` to `path`; returns the path."""
    import torch

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = _wrapper(arch.build().eval(), arch)
    args = example_inputs(arch, seed=seed)
    names = list(arch.inputs)
    path = str(path)
    with _quiet(quiet), torch.no_grad():
        if exporter == "torchscript17":
            dynamic_axes = {n: ({0: "batch", 1: "sequence"} if n != "pixel_values" else {0: "batch"}) for n in names}
            dynamic_axes["last_hidden_state"] = {0: "batch", 1: "sequence"} if arch.inputs[0] != "pixel_values" else {0: "batch"}
            torch.onnx.export(model, args, path, dynamo=False, opset_version=17, input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=dynamic_axes)
        else:
            from torch.export import Dim

            batch = Dim("batch", min=1, max=64)
            seq = Dim("sequence", min=2, max=120)
            shapes = {n: ({0: batch} if n == "pixel_values" else {0: batch, 1: seq}) for n in names}
            torch.onnx.export(model, args, path, dynamo=True, opset_version=int(exporter[-2:]), input_names=names,
                              output_names=["last_hidden_state"], dynamic_shapes=shapes)
    return path


@contextlib.contextmanager
def _quiet(enabled: bool):
    """The exporters print progress and warnings; keep test and demo output readable."""
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
