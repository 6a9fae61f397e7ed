"""Prefill throughput of LseAttention (attnexport CPU kernel) against ONNX Runtime's softmax paths, one run.

    python benchmarks/bench_lse_attention.py                  # n = 4k, 16k, 64k; 2 intra-op threads
    python benchmarks/bench_lse_attention.py --quick          # smoke run: n = 1024, 2048
    python benchmarks/bench_lse_attention.py --threads 4 --lengths 4096,16384

B=1, H=8, d=64, float32, all paths in this one process, same inputs:

- attnexport LseAttention, causal 0 and 1 (the kernel under test; linear in n);
- softmax, non-causal: com.microsoft MultiHeadAttention (3-D packed heads), ONNX Attention opset 23;
- softmax, causal: MultiHeadAttention unidirectional=1, ONNX Attention opset 23 is_causal=1,
  com.microsoft GroupQueryAttention (causal by construction).

Every path is first checked at n = 96 against numpy (attnexport.ops.reference: the LseAttention
definition, or exact softmax attention), so each row computes what its name says. Each point: one
warm-up run, then the median of --repeats timed runs (fewer once the timed runs pass --budget
seconds). A softmax path is not run at a length where its run would take more than --skip-after
seconds (predicted quadratically from the previous length) or where its [B, H, n, n] float32
attention matrix alone would need more than half the available memory; the table says why.

Speed-up = the best (fastest) ORT softmax path of the same causality at that n, divided by
LseAttention's time. Output: a table on stdout and benchmarks/results/lse_attention_cpu.{md,json},
with the machine (CPU, ISA variant the library picks, threads, ORT version, load average before and
after: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attnexport  # noqa: E402
from attnexport.ops.reference import lse_attention, softmax_attention  # noqa: E402

B, H, D = 1, 8, 64
RESULTS = ROOT / "benchmarks" / "results"
LENGTHS = [4096, 16384, 65536]
QUICK_LENGTHS = [1024, 2048]
CHECK_N = 96


@dataclass
class Route:
    name: str
    causal: bool
    kernel: bool  # the attnexport op (library) or an ORT softmax path
    build: object  # n -> onnx.ModelProto
    feeds: object  # (q, k, v) in [B, H, n, D] -> dict
    unpack: object  # outputs -> [B, H, n, D]
    skip_reason: str = ""
    last: tuple[int, float] | None = None  # (n, seconds) of the last run
    dense: bool = True  # materialises the [B, H, n, n] attention matrix (GroupQueryAttention does not)


def _model(nodes, inputs, outputs, opsets) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)


def _bhsd(name, n):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, H, n, D])


def _bsd(name, n):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, n, H * D])


def _packed(x):  # [B, H, n, D] -> [B, n, H*D]
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def _unpacked(y):  # [B, n, H*D] -> [B, H, n, D]
    return y.reshape(y.shape[0], y.shape[1], H, -1).transpose(0, 2, 1, 3)


def lse_route(causal: bool) -> Route:
    def build(n):
        node = helper.make_node("LseAttention", ["q", "k", "v"], ["y", "state"], domain="attnexport", causal=int(causal))
        return _model([node], [_bhsd(x, n) for x in "qkv"], ["y", "state"], [("", 21), ("attnexport", 1)])
    return Route("LseAttention" + (" causal" if causal else ""), causal, True, build,
                 lambda q, k, v: {"q": q, "k": k, "v": v}, lambda out: out[0])


def mha_route(causal: bool) -> Route:
    def build(n):
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H,
                                unidirectional=int(causal))
        return _model([node], [_bsd(x, n) for x in "qkv"], ["y"], [("", 21), ("com.microsoft", 1)])
    return Route("MultiHeadAttention" + (" unidirectional" if causal else ""), causal, False, build,
                 lambda q, k, v: {"q": _packed(q), "k": _packed(k), "v": _packed(v)}, lambda out: _unpacked(out[0]))


def attention23_route(causal: bool) -> Route:
    def build(n):
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
        return _model([node], [_bhsd(x, n) for x in "qkv"], ["y"], [("", 23)])
    return Route(f"Attention-23 is_causal={int(causal)}", causal, False, build,
                 lambda q, k, v: {"q": q, "k": k, "v": v}, lambda out: out[0])


def gqa_route() -> Route:
    def build(n):
        inputs = [_bsd(x, n) for x in "qkv"] + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
                                                helper.make_tensor_value_info("total", TensorProto.INT32, [1])]
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
                                ["y", "present_k", "present_v"], domain="com.microsoft", num_heads=H, kv_num_heads=H)
        return _model([node], inputs, ["y", "present_k", "present_v"], [("", 21), ("com.microsoft", 1)])

    def feeds(q, k, v):
        n = q.shape[2]
        return {"q": _packed(q), "k": _packed(k), "v": _packed(v), "seqlens_k": np.full([B], n - 1, np.int32),
                "total": np.array([n], np.int32)}
    return Route("GroupQueryAttention", True, False, build, feeds, lambda out: _unpacked(out[0]), dense=False)


def routes() -> list[Route]:
    return [lse_route(False), mha_route(False), attention23_route(False),
            lse_route(True), mha_route(True), attention23_route(True), gqa_route()]


def session(model: onnx.ModelProto, threads: int, library: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(attnexport.library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, n, D)).astype(np.float32) for _ in range(3))


def check(route: Route, threads: int) -> float:
    """Max error of the route at n = CHECK_N against what its name says it computes (relative to |V|)."""
    q, k, v = inputs(CHECK_N, seed=7)
    got = route.unpack(session(route.build(CHECK_N), threads, route.kernel).run(None, route.feeds(q, k, v)))
    if route.kernel:
        want = lse_attention(q, k, v, causal=int(route.causal))
    else:
        want = softmax_attention(q, k, v, causal=int(route.causal))
    return float(np.max(np.abs(got - want)) / np.max(np.abs(v)))


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def time_route(route: Route, n: int, threads: int, repeats: int, budget: float) -> float:
    sess = session(route.build(n), threads, route.kernel)
    feeds = route.feeds(*inputs(n))
    start = time.perf_counter()
    sess.run(None, feeds)  # warm-up
    first = time.perf_counter() - start
    times = []
    spent = 0.0
    for _ in range(repeats):
        if times and spent + first > budget:
            break
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return statistics.median(times)


def skip_reason(route: Route, n: int, skip_after: float) -> str:
    if route.kernel:
        return ""
    matrix = 4 * B * H * n * n
    if route.dense and matrix > available_memory() / 2:
        return f"not run: the {B}x{H}x{n}x{n} float32 attention matrix alone is {matrix / 2**30:.0f} GiB"
    if route.last is not None:
        n0, t0 = route.last
        predicted = t0 * (n / n0) ** 2
        if predicted > skip_after:
            return f"not run: predicted {predicted:.0f} s (quadratic from {t0:.1f} s at n={n0})"
    return ""


def machine(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    isa = os.environ.get("ATTNEXPORT_CPU_ISA", "")  # the library picks the best the CPU has unless capped
    try:
        flags = open("/proc/cpuinfo").read()
        isa = isa or ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel_isa": isa, "threads": threads, "onnxruntime": ort.__version__,
            "library": attnexport.library_path()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", help="comma-separated n (default 4096,16384,65536)")
    parser.add_argument("--quick", action="store_true", help="n = 1024, 2048 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per point, at most")
    parser.add_argument("--skip-after", type=float, default=240.0, help="skip softmax runs predicted to take longer")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    lengths = QUICK_LENGTHS if args.quick else ([int(x) for x in args.lengths.split(",")] if args.lengths else LENGTHS)

    load_before = os.getloadavg()
    all_routes = routes()
    checks = {r.name: check(r, args.threads) for r in all_routes}
    for name, err in checks.items():
        if err > 1e-4:
            raise SystemExit(f"{name}: check at n={CHECK_N} failed (error {err:.2e})")
    rows = []
    for n in lengths:
        row = {"n": n, "ms": {}, "skipped": {}}
        for route in all_routes:
            reason = skip_reason(route, n, args.skip_after)
            if reason:
                row["skipped"][route.name] = reason
                print(f"n={n:6d}  {route.name:34s} {reason}", flush=True)
                continue
            seconds = time_route(route, n, args.threads, args.repeats, args.budget)
            route.last = (n, seconds)
            row["ms"][route.name] = seconds * 1e3
            print(f"n={n:6d}  {route.name:34s} {seconds * 1e3:10.1f} ms", flush=True)
        for causal in (False, True):
            lse = row["ms"].get(lse_route(causal).name)
            soft = {r.name: row["ms"][r.name] for r in all_routes
                    if not r.kernel and r.causal == causal and r.name in row["ms"]}
            key = "causal" if causal else "non_causal"
            if soft and lse:
                best = min(soft, key=soft.get)
                row[f"best_softmax_{key}"] = best
                row[f"speedup_{key}"] = soft[best] / lse
        rows.append(row)
    load_after = os.getloadavg()
    report = {"machine": machine(args.threads), "B": B, "H": H, "d": D, "dtype": "float32", "checks": checks,
              "load_average_before": load_before, "load_average_after": load_after, "rows": rows}

    lines = ["# LseAttention prefill vs ONNX Runtime softmax attention (CPU)", "",
             f"B={B}, H={H}, d={D}, float32, {args.threads} intra-op threads; {report['machine']['cpu']} "
             f"({report['machine']['kernel_isa']}), onnxruntime {ort.__version__}; load average before "
             f"{load_before[0]:.1f}, after {load_after[0]:.1f} (shared machine). One run: "
             f"`python benchmarks/bench_lse_attention.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.", "",
             "| n | path | ms | speed-up of LseAttention (same causality) |", "|---|---|---|---|"]
    for row in rows:
        for route in all_routes:
            if route.name in row["ms"]:
                ms = f"{row['ms'][route.name]:.1f}"
            else:
                ms = row["skipped"].get(route.name, "")
            key = "causal" if route.causal else "non_causal"
            note = ""
            if route.kernel and f"speedup_{key}" in row:
                note = f"{row[f'speedup_{key}']:.0f}x faster than {row[f'best_softmax_{key}']}"
            lines.append(f"| {row['n']} | {route.name} | {ms} | {note} |")
    lines += ["", "Checks at n=96 (max |error| / max |V| against numpy): " +
              ", ".join(f"{k} {v:.1e}" for k, v in checks.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lse_attention_cpu.md").write_text(text)
        (RESULTS / "lse_attention_cpu.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
