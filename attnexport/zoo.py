"""Small Hugging Face transformers models in random configurations, exported to ONNX three ways.

Tests, examples and benchmarks build their subjects here at run time (nothing is downloaded):

    path = zoo.export("gpt2", "dynamo18", "/tmp/gpt2.onnx")

Exporters: "dynamo18" (torch.onnx.export(dynamo=True), opset 18 → decomposed attention), "dynamo23"
(opset 23 → ONNX Attention), "torchscript17" (dynamo=False, opset 17 → decomposed attention). Batch and
sequence dimensions are dynamic. Needs torch and transformers (the `export` extra).

Each Architecture records its family (encoder, decoder, encoder-decoder, vision), how many attention
sites its graph holds (an encoder-decoder has encoder self + decoder self + decoder cross attention per
layer), and which exporters are known not to export it (with the exporter's error). Encoder-decoders
take input_ids, attention_mask and decoder_input_ids and return the decoder's last hidden state;
decoders run without a KV cache (use_cache=False).
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


ENCODER, DECODER, ENCODER_DECODER, VISION = "encoder", "decoder", "encoder-decoder", "vision"


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], object]  # -> transformers model in eval mode
    inputs: tuple[str, ...]  # "input_ids", "attention_mask", "pixel_values", "decoder_input_ids"
    num_layers: int  # attention layers (encoder-decoders: layers per stack)
    causal: bool  # decoder-only: pass use_cache=False
    image_size: int = 0
    family: str = ENCODER
    # Attention sites in the exported graph; None: one per layer (encoder-decoders: 3 per layer).
    sites: int | None = None
    # exporter -> why it cannot export this model (the exporter's own error, in one line).
    export_failures: tuple[tuple[str, str], ...] = ()
    note: str = ""  # what the model stresses (position bias, sliding window, ...)
    # Why attnexport does not (yet) find or replace this model's attention, as diagnosed; "" when it does.
    known_gap: str = ""

    @property
    def num_sites(self) -> int:
        if self.sites is not None:
            return self.sites
        return 3 * self.num_layers if self.family == ENCODER_DECODER else self.num_layers

    @property
    def exporters(self) -> tuple[str, ...]:
        """The exporters expected to export this model."""
        failing = dict(self.export_failures)
        return tuple(e for e in EXPORTERS if e not in failing)

    def export_failure(self, exporter: str) -> str | None:
        return dict(self.export_failures).get(exporter)


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


# -- more architectures (tests/test_architecture_matrix.py, scripts/architecture_matrix.py) ----------------
# Tiny on purpose: 2 layers, hidden 32-64, so that each export takes seconds.

def _roberta():
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=130, pad_token_id=1))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=128))


def _albert():
    from transformers import AlbertConfig, AlbertModel

    # One set of layer weights shared by both layers; embeddings narrower than the hidden size.
    return AlbertModel(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=128))


def _mistral():
    from transformers import MistralConfig, MistralModel

    # A sliding window (5 keys) shorter than the probe lengths, so that it shows; GQA 4:2.
    return MistralModel(MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _qwen2():
    from transformers import Qwen2Config, Qwen2Model

    # Biases on the Q/K/V projections, GQA 4:1 (multi-query), no sliding window.
    return Qwen2Model(Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                  use_sliding_window=False, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _opt():
    from transformers import OPTConfig, OPTModel

    return OPTModel(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128,
                              bos_token_id=0, eos_token_id=0, pad_token_id=1))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXModel

    # Rotary embedding on a quarter of each head (partial rotary), fused QKV projection.
    return GPTNeoXModel(GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25,
                                      bos_token_id=0, eos_token_id=0))


def _bloom():
    from transformers import BloomConfig, BloomModel

    # ALiBi: a per-head linear position bias added to the logits.
    return BloomModel(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _falcon():
    from transformers import FalconConfig, FalconModel

    # ALiBi folded into the additive mask SDPA receives; multi-query attention (one KV head).
    return FalconModel(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=True, multi_query=True, new_decoder_architecture=False,
                                    parallel_attn=True, bias=False, max_position_embeddings=128,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _t5():
    from transformers import T5Config, T5Model

    # Relative position bias (bucketed) in the self-attentions; unscaled logits (scale 1).
    return T5Model(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _bart():
    from transformers import BartConfig, BartModel

    return BartModel(BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))


def _swin():
    from transformers import SwinConfig, SwinModel

    # One stage of two blocks: 4x4 windows over 8x8 patches, the second block shifted (its windows'
    # mask is an additive -100 where tokens of different regions meet), a relative position bias in both.
    import torch

    model = SwinModel(SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2],
                                 num_heads=[4], window_size=4, mlp_ratio=2.0))
    # transformers initialises the bias tables to zeros, and a zero bias is no bias (probing would rightly
    # find none); trained models have non-zero tables, so draw them as the original Swin did.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                torch.nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
    return model


def _clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    # A causal text encoder (causal mask and key padding), quick_gelu.
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, bos_token_id=0,
                                        eos_token_id=2, pad_token_id=1))


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4))


# BLOOM computes attention on [B*H, S, S] (baddbmm / bmm) and views the logits as [B, H, S, S] only around
# the mask and the Softmax: MatMul -> Mul(1/sqrt(d)) -> Add(ALiBi) -> Reshape -> Add(mask) -> Softmax
# [-> Cast -> Cast] -> Reshape -> MatMul. match/core.py's pattern admits one optional Add between the scale
# and the Softmax, one optional Cast after it, and no Reshape on either side.
_BLOOM_GAP = ("no attention found: the core pattern (match/core.py) does not admit the Reshape [B*H,S,S]->[B,H,S,S] "
              "between the scaled scores and the mask Add, the Reshape back before the P·V MatMul, a second additive "
              "term (ALiBi, then the mask), or two Casts after the Softmax (TorchScript)")
# Falcon with ALiBi: transformers builds the ALiBi slopes in bfloat16 (`.bfloat16()`), and passes one KV head to
# SDPA (multi-query), relying on broadcasting.
_FALCON_EXPORT = (
    ("dynamo18", "the exported model does not run in ONNX Runtime: ALiBi is computed in bfloat16 and ORT's CPU "
                 "provider has no bfloat16 Mul (NOT_IMPLEMENTED: Mul(14))"),
    ("dynamo23", "torch.onnx fails: aten_scaled_dot_product_attention_23 asserts 'SDPA (MHA) requires q_num_heads = "
                 "kv_num_heads' (multi-query K/V with one head)"),
    ("torchscript17", "the exported model does not load in ONNX Runtime: the exporter writes Cast(to=15) for "
                      "`.bfloat16()` (15 is torch's ScalarType code of bfloat16, ONNX's complex128)"),
)

_TEXT = ("input_ids", "attention_mask")
_SEQ2SEQ = ("input_ids", "attention_mask", "decoder_input_ids")

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", _bert, _TEXT, 2, causal=False),
    "gpt2": Architecture("gpt2", _gpt2, _TEXT, 2, causal=True, family=DECODER),
    "llama": Architecture("llama", _llama, _TEXT, 2, causal=True, family=DECODER, note="GQA 8:2"),
    "vit": Architecture("vit", _vit, ("pixel_values",), 2, causal=False, image_size=32, family=VISION),
    "roberta": Architecture("roberta", _roberta, _TEXT, 2, causal=False),
    "distilbert": Architecture("distilbert", _distilbert, _TEXT, 2, causal=False),
    "albert": Architecture("albert", _albert, _TEXT, 2, causal=False, note="weights shared across layers"),
    "mistral": Architecture("mistral", _mistral, _TEXT, 2, causal=True, family=DECODER,
                            note="sliding window (4), GQA 4:2"),
    "qwen2": Architecture("qwen2", _qwen2, _TEXT, 2, causal=True, family=DECODER, note="QKV bias, GQA 4:1"),
    "opt": Architecture("opt", _opt, _TEXT, 2, causal=True, family=DECODER),
    "gpt_neox": Architecture("gpt_neox", _gpt_neox, _TEXT, 2, causal=True, family=DECODER,
                             note="partial rotary (25%)"),
    "bloom": Architecture("bloom", _bloom, _TEXT, 2, causal=True, family=DECODER, note="ALiBi position bias",
                          known_gap=_BLOOM_GAP),
    "falcon": Architecture("falcon", _falcon, _TEXT, 2, causal=True, family=DECODER,
                           note="ALiBi in the SDPA mask, multi-query", export_failures=_FALCON_EXPORT),
    "t5": Architecture("t5", _t5, _SEQ2SEQ, 2, causal=False, family=ENCODER_DECODER,
                       note="relative position bias, scale 1"),
    "bart": Architecture("bart", _bart, _SEQ2SEQ, 2, causal=False, family=ENCODER_DECODER),
    "swin": Architecture("swin", _swin, ("pixel_values",), 2, causal=False, image_size=32, family=VISION,
                         note="window attention, relative position bias, shifted windows"),
    "clip_text": Architecture("clip_text", _clip_text, _TEXT, 2, causal=False, note="causal text encoder"),
    "clip_vision": Architecture("clip_vision", _clip_vision, ("pixel_values",), 2, causal=False, image_size=32,
                                family=VISION),
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

    class Seq2SeqModel(torch.nn.Module):
        """Encoder and decoder in one graph: the decoder's last hidden state depends on every attention."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                              use_cache=False).last_hidden_state

    if arch.inputs == ("pixel_values",):
        return VisionModel()
    if arch.family == ENCODER_DECODER:
        return Seq2SeqModel()
    return TextModel()


DECODER_SEQ_LEN = 10  # example decoder length of encoder-decoders (differs from the encoder's: no shape coincidences)


def example_inputs(arch: Architecture, batch: int = 2, seq_len: int = 16, *, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    if arch.inputs == ("pixel_values",):
        return (torch.randn(batch, 3, arch.image_size, arch.image_size, generator=generator),)
    ids = torch.randint(0, 100, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if arch.family == ENCODER_DECODER:
        return ids, mask, torch.randint(0, 100, (batch, DECODER_SEQ_LEN), generator=generator)
    return ids, mask


def _dynamic_axes(name: str) -> dict[int, str]:
    if name == "pixel_values":
        return {0: "batch"}
    return {0: "batch", 1: "decoder_sequence" if name.startswith("decoder") else "sequence"}


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
    # The output's sequence axis is the decoder's for encoder-decoders; images have a fixed token count.
    output_axes = {0: "batch"} if names == ["pixel_values"] else _dynamic_axes(names[-1])
    path = str(path)
    with _quiet(quiet), torch.no_grad():
        if exporter == "torchscript17":
            dynamic_axes = {n: _dynamic_axes(n) for n in names}
            dynamic_axes["last_hidden_state"] = output_axes
            torch.onnx.export(model, args, path, dynamo=False, opset_version=17, input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=dynamic_axes)
        else:
            from torch.export import Dim

            dims = {"batch": Dim("batch", min=1, max=64), "sequence": Dim("sequence", min=2, max=120),
                    "decoder_sequence": Dim("decoder_sequence", min=2, max=120)}
            shapes = {n: {axis: dims[label] for axis, label in _dynamic_axes(n).items()} for n in names}
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
