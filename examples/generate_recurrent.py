"""Greedy decoding with a KV-cache decoder converted to a fixed-state recurrent model.

    python examples/generate_recurrent.py                       # tiny random GPT-2, 300 tokens
    python examples/generate_recurrent.py --size small --tokens 2000   # GPT-2-small shape (random weights)
    python examples/generate_recurrent.py --model my_decoder_with_cache.onnx

Steps: export a transformers GPT-2 with its KV cache (random weights, nothing downloaded; or take
--model), `attnexport convert --method lse --recurrent`, then decode token by token with ONNX
Runtime: the prompt goes in one call, every later call feeds one new token, the attention mask over
everything so far, and the previous call's present_state.<l> as past_state.<l> (zeros at the
start). The state has the same size at every position, so the per-token latency stays flat; it is
printed at several positions, with tokens/s.

The weights are random, so the tokens are meaningless; the point is the loop a caller writes and
its cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnexport  # noqa: E402
from attnexport import api, decoders  # noqa: E402


class RecurrentDecoder:
    """One ONNX Runtime session on a recurrent model and the loop state a caller keeps."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # The attention mask grows by one every call: ORT's memory patterns, planned and kept per input
        # shape, would grow memory without bound (attnexport.InferenceSession does this when given no options).
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        self.session = attnexport.InferenceSession(path, options)
        self.state_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_state.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def start(self, batch: int) -> dict[str, np.ndarray]:
        """The empty state: zeros."""
        return {n: np.zeros([batch] + list(self.shapes[n][1:]), np.float32) for n in self.state_names}

    def step(self, tokens: np.ndarray, mask: np.ndarray, state: dict[str, np.ndarray]):
        """One call: new tokens [B, S], the mask over past + new tokens [B, P + S], the state.
        Returns (the first output, e.g. logits [B, S, vocab]; the next state)."""
        results = self.session.run(None, {"input_ids": tokens, "attention_mask": mask, **state})
        nxt = {n.replace("present_state.", "past_state."): r for n, r in zip(self.output_names, results)
               if n.startswith("present_state.")}
        return results[0], nxt


def generate(decoder: RecurrentDecoder, prompt: np.ndarray, new_tokens: int, report_at: list[int]):
    """Greedy decoding; returns (tokens [B, prompt + new], {position: latency in ms}, total seconds)."""
    batch, length = prompt.shape
    state = decoder.start(batch)
    mask = np.ones((batch, length), np.int64)
    logits, state = decoder.step(prompt, mask, state)
    tokens = [prompt]
    latencies: dict[int, float] = {}
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(new_tokens):
        nxt = np.argmax(logits[:, -1, :], axis=-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        mask = np.ones((batch, mask.shape[1] + 1), np.int64)
        t = time.perf_counter()
        logits, state = decoder.step(nxt, mask, state)
        samples.append((time.perf_counter() - t) * 1e3)
        position = length + i  # the position of the token just fed
        if report_at and position >= report_at[0]:
            latencies[report_at.pop(0)] = statistics.median(samples[-9:])
    total = time.perf_counter() - start
    return np.concatenate(tokens, axis=1), latencies, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a decoder exported with its KV cache (default: export a GPT-2 here)")
    parser.add_argument("--size", choices=decoders.SIZES, default="tiny", help="GPT-2 to export: tiny or small")
    parser.add_argument("--tokens", type=int, default=300, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length (random token ids)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source is None:
            print(f"exporting a {args.size} GPT-2 (random weights) with its KV cache ...", flush=True)
            source = decoders.export("gpt2", "dynamo18", Path(tmp) / "gpt2_kv.onnx", size=args.size, lm_head=True,
                                     max_positions=max(128, args.prompt + args.tokens + 8))
        print("converting: --method lse --recurrent ...", flush=True)
        result = api.convert(source, Path(tmp) / "gpt2.lse-recurrent.onnx", method="lse", recurrent=True)
        print(f"replaced {result.replaced} attention sites; the model now carries past_state.<l> / present_state.<l>")
        decoder = RecurrentDecoder(result.output_path, args.threads)
        state_kib = sum(np.prod(decoder.shapes[n][1:]) * 4 for n in decoder.state_names) / 2**10
        print(f"state: {len(decoder.state_names)} tensors, {state_kib:.1f} KiB per sequence, the same at every position")

        rng = np.random.default_rng(0)
        vocab = decoders.describe("gpt2", args.size).vocab if args.model is None else 100
        prompt = rng.integers(0, vocab, (1, args.prompt)).astype(np.int64)
        marks = [p for p in (args.prompt + 10, 100, 1000, 10000, 100000) if p < args.prompt + args.tokens]
        tokens, latencies, total = generate(decoder, prompt, args.tokens, list(marks))
        print(f"generated {args.tokens} tokens in {total:.2f} s: {args.tokens / total:.1f} tokens/s")
        for position, ms in latencies.items():
            print(f"  per-token latency at position {position:6d}: {ms:7.2f} ms (median of the last 9 steps)")
        print("first generated ids:", tokens[0, args.prompt:args.prompt + 16].tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
