"""Per-token decode latency: a KV-cache decoder vs the same decoder converted to a fixed-state
recurrent model (`convert --method lse --recurrent`), at positions 1k, 8k and 64k, one run.

    python benchmarks/bench_decode.py                       # GPT-2-small shape, positions 1024, 8192, 65536
    python benchmarks/bench_decode.py --quick               # tiny GPT-2, positions 128, 1024
    python benchmarks/bench_decode.py --positions 1024,8192 --threads 2

The subject is a transformers GPT-2 with the GPT-2-small shape (12 layers, width 768, 12 heads,
vocabulary 50257, LM head included) and random weights, its position table extended to 65552 so
that position 64k exists, exported by torch.onnx (dynamo, opset 18) with its KV cache. Both models
run in this process with the same ORT settings, one new token per call (batch 1):

- original: input_ids [1, 1], attention_mask [1, P + 1] and a past of P positions per layer (random
  values: only the time matters; one buffer serves every past input); it returns the present cache
  (P + 1 positions per layer), as an exported KV-cache decoder does. Outputs stay in ORT (IOBinding),
  so no copy to numpy is timed.
- recurrent: input_ids [1, 1], attention_mask [1, P + 1] and past_state.<l> (fixed size; zeros, the
  cost does not depend on the values).

Each point: warm-up, then the median of --repeats calls (fewer once --budget seconds are spent). The
original at a position is skipped when its past and present would not fit in half the available
memory. Output: a table on stdout and benchmarks/results/decode_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attnexport  # noqa: E402
from attnexport import api, decoders  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def session(path: str, threads: int, library: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(attnexport.library_path())
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int, budget: float) -> float:
    """Median seconds of one call, outputs left in ORT."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")
    start = time.perf_counter()
    sess.run_with_iobinding(binding)  # warm-up
    first = time.perf_counter() - start
    times, spent = [], 0.0
    for _ in range(repeats):
        if times and spent + first > budget:
            break
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", help="comma-separated positions (default 1024,8192,65536)")
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, positions 128, 1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed calls per point, at most")
    parser.add_argument("--workdir", help="keep the exported models here (default: a temporary directory)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    size = "tiny" if args.quick else "small"
    positions = [int(x) for x in args.positions.split(",")] if args.positions else (
        [128, 1024] if args.quick else [1024, 8192, 65536])
    spec = decoders.describe("gpt2", size)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = work / f"gpt2_{size}_kv.onnx"
        if not source.exists():
            print(f"exporting GPT-2 ({size}) with its KV cache ...", flush=True)
            decoders.export("gpt2", "dynamo18", source, size=size, lm_head=True, max_positions=max(positions) + 16)
        converted = work / f"gpt2_{size}_kv.lse-recurrent.onnx"
        if not converted.exists():
            print("converting: --method lse --recurrent ...", flush=True)
            api.convert(source, converted, method="lse", recurrent=True)

        load_before = os.getloadavg()
        original = session(str(source), args.threads, library=False)
        recurrent = session(str(converted), args.threads, library=True)
        state_inputs = {i.name: [1] + list(i.shape[1:]) for i in recurrent.get_inputs() if i.name.startswith("past_state.")}
        token = np.array([[11]], np.int64)
        rows = []
        for position in positions:
            mask = np.ones((1, position + 1), np.int64)
            row = {"position": position}
            feeds = {"input_ids": token, "attention_mask": mask}
            feeds.update({n: np.zeros(s, np.float32) for n, s in state_inputs.items()})
            row["recurrent_ms"] = timed(recurrent, feeds, args.repeats, args.budget) * 1e3
            cache_bytes = 2 * spec.num_layers * spec.num_kv_heads * position * spec.head_dim * 4
            # past (one shared buffer) + present (every layer's keys and values, P + 1 positions)
            if spec.num_kv_heads * position * spec.head_dim * 4 + cache_bytes > available_memory() / 2:
                row["original_skipped"] = f"past + present need {cache_bytes / 2**30:.1f} GiB"
            else:
                past = np.random.default_rng(0).standard_normal(
                    (1, spec.num_kv_heads, position, spec.head_dim)).astype(np.float32)
                feeds = {"input_ids": token, "attention_mask": mask}
                feeds.update({i.name: past for i in original.get_inputs() if i.name.startswith("past_key_values")})
                row["original_ms"] = timed(original, feeds, max(3, args.repeats // 4), args.budget) * 1e3
                row["speedup"] = row["original_ms"] / row["recurrent_ms"]
                del past, feeds
            rows.append(row)
            print(json.dumps(row), flush=True)
        load_after = os.getloadavg()

    first = rows[0]["recurrent_ms"]
    for row in rows:
        row["recurrent_vs_first"] = row["recurrent_ms"] / first
    report = {"model": f"GPT-2 {size} shape ({spec.num_layers} layers, {spec.num_heads} heads x {spec.head_dim}), "
                       "random weights, LM head, dynamo export with KV cache",
              "threads": args.threads, "onnxruntime": ort.__version__, "load_average_before": load_before,
              "load_average_after": load_after, "rows": rows}
    lines = ["# Per-token decode latency: KV-cache decoder vs fixed-state recurrent (LseAttention)", "",
             f"{report['model']}; batch 1, one token per call; {args.threads} intra-op threads; onnxruntime "
             f"{ort.__version__}; load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (shared "
             f"machine). One run: `python benchmarks/bench_decode.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
             "", "| position | original (KV cache) ms | recurrent ms | recurrent vs position "
             f"{rows[0]['position']} | original / recurrent |", "|---|---|---|---|---|"]
    for row in rows:
        original = f"{row['original_ms']:.1f}" if "original_ms" in row else f"not run: {row['original_skipped']}"
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        lines.append(f"| {row['position']} | {original} | {row['recurrent_ms']:.2f} | "
                     f"{row['recurrent_vs_first']:.2f}x | {speedup} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "decode_cpu.md").write_text(text)
        (RESULTS / "decode_cpu.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
