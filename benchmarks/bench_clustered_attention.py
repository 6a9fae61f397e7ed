"""ClusteredAttention (CPU kernel) against ONNX Runtime's softmax attention and SparseAttention, one run.

    python benchmarks/bench_clustered_attention.py [--lengths 4096,16384,65536] [--threads 2]

B=1, H=8, d=64, float32, non-causal. ClusteredAttention with a one-sided window of 64 (129 exact keys) and
32 k-means clusters for the rest (global 0), at its default 10 Lloyd iterations and at 0 iterations (keys
assigned once to the evenly spaced starting centres, the cluster sums built, no Lloyd step); the
difference of the two is the time of the 10 Lloyd iterations, reported as the k-means share (the one
assignment pass that both runs make is not in it, so the share is a lower bound). Against: com.microsoft
MultiHeadAttention (full softmax) and SparseAttention with the same window (the near part alone).
Before timing, ClusteredAttention with a window covering every key is checked to equal
MultiHeadAttention (n=300), so the baseline computes the same attention.

Timing as in bench_sparse_attention.py (CPU time / threads, median of 3 after a warm-up, one run past 2 s);
a point whose [H, n, n] logits would need > 40% of the memory, or whose predicted time exceeds --skip-after,
is skipped and said so. Writes benchmarks/results/clustered_attention_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_sparse_attention import H, D, Path_, _bhsd, _bsd, _memory_bytes, _session, time_path
from onnx import helper

WINDOW, CLUSTERS = 64, 32
RESULTS = Path(__file__).resolve().parent / "results"


def clustered_path(window, clusters, iterations, threads):
    name = f"ClusteredAttention w={'full' if window < 0 else window} M={clusters} iterations={iterations}"

    def build():
        node = helper.make_node("ClusteredAttention", ["q", "k", "v"], ["y"], domain="attnexport", causal=0,
                                window_left=window, window_right=window, dilation=1, num_global=0,
                                num_clusters=clusters, iterations=iterations, cluster="keys")
        return _session([node], [_bhsd("q"), _bhsd("k"), _bhsd("v")], 18, threads, True)

    return Path_(name, "attnexport", False, (window, clusters, iterations), build, "bhsd")


def sparse_path(window, threads):
    def build():
        node = helper.make_node("SparseAttention", ["q", "k", "v"], ["y"], domain="attnexport", causal=0,
                                window_left=window, window_right=window)
        return _session([node], [_bhsd("q"), _bhsd("k"), _bhsd("v")], 18, threads, True)

    return Path_(f"SparseAttention w={window}", "attnexport", False, (window,), build, "bhsd")


def mha_path(threads):
    def build():
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H)
        return _session([node], [_bsd("q"), _bsd("k"), _bsd("v")], 17, threads, False)

    return Path_("ORT MultiHeadAttention", "full", False, None, build, "bsd")


def check_equivalence(threads) -> float:
    """Max |difference| between ClusteredAttention with a window covering every key and MultiHeadAttention."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 300, D)).astype(np.float32) for _ in range(3))
    exact = clustered_path(-1, CLUSTERS, 10, threads)
    ours = exact.build().run(None, exact.feeds(q, k, v))[0]
    mha = mha_path(threads)
    theirs = mha.output(mha.build().run(None, mha.feeds(q, k, v))[0])
    return float(np.abs(ours - theirs).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-after", type=float, default=20.0, help="skip points predicted to take longer (s)")
    parser.add_argument("--out", default=str(RESULTS / "clustered_attention_cpu"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    paths = {"clustered": clustered_path(WINDOW, CLUSTERS, 10, args.threads),
             "clustered_no_lloyd": clustered_path(WINDOW, CLUSTERS, 0, args.threads),
             "sparse": sparse_path(WINDOW, args.threads), "mha": mha_path(args.threads)}
    equivalence = check_equivalence(args.threads)
    print(f"equivalence: max |ClusteredAttention w=full - MultiHeadAttention| = {equivalence:.1e}", flush=True)

    times: dict[str, dict[int, dict]] = {key: {} for key in paths}
    rng = np.random.default_rng(0)
    for n in lengths:
        q, k, v = (rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(3))
        for key, p in paths.items():
            need = p.score_bytes * H * n * n
            if need > 0.4 * _memory_bytes():
                times[key][n] = {"skipped": f"needs about {need / 2**30:.0f} GiB ([H, n, n] logits)"}
                print(f"n={n} {p.name}: skipped (about {need / 2**30:.0f} GiB)", flush=True)
                continue
            done = [(m, t["seconds"]) for m, t in times[key].items() if "seconds" in t]
            if done:
                n0, t0 = done[-1]
                predicted = t0 * (n / n0) ** (2 if p.kind == "full" else 1)
                if predicted > args.skip_after:
                    times[key][n] = {"skipped": f"predicted {predicted:.0f} s > {args.skip_after:g} s"}
                    print(f"n={n} {p.name}: skipped (predicted {predicted:.0f} s)", flush=True)
                    continue
            elif n != lengths[0]:
                times[key][n] = {"skipped": "skipped at a shorter length"}
                continue
            result = time_path(p, q, k, v, args.threads)
            times[key][n] = result
            print(f"n={n} {p.name}: {result['seconds'] * 1e3:.1f} ms (wall {result['wall_seconds'] * 1e3:.1f} ms)",
                  flush=True)

    report = {
        "config": {"B": 1, "H": H, "d": D, "window": WINDOW, "clusters": CLUSTERS, "num_global": 0, "causal": False,
                   "threads": args.threads, "lengths": lengths, "dtype": "float32", "onnxruntime": ort.__version__,
                   "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "loadavg_at_end": os.getloadavg()},
        "equivalence_max_abs": equivalence,
        "rows": [{"key": key, "name": p.name, "times": times[key]} for key, p in paths.items()],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _seconds(report, key, n):
    row = next(r for r in report["rows"] if r["key"] == key)
    entry = row["times"].get(n) or row["times"].get(str(n)) or {}
    return entry.get("seconds")


def markdown(report) -> str:
    config = report["config"]
    lengths = config["lengths"]
    lines = ["# ClusteredAttention vs ONNX Runtime (CPU)", "",
             f"B=1, H={config['H']}, d={config['d']}, float32, non-causal, {config['threads']} threads, ONNX Runtime "
             f"{config['onnxruntime']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in config['loadavg_at_end'])} (other jobs shared the machine).", "",
             f"ClusteredAttention: window {config['window']} on each side (exact), {config['clusters']} k-means "
             "clusters per head for every other key, global 0. Times in ms: CPU time of the run / threads (the time "
             "on that many idle cores), median of 3 runs after a warm-up, or one run past 2 s; wall times in the "
             ".json. — = skipped (reason below).", ""]
    lines.append("| path | " + " | ".join(f"n={n}" for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for row in report["rows"]:
        cells = []
        for n in lengths:
            s = _seconds(report, row["key"], n)
            cells.append("—" if s is None else f"{s * 1e3:.0f}")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "| n | vs MultiHeadAttention | vs SparseAttention (window alone) | k-means share (10 Lloyd "
              "iterations) |", "|---|---|---|---|"]
    for n in lengths:
        t = _seconds(report, "clustered", n)
        if t is None:
            continue
        mha, sparse, no_lloyd = (_seconds(report, key, n) for key in ("mha", "sparse", "clustered_no_lloyd"))
        cells = ["—" if mha is None else f"{mha / t:.1f}× faster",
                 "—" if sparse is None else f"{t / sparse:.2f}× the time",
                 "—" if no_lloyd is None else f"{100 * max(t - no_lloyd, 0.0) / t:.0f}%"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "k-means share = (time at 10 iterations − time at 0 iterations) / time at 10 iterations: the Lloyd "
              "steps; both runs assign every key to a centre once and build the cluster sums, which is not counted."]
    skipped = [f"- {r['name']}, n={n}: {e['skipped']}" for r in report["rows"] for n, e in r["times"].items()
               if "skipped" in e]
    if skipped:
        lines += ["", "Skipped points:", ""] + skipped
    lines += ["", f"Equivalence check at n=300: max |ClusteredAttention with a window covering every key − "
              f"MultiHeadAttention| = {report['equivalence_max_abs']:.1e}.", "",
              "Regenerate: `python benchmarks/bench_clustered_attention.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
