"""Decoders exported WITH their KV cache: the subjects of `convert --recurrent`.

    path = decoders.export("gpt2", "dynamo18", "/tmp/gpt2_kv.onnx")            # small random config
    path = decoders.export("gpt2", "dynamo18", "/tmp/g.onnx", size="small")    # GPT-2-small shape

The ONNX model takes `input_ids [B, S]`, `attention_mask [B, P + S]` and, per layer i,
`past_key_values.i.key` / `.value [B, Hkv, P, D]`; it returns `last_hidden_state [B, S, W]` (or
`logits [B, S, V]` with `lm_head=True`) and `present.i.key` / `.value [B, Hkv, P + S, D]` (the
past concatenated with the new keys and values). Exporters: "dynamo18" (torch.onnx.export with
dynamo=True, opset 18) and "torchscript17" (dynamo=False, opset 17). The cache goes in and out as
plain tensors: the wrapper builds a transformers DynamicCache from them and reads its layers back.
Weights are random (seeded); nothing is downloaded. Needs torch and transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from attnexport.zoo import _quiet

EXPORTERS = ("dynamo18", "torchscript17")
SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Decoder:
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int


def _build(name: str, size: str, max_positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "gpt2":
        if size == "small":  # GPT-2 small: 12 layers, width 768, 12 heads
            config = GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=max_positions)
        else:
            config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions,
                                bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        return model, Decoder("gpt2", config.n_layer, config.n_head, config.n_head, config.n_embd // config.n_head,
                              config.vocab_size)
    if name == "llama":
        if size == "small":
            config = LlamaConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=max_positions,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
        else:
            config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(config)
        return model, Decoder("llama", config.num_hidden_layers, config.num_attention_heads,
                              config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                              config.vocab_size)
    raise ValueError(f"unknown decoder {name!r}; known: gpt2, llama")


def describe(name: str, size: str = "tiny") -> Decoder:
    """The dimensions of a decoder without building its weights' export."""
    return _build(name, size, 128)[1]


def _wrapper(model, layers: int, lm_head: bool):
    import torch
    from transformers import DynamicCache

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            if lm_head:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                 use_cache=True)
                first = out.logits
            else:
                out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                            past_key_values=cache, use_cache=True)
                first = out.last_hidden_state
            result = [first]
            for layer in out.past_key_values.layers[:layers]:
                result += [layer.keys, layer.values]
            return tuple(result)

    return WithCache()


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                              for kv in ("key", "value")]


def output_names(layers: int, lm_head: bool = False) -> list[str]:
    return ["logits" if lm_head else "last_hidden_state"] + [f"present.{i}.{kv}" for i in range(layers)
                                                              for kv in ("key", "value")]


def export(name: str, exporter: str, path: str | os.PathLike, *, size: str = "tiny", lm_head: bool = False,
           max_positions: int = 128, seed: int = 0, quiet: bool = True) -> str:
    """Export decoder `name` ("gpt2" or "llama") with its KV cache; returns the path."""
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    torch.manual_seed(seed)
    model, spec = _build(name, size, max_positions)
    model = model.eval()
    wrapper = _wrapper(model, spec.num_layers, lm_head)
    batch, seq, past = 2, 3, 4
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    cache = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=generator)
             for _ in range(2 * spec.num_layers)]
    inputs, outputs = input_names(spec.num_layers), output_names(spec.num_layers, lm_head)
    path = str(path)
    with _quiet(quiet), torch.no_grad():
        if exporter == "torchscript17":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                    outputs[0]: {0: "batch", 1: "sequence"}}
            axes.update({n: {0: "batch", 2: "past_sequence"} for n in inputs[2:]})
            axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
            torch.onnx.export(wrapper, (ids, mask, *cache), path, dynamo=False, opset_version=17,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes)
        else:
            from torch.export import Dim

            b, p = Dim("batch", min=1, max=64), Dim("past_sequence", min=1, max=max_positions)
            shapes = {"input_ids": {0: b, 1: Dim("sequence", min=1, max=max_positions)},
                      "attention_mask": {0: b, 1: Dim("total_sequence", min=1, max=max_positions)},
                      "past": tuple({0: b, 2: p} for _ in range(2 * spec.num_layers))}
            torch.onnx.export(wrapper, (ids, mask, *cache), path, dynamo=True, opset_version=18,
                              input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                              external_data=size != "tiny")
    return path
