"""SparseAttention (CPU kernel) against ONNX Runtime's own attention paths, one run.

    python benchmarks/bench_sparse_attention.py [--lengths 4096,16384,65536] [--threads 2]

B=1, H=8, d=64, float32. SparseAttention with a one-sided window w in {128, 512} and 0 or 2 global
tokens, non-causal (2w+1 keys) and causal (w+1 keys), and with --window full (causal: the kernel that
skips the upper triangle; non-causal: plain exact attention). ORT's paths:

- full softmax: com.microsoft MultiHeadAttention (non-causal), ONNX Attention opset 23 (is_causal 0/1),
  com.microsoft GroupQueryAttention (always causal);
- the same windowed computation: GroupQueryAttention with local_window_size=w+1 (causal, w+1 keys: it
  counts the query's own key) and
  ONNX Attention opset 25 with left/right_window_size=w (causal and not). Before timing, each is checked
  to compute what SparseAttention computes (n=300), so the comparison is like for like.

Each point: one warm-up run, then the median of 3 timed runs (or the first run alone when it takes
> 2 s). Time = CPU time of the process during the run / threads (ORT's idle threads sleep rather
than spin), which is what the run takes on that many idle cores even when other jobs share the
machine; wall time is recorded too. A point that would need more than 40% of the memory for ORT's [H, n, n] logits (Attention-25 also
builds a mask as large; it was OOM-killed at n=16384 on 24 GB) is skipped too. A point whose predicted time (from the previous length, quadratic for ORT's paths) exceeds --skip-after
seconds is skipped and said so. Writes benchmarks/results/sparse_attention_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import attnexport

H, D = 8, 64
RESULTS = Path(__file__).resolve().parent / "results"


def _session(nodes, inputs, opset: int, threads: int, library: bool) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "bench", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    if library:
        imports.append(helper.make_opsetid("attnexport", 1))
    model = helper.make_model(graph, opset_imports=imports, ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning, so a run's CPU time is the work it did.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        options.register_custom_ops_library(attnexport.library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _bhsd(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, H, "n", D])


def _bsd(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "n", H * D])


class Path_:
    """One way to compute attention: builds its session and its feeds from Q, K, V [1, H, n, d]."""

    def __init__(self, name, kind, causal, window, build, layout, score_bytes=4):
        self.name, self.kind, self.causal, self.window = name, kind, causal, window
        self.build, self.layout = build, layout  # layout: "bhsd", "bsd" or "gqa"
        # ORT's paths hold [H, n, n] logits (and Attention-25 a mask as large): bytes per entry, for
        # skipping a point that would not fit in memory (SparseAttention: 0, its memory is linear).
        self.score_bytes = score_bytes if kind != "attnexport" else 0

    def feeds(self, q, k, v):
        if self.layout == "bhsd":
            return {"q": q, "k": k, "v": v}
        n = q.shape[2]
        flat = {name: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(1, n, H * D)) for name, x in zip("qkv", (q, k, v))}
        if self.layout == "gqa":
            flat.update(seqlens=np.array([n - 1], np.int32), total=np.array(n, np.int32))
        return flat

    def output(self, y):
        return y if self.layout == "bhsd" else y.reshape(1, -1, H, D).transpose(0, 2, 1, 3)


def sparse_path(window, num_global, causal, threads):
    left = -1 if window is None else window
    right = 0 if causal else left
    name = f"SparseAttention w={'full' if window is None else window}" + (f" g={num_global}" if num_global else "")

    def build():
        node = helper.make_node("SparseAttention", ["q", "k", "v"], ["y"], domain="attnexport", causal=int(causal),
                                window_left=left, window_right=right, num_global=num_global)
        return _session([node], [_bhsd("q"), _bhsd("k"), _bhsd("v")], 18, threads, True)

    return Path_(name, "attnexport", causal, (window, num_global), build, "bhsd")


def ort_paths(threads):
    paths = []

    def mha():
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H)
        return _session([node], [_bsd("q"), _bsd("k"), _bsd("v")], 17, threads, False)

    paths.append(Path_("ORT MultiHeadAttention", "full", False, None, mha, "bsd"))
    for causal in (False, True):
        def onnx_attention(causal=causal):
            node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
            return _session([node], [_bhsd("q"), _bhsd("k"), _bhsd("v")], 23, threads, False)

        paths.append(Path_("ORT Attention-23", "full", causal, None, onnx_attention, "bhsd"))

    gqa_inputs = [_bsd("q"), _bsd("k"), _bsd("v"), helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
                  helper.make_tensor_value_info("total", TensorProto.INT32, [])]

    def gqa(window=-1):
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["y"],
                                domain="com.microsoft", num_heads=H, kv_num_heads=H, local_window_size=window)
        return _session([node], gqa_inputs, 17, threads, False)

    paths.append(Path_("ORT GroupQueryAttention", "full", True, None, gqa, "gqa"))
    for window in (128, 512):
        # GroupQueryAttention's local_window_size counts the query's own key: w + 1 keys is w + 1.
        paths.append(Path_(f"ORT GroupQueryAttention local_window_size={window + 1}", "windowed", True, (window, 0),
                           lambda window=window: gqa(window + 1), "gqa"))
        for causal in (False, True):
            def windowed(window=window, causal=causal):
                node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal),
                                        left_window_size=window, right_window_size=0 if causal else window)
                return _session([node], [_bhsd("q"), _bhsd("k"), _bhsd("v")], 25, threads, False)

            paths.append(Path_(f"ORT Attention-25 window={window}", "windowed", causal, (window, 0), windowed, "bhsd",
                               score_bytes=8))
    return paths


def check_equivalence(paths, threads) -> dict[str, float]:
    """Max |difference| of each ORT path from the SparseAttention of the same computation, at n=300."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 300, D)).astype(np.float32) for _ in range(3))
    out = {}
    for p in paths:
        window = p.window[0] if p.window else None
        ours = sparse_path(window, 0, p.causal, threads).build().run(None, {"q": q, "k": k, "v": v})[0]
        theirs = p.output(p.build().run(None, p.feeds(q, k, v))[0])
        out[f"{p.name} ({'causal' if p.causal else 'non-causal'})"] = float(np.abs(ours - theirs).max())
    return out


def time_path(path, q, k, v, threads: int) -> dict:
    """Wall time and CPU time (all threads of the process) of one session.run. "seconds" is the CPU
    time divided by the thread count: what the run takes on `threads` otherwise idle cores, which
    stays meaningful when other jobs share the machine (the wall time is kept too)."""
    session = path.build()
    feeds = path.feeds(q, k, v)

    def once():
        wall, cpu = time.perf_counter(), time.process_time()
        session.run(None, feeds)
        return time.perf_counter() - wall, time.process_time() - cpu

    first = once()  # a warm-up, or the only run when it is long (a warm-up matters little there)
    runs = [first] if first[1] / threads > 2.0 else [once() for _ in range(3)]
    return {"seconds": statistics.median(c for _, c in runs) / threads, "wall_seconds": statistics.median(w for w, _ in runs),
            "cpu_seconds": statistics.median(c for _, c in runs), "runs": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-after", type=float, default=20.0, help="skip points predicted to take longer (s)")
    parser.add_argument("--out", default=str(RESULTS / "sparse_attention_cpu"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    ours = [sparse_path(w, g, c, args.threads) for c in (False, True) for w in (128, 512) for g in (0, 2)]
    ours += [sparse_path(None, 0, c, args.threads) for c in (False, True)]
    theirs = ort_paths(args.threads)
    equivalence = check_equivalence([p for p in theirs if p.kind == "windowed" or p.kind == "full"], args.threads)
    print("equivalence (max |diff| vs SparseAttention):", json.dumps(equivalence, indent=1), flush=True)

    rows: dict[str, dict] = {}
    previous: dict[str, tuple[int, float]] = {}
    rng = np.random.default_rng(0)
    for n in lengths:
        q, k, v = (rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(3))
        for p in ours + theirs:
            key = f"{p.name} | {'causal' if p.causal else 'non-causal'}"
            row = rows.setdefault(key, {"name": p.name, "causal": p.causal, "kind": p.kind, "window": p.window,
                                        "times": {}})
            need = p.score_bytes * H * n * n
            if need > 0.4 * _memory_bytes():
                row["times"][n] = {"skipped": f"needs about {need / 2**30:.0f} GiB ([H, n, n] logits/mask)"}
                print(f"n={n} {key}: skipped (about {need / 2**30:.0f} GiB)", flush=True)
                continue
            if key in previous:
                n0, t0 = previous[key]
                predicted = t0 * (n / n0) ** (1 if p.kind == "attnexport" and p.window[0] is not None else 2)
                if predicted > args.skip_after:
                    row["times"][n] = {"skipped": f"predicted {predicted:.0f} s > {args.skip_after:g} s"}
                    print(f"n={n} {key}: skipped (predicted {predicted:.0f} s)", flush=True)
                    continue
            if key in previous or n == lengths[0]:
                result = time_path(p, q, k, v, args.threads)
            else:
                continue  # skipped at a shorter length already
            row["times"][n] = result
            previous[key] = (n, result["seconds"])
            print(f"n={n} {key}: {result['seconds'] * 1e3:.1f} ms (wall {result['wall_seconds'] * 1e3:.1f} ms)", flush=True)

    report = {
        "config": {"B": 1, "H": H, "d": D, "threads": args.threads, "lengths": lengths, "dtype": "float32",
                   "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "equivalence_max_abs": equivalence,
        "rows": list(rows.values()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _seconds(row, n):
    entry = row["times"].get(n)
    return entry.get("seconds") if entry else None


def markdown(report) -> str:
    lengths = report["config"]["lengths"]
    rows = report["rows"]
    lines = ["# SparseAttention vs ONNX Runtime (CPU)", "",
             f"B=1, H={H}, d={D}, float32, {report['config']['threads']} threads, ONNX Runtime "
             f"{report['config']['onnxruntime']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in report['config']['loadavg_at_end'])} (other jobs shared the machine).",
             "", "Times in ms: CPU time of the run (all threads) / threads, i.e. the time on that many idle cores "
             "(idle pool threads sleep, so CPU time is work); median of 3 runs after a warm-up, or one run when "
             "it takes > 2 s. Wall times (inflated by the other jobs) are in the .json. — = skipped (predicted "
             "beyond the limit).", ""]
    lines.append("| path | causal | " + " | ".join(f"n={n}" for n in lengths) + " |")
    lines.append("|---|---|" + "---|" * len(lengths))
    for row in rows:
        cells = []
        for n in lengths:
            s = _seconds(row, n)
            cells.append("—" if s is None else f"{s * 1e3:.0f}")
        lines.append(f"| {row['name']} | {'yes' if row['causal'] else 'no'} | " + " | ".join(cells) + " |")

    def best(kind, causal, window, n):
        times = [_seconds(r, n) for r in rows if r["kind"] == kind and r["causal"] == causal
                 and (window is None or (r["window"] and r["window"][0] == window))]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def ours(window, causal, n, globals_=0):
        for r in rows:
            if r["kind"] == "attnexport" and r["causal"] == causal and r["window"] == (window, globals_):
                return _seconds(r, n)
        return None

    lines += ["", "## Ratios", "",
              "speed-up = ORT time / SparseAttention time. 'same windowed computation': the fastest of ORT's "
              "windowed paths (GroupQueryAttention local_window_size, Attention-25 windows), which compute every "
              "logit and mask; 'vs full': the fastest of ORT's full paths of the same causality, and our own "
              "--window full; ideal = keys per row of full attention / keys per row of the window "
              "(n/(2w+1) non-causal, ((n+1)/2)/(w+1) causal).", ""]
    lines.append("| n | w | causal | vs ORT windowed | vs ORT full | vs ours full | ideal | % of ideal (ORT full, ours) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        for causal in (False, True):
            for w in (128, 512):
                t = ours(w, causal, n)
                if t is None:
                    continue
                windowed = best("windowed", causal, w, n)
                full = best("full", causal, None, n)
                own_full = ours(None, causal, n)
                ideal = n / (2 * w + 1) if not causal else ((n + 1) / 2) / (w + 1)

                def ratio(x):
                    return None if x is None else x / t

                cells = [ratio(windowed), ratio(full), ratio(own_full)]
                text = ["—" if c is None else f"{c:.1f}×" for c in cells]
                pct = ", ".join("—" if c is None else f"{100 * c / ideal:.0f}%" for c in cells[1:])
                lines.append(f"| {n} | {w} | {'yes' if causal else 'no'} | {text[0]} | {text[1]} | {text[2]} | "
                             f"{ideal:.1f} | {pct} |")
    lines += ["", "Causal, full window (the kernel that skips the upper triangle) vs ORT's causal paths:", ""]
    lines.append("| n | SparseAttention full causal (ms) | fastest ORT causal (ms) | speed-up |")
    lines.append("|---|---|---|---|")
    for n in lengths:
        t, full = ours(None, True, n), best("full", True, None, n)
        if t is not None and full is not None:
            lines.append(f"| {n} | {t * 1e3:.0f} | {full * 1e3:.0f} | {full / t:.2f}× |")
    skipped = [f"- {r['name']} ({'causal' if r['causal'] else 'non-causal'}), n={n}: {e['skipped']}"
               for r in rows for n, e in r["times"].items() if "skipped" in e]
    if skipped:
        lines += ["", "Skipped points:", ""] + skipped
    lines += ["", "Equivalence check at n=300 (max |difference| from SparseAttention of the same pattern):", ""]
    for name, value in report["equivalence_max_abs"].items():
        lines.append(f"- {name}: {value:.1e}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
