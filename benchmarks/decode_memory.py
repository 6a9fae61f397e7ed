"""Memory while generating: a KV-cache decoder vs the same decoder converted to ClusteredAttention with a
fixed-size state (`attnexport calibrate --method clustered --recurrent`): a bounded KV cache (the window)
plus per-cluster sums of everything older.

    python benchmarks/decode_memory.py                    # GPT-2-small shape, 2048 generated tokens
    python benchmarks/decode_memory.py --quick            # tiny GPT-2, 512 tokens (a smoke run)

The subject is a transformers GPT-2 (random weights, LM head; nothing is downloaded) exported by
torch.onnx (dynamo, opset 18) with its KV cache. `attnexport calibrate --method clustered --recurrent`
on random token sequences (the weights are random, so there is no text to prefer) fits its centres and
picks each layer's window and cluster count (up to --window, --clusters) within the error budget. Each model then generates
greedily in a process of its own (so one's allocations do not hide the other's), one token per call
after the prompt, feeding back what it returned (the present cache, or the present state). At each
checkpoint the process reports its resident memory (VmRSS, /proc/self/status), the bytes it carries
between calls, and the median latency of the last steps. Output: a table on stdout and
benchmarks/results/decode_memory_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def generate(model: str, kind: str, prompt_len: int, tokens: int, checkpoints: list[int], threads: int,
             mem_pattern: bool = True) -> list[dict]:
    """Greedy decoding with `model` ("original": feeds its present.* back as past_key_values.*;
    "recurrent": present_state.* back as past_state.*); a record per checkpoint position."""
    import onnxruntime as ort

    import attnexport

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_mem_pattern = mem_pattern  # ORT's default is on: a planned pattern per input shape
    session = attnexport.InferenceSession(model, options)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    prefix = "past_key_values." if kind == "original" else "past_state."
    carried = {}
    for name, spec in inputs.items():
        if name.startswith(prefix):
            shape = [1] + [0 if kind == "original" and axis == 2 else int(d) for axis, d in enumerate(spec.shape)
                           if axis > 0]
            carried[name] = np.zeros(shape, np.float32)
    back = {"present." + n[len("past_key_values."):] if kind == "original" else n.replace("past_state.", "present_state."): n
            for n in carried}
    rng = np.random.default_rng(0)
    vocab = session.get_outputs()[0].shape[-1]
    ids = rng.integers(0, vocab if isinstance(vocab, int) else 100, (1, prompt_len)).astype(np.int64)
    records, samples, length = [], [], 0
    pending = sorted(checkpoints)
    step_ids = ids
    for _ in range(tokens + 1):
        length += step_ids.shape[1]
        mask = np.ones((1, length), np.int64)
        start = time.perf_counter()
        results = session.run(None, {"input_ids": step_ids, "attention_mask": mask, **carried})
        samples.append((time.perf_counter() - start) * 1e3)
        named = dict(zip(outputs, results))
        carried = {past: named[present] for present, past in back.items()}
        step_ids = np.argmax(named[outputs[0]][:, -1, :], axis=-1).astype(np.int64)[:, None]
        while pending and length >= pending[0]:
            records.append({"position": pending.pop(0), "rss_mib": round(resident_mib(), 1),
                            "carried_mib": round(sum(a.nbytes for a in carried.values()) / 2**20, 3),
                            "ms_per_token": round(statistics.median(samples[-9:]), 2)})
    return records


def run_worker(model: str, kind: str, args, mem_pattern: bool = True) -> list[dict]:
    command = [sys.executable, "-P", __file__, "--worker", kind, "--model", model, "--prompt", str(args.prompt),
               "--tokens", str(args.tokens), "--checkpoints", ",".join(map(str, args.checkpoints)),
               "--threads", str(args.threads)] + ([] if mem_pattern else ["--no-mem-pattern"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the {kind} model's run failed:\n{done.stderr.strip()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(args, workdir: Path) -> tuple[str, str, dict]:
    """Export the decoder, fit its centres, convert it; returns (original, recurrent, what was done)."""
    from attnexport import api, decoders
    from attnexport.methods import MethodOptions

    size = "tiny" if args.quick else "small"
    positions = args.prompt + args.tokens + 8
    key = {"size": size, "positions": positions, "window": args.window, "clusters": args.clusters,
           "budget": args.budget, "calibration": [args.calibration_sequences, args.calibration_length]}
    saved = workdir / "setup.json"
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:  # --workdir from an earlier run
        print(f"reusing the models in {workdir}", flush=True)
        setup = json.loads(saved.read_text())["setup"]
        return str(workdir / "gpt2_kv.onnx"), str(workdir / "gpt2.clustered-recurrent.onnx"), setup
    print(f"exporting a {size} GPT-2 (random weights) with its KV cache ...", flush=True)
    source = decoders.export("gpt2", "dynamo18", workdir / "gpt2_kv.onnx", size=size, lm_head=True,
                             max_positions=max(128, positions))
    spec = decoders.describe("gpt2", size)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, spec.vocab, (args.calibration_sequences, args.calibration_length)).astype(np.int64)
    data = workdir / "calibration.npz"
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for name in decoders.input_names(spec.num_layers)[2:]:
        feeds[name] = np.zeros((len(ids), spec.num_kv_heads, 0, spec.head_dim), np.float32)
    np.savez(data, **feeds)
    print(f"calibrate --method clustered --window {args.window} --clusters {args.clusters} --recurrent on {len(ids)} "
          f"random sequences of {ids.shape[1]} tokens ...", flush=True)
    t = time.perf_counter()
    result = api.calibrate(source, workdir / "gpt2.clustered-recurrent.onnx", method="clustered", data=str(data),
                           options=MethodOptions(window=args.window, num_clusters=args.clusters), budget=args.budget,
                           batch_size=8, recurrent=True, threads=args.threads)
    fit_s = time.perf_counter() - t
    chosen = [f"{f.parameters['window']}+{f.parameters['clusters']}" for f in result.fits.values()]
    setup = {"size": size, "layers": spec.num_layers, "heads": spec.num_heads, "head_dim": spec.head_dim,
             "replaced": len(result.fits), "fit_seconds": round(fit_s, 1), "window+clusters per layer": chosen}
    saved.write_text(json.dumps({"key": key, "setup": setup}))
    return source, result.output_path, setup


def table(runs: dict) -> list[str]:
    """Per checkpoint: RSS with ORT's memory patterns off / on (its default), carried MiB, ms/token (off)."""
    lines = ["| position | original RSS MiB (patterns off / on) | original carries MiB | original ms/token | "
             "recurrent RSS MiB (patterns off / on) | recurrent carries MiB | recurrent ms/token |",
             "|---|---|---|---|---|---|---|"]
    rows = zip(runs[("original", False)], runs[("original", True)], runs[("recurrent", False)],
               runs[("recurrent", True)])
    for o, o_on, r, r_on in rows:
        lines.append(f"| {o['position']} | {o['rss_mib']:.1f} / {o_on['rss_mib']:.1f} | {o['carried_mib']:.2f} | "
                     f"{o['ms_per_token']:.2f} | {r['rss_mib']:.1f} / {r_on['rss_mib']:.1f} | "
                     f"{r['carried_mib']:.2f} | {r['ms_per_token']:.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, 512 tokens")
    parser.add_argument("--tokens", type=int, help="tokens to generate (default 2048; 512 with --quick)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.05, help="calibrate's error budget per layer")
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--calibration-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", help="positions to report (default: spread over the run)")
    parser.add_argument("--workdir", help="keep the exported models here")
    parser.add_argument("--worker", choices=("original", "recurrent"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--no-mem-pattern", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (512 if args.quick else 2048)
    if args.checkpoints:
        args.checkpoints = [int(p) for p in str(args.checkpoints).split(",")]
    else:
        end = args.prompt + args.tokens
        args.checkpoints = sorted({p for p in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384) if p < end}
                                  | {end})
    if args.worker:
        print(json.dumps(generate(args.model, args.worker, args.prompt, args.tokens, args.checkpoints, args.threads,
                                  mem_pattern=not args.no_mem_pattern)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        original_path, recurrent_path, setup = prepare(args, workdir)
        print(f"generating {args.tokens} tokens with each model (a process each) ...", flush=True)
        runs = {(kind, pattern): run_worker(path, kind, args, pattern)
                for kind, path in (("original", original_path), ("recurrent", recurrent_path)) for pattern in (False, True)}
    original, recurrent = runs[("original", False)], runs[("recurrent", False)]
    lines = table(runs)
    mark = next((i for i, r in enumerate(recurrent) if r["position"] >= 2 * args.window), 0)

    def growth(run):
        return run[-1]["rss_mib"] - run[mark]["rss_mib"]

    last = recurrent[-1]
    summary = (f"From position {recurrent[mark]['position']} (twice the largest window) to {last['position']}: the "
               f"recurrent model carries {last['carried_mib']:.2f} MiB at every step and its resident memory grew by "
               f"{growth(recurrent):+.1f} MiB with ONNX Runtime's memory patterns off "
               f"({growth(runs[('recurrent', True)]):+.1f} MiB with them on, ORT's default); the original's cache grew "
               f"to {original[-1]['carried_mib']:.2f} MiB and its resident memory by {growth(original):+.1f} MiB "
               f"({growth(runs[('original', True)]):+.1f} MiB with patterns on).")
    command = "python benchmarks/decode_memory.py" + (" --quick" if args.quick else "") + \
        (f" --tokens {args.tokens}" if args.tokens != (512 if args.quick else 2048) else "")
    load = os.getloadavg()[0]
    md = [f"# Memory while generating: KV cache vs ClusteredAttention state (window {args.window} + "
          f"{args.clusters} clusters)", "",
          f"GPT-2 ({setup['size']}: {setup['layers']} layers, {setup['heads']} heads x {setup['head_dim']}), random "
          f"weights, dynamo export with its KV cache; `attnexport calibrate --method clustered --recurrent` (caps: "
          f"window {args.window}, {args.clusters} clusters; budget {args.budget}) on {args.calibration_sequences} random "
          f"sequences of {args.calibration_length} tokens ({setup['fit_seconds']} s) fitted the centres and chose, per "
          f"layer, window+clusters {', '.join(setup['window+clusters per layer'])}; {setup['replaced']} sites replaced. Batch 1, prompt {args.prompt}, then one "
          f"token per call; {args.threads} intra-op threads; each run in its own process, with ONNX Runtime's "
          f"memory patterns off (SessionOptions.enable_mem_pattern = False; attnexport.InferenceSession's choice for "
          f"recurrent models) and on (ORT's default); ms/token with them off; load average "
          f"{load:.1f} at the end. RSS: the process's resident memory (VmRSS); carries: the arrays fed back "
          f"between calls (past_key_values.* or past_state.*). Command: `{command}`.", "", *lines, "", summary]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_memory_cpu.md").write_text("\n".join(md) + "\n")
    (RESULTS / "decode_memory_cpu.json").write_text(json.dumps(
        {"setup": setup, "window": args.window, "clusters": args.clusters, "command": command,
         **{f"{kind}{'_mem_pattern' if pattern else ''}": run for (kind, pattern), run in runs.items()}}, indent=1) + "\n")
    print("\n".join(lines))
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
