"""LinearAttention (attnexport CPU kernel) against ONNX Runtime's attention paths and a GEMM, one run.

    python benchmarks/bench_linear_attention.py                # n = 512 .. 64k, 2 intra-op threads
    python benchmarks/bench_linear_attention.py --quick        # smoke run: n = 512, 2048
    python benchmarks/bench_linear_attention.py --threads 4 --lengths 4096,16384

B=1, H=8, d=64, float32, everything in this one process. Paths:

- attnexport LinearAttention, feature_map elu1 and relu, causal 0/1 (the kernel under test);
- softmax, non-causal: com.microsoft MultiHeadAttention (3-D packed), ONNX Attention opset 23;
- softmax, causal: com.microsoft MultiHeadAttention unidirectional=1, ONNX Attention opset 23
  is_causal=1, com.microsoft GroupQueryAttention (causal by construction);
- ONNX LinearAttention opset 27 (update_rule "linear", 3-D packed heads, causal by definition: no
  feature map, no normaliser, the same state recurrence);
- GEMM: ORT MatMul computing exactly the two products a non-causal linear attention needs,
  [H, n, 64] @ [H, 64, 65] and [H, 64, n] @ [H, n, 65] (the state φ(K)ᵀ[V, 1] and the read-out
  φ(Q) S), plus a square 2048³ MatMul for the machine's peak sgemm rate.

Before timing, every path is checked at n = 96 against numpy (softmax or linear attention, causal or
not), so each row computes what its name says. Each point: one warm-up run, then the median of
--repeats timed runs (fewer when a run takes seconds: the timed runs stop after ~--budget seconds).
A baseline whose run exceeds --skip-after seconds, or whose predicted time at the next length
(quadratic for the softmax paths, from this one) would, is not run at larger n; one whose predicted
memory would pass half of the available memory likewise. Skips are written in the table.

GFLOP/s: 4·B·H·n·d·(d+1) / t for LinearAttention (the state and the read-out, each a product of
n·d·(d+1) multiply-adds; the causal kernel also does intra-chunk products that are not counted), and
the same count for the GEMM row, which performs exactly those products.

Output: a table on stdout and benchmarks/results/linear_attention_cpu.{md,json} (+ .png with
matplotlib), with the machine (CPU, the ISA variant the kernel library picks, threads, ORT version,
load average before and after: the machine may be shared).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attnexport  # noqa: E402
from attnexport.ops.reference import linear_attention as linear_reference  # noqa: E402
from attnexport.ops.reference import softmax_attention  # noqa: E402

B, H, D = 1, 8, 64
RESULTS = ROOT / "benchmarks" / "results"
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [512, 2048]
CHECK_N = 96


# --- the paths ------------------------------------------------------------------------------------

@dataclass
class Path_:
    name: str
    causal: bool
    kind: str  # "kernel" | "softmax" | "ort_linear" | "gemm"
    build: object  # n -> onnx.ModelProto
    feeds: object  # (q, k, v) [B, H, n, D] -> dict
    unpack: object = None  # outputs -> [B, H, n, D] (for the check)
    library: bool = False
    quadratic: bool = False
    feature_map: str = ""
    short: str = ""  # column name in the tables
    skipped_from: int | None = None
    skip_reason: str = ""
    check_error: float | None = None


def _model(nodes, inputs, outputs, opsets) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                        for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)


def _bhsd(name, n):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, H, n, D])


def _bsd(name, n):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, n, H * D])


def _packed(x):  # [B, H, n, D] -> [B, n, H*D]
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def _unpacked(y):  # [B, n, H*D] -> [B, H, n, D]
    return y.reshape(y.shape[0], y.shape[1], H, -1).transpose(0, 2, 1, 3)


def linear_path(feature_map: str, causal: bool) -> Path_:
    def build(n):
        node = helper.make_node("LinearAttention", ["q", "k", "v"], ["y"], domain="attnexport", causal=int(causal),
                                feature_map=feature_map)
        return _model([node], [_bhsd(x, n) for x in "qkv"], ["y"], [("", 21), ("attnexport", 1)])
    return Path_(f"LinearAttention {feature_map}" + (" causal" if causal else ""), causal, "kernel", build,
                 lambda q, k, v: {"q": q, "k": k, "v": v}, unpack=lambda out: out[0], library=True,
                 feature_map=feature_map, short=f"LA {feature_map}")


def mha_path(causal: bool) -> Path_:
    def build(n):
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H,
                                unidirectional=int(causal))
        return _model([node], [_bsd(x, n) for x in "qkv"], ["y"], [("", 21), ("com.microsoft", 1)])
    name = "MultiHeadAttention" + (" unidirectional" if causal else "")
    return Path_(name, causal, "softmax", build, lambda q, k, v: {"q": _packed(q), "k": _packed(k), "v": _packed(v)},
                 unpack=lambda out: _unpacked(out[0]), quadratic=True, short="MHA")


def attention23_path(causal: bool) -> Path_:
    def build(n):
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
        return _model([node], [_bhsd(x, n) for x in "qkv"], ["y"], [("", 23)])
    return Path_(f"Attention-23 is_causal={int(causal)}", causal, "softmax", build,
                 lambda q, k, v: {"q": q, "k": k, "v": v}, unpack=lambda out: out[0], quadratic=True, short="Attn23")


def gqa_path() -> Path_:
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
    return Path_("GroupQueryAttention", True, "softmax", build, feeds, unpack=lambda out: _unpacked(out[0]),
                 quadratic=True, short="GQA")


def ort_linear_path() -> Path_:
    def build(n):
        node = helper.make_node("LinearAttention", ["q", "k", "v"], ["y", "state"], update_rule="linear",
                                q_num_heads=H, kv_num_heads=H)
        return _model([node], [_bsd(x, n) for x in "qkv"], ["y", "state"], [("", 27)])
    return Path_("ONNX LinearAttention-27 linear", True, "ort_linear", build,
                 lambda q, k, v: {"q": _packed(q), "k": _packed(k), "v": _packed(v)},
                 unpack=lambda out: _unpacked(out[0]), short="LA27")


def gemm_path() -> Path_:
    """The two products of non-causal linear attention as plain ORT MatMuls (same shapes, same flops)."""
    def build(n):
        inputs = [helper.make_tensor_value_info("a1", TensorProto.FLOAT, [H, n, D]),
                  helper.make_tensor_value_info("b1", TensorProto.FLOAT, [H, D, D + 1]),
                  helper.make_tensor_value_info("a2", TensorProto.FLOAT, [H, D, n]),
                  helper.make_tensor_value_info("b2", TensorProto.FLOAT, [H, n, D + 1])]
        nodes = [helper.make_node("MatMul", ["a1", "b1"], ["y1"]), helper.make_node("MatMul", ["a2", "b2"], ["y2"])]
        return _model(nodes, inputs, ["y1", "y2"], [("", 21)])

    def feeds(q, k, v):
        n = q.shape[2]
        rng = np.random.default_rng(1)
        return {"a1": q[0], "b1": rng.standard_normal((H, D, D + 1)).astype(np.float32),
                "a2": np.ascontiguousarray(k[0].transpose(0, 2, 1)),
                "b2": np.concatenate([v[0], np.ones((H, n, 1), np.float32)], axis=-1)}
    return Path_("GEMM (ORT MatMul, same products)", False, "gemm", build, feeds, short="GEMM")


def paths() -> list[Path_]:
    return [linear_path("elu1", False), linear_path("relu", False), mha_path(False), attention23_path(False),
            gemm_path(),
            linear_path("elu1", True), linear_path("relu", True), mha_path(True), attention23_path(True), gqa_path(),
            ort_linear_path()]


def session(model: onnx.ModelProto, threads: int, library: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(attnexport.library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check(path: Path_, threads: int) -> float:
    """Relative max error of the path at n = CHECK_N against what its name says it computes."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((B, H, CHECK_N, D)).astype(np.float32) for _ in range(3))
    if path.kind == "gemm":
        feeds = path.feeds(q, k, v)
        out = session(path.build(CHECK_N), threads, False).run(None, feeds)
        ref = [feeds["a1"].astype(np.float64) @ feeds["b1"], feeds["a2"].astype(np.float64) @ feeds["b2"]]
        return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, ref))
    out = session(path.build(CHECK_N), threads, path.library).run(None, path.feeds(q, k, v))
    y = path.unpack(out)
    if path.kind == "kernel":
        ref = linear_reference(q, k, v, causal=int(path.causal), feature_map=path.feature_map)
    elif path.kind == "ort_linear":  # o_t = scale q_t · Σ_{s<=t} k_s v_sᵀ
        state = np.einsum("bhjd,bhje->bhjde", k.astype(np.float64), v).cumsum(axis=2)
        ref = np.einsum("bhid,bhide->bhie", q, state) / math.sqrt(D)
    else:
        ref = softmax_attention(q, k, v, causal=int(path.causal))
    return float(np.abs(y - ref).max() / np.abs(ref).max())


# --- timing ---------------------------------------------------------------------------------------

def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def time_point(path: Path_, n: int, qkv, threads: int, repeats: int, budget: float) -> dict:
    base = rss_bytes()
    sess = session(path.build(n), threads, path.library)
    feeds = path.feeds(*qkv)
    start = time.perf_counter()
    sess.run(None, feeds)
    warm = time.perf_counter() - start
    times = []
    if warm * 1.0 < budget:
        spent = 0.0
        while len(times) < repeats and (len(times) < 1 or spent + warm <= budget):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
    grown = max(rss_bytes() - base, 0)
    del sess, feeds
    gc.collect()
    point = {"warmup_s": warm, "times_s": times, "rss_growth_bytes": grown}
    point["median_s"] = statistics.median(times) if times else warm
    point["min_s"] = min(times) if times else warm
    point["note"] = "" if times else "one run (the warm-up)"
    return point


def flops(n: int) -> float:
    return 4.0 * B * H * n * D * (D + 1)


def peak_gemm(threads: int) -> float:
    size = 2048
    node = helper.make_node("MatMul", ["a", "b"], ["c"])
    model = _model([node], [helper.make_tensor_value_info(x, TensorProto.FLOAT, [size, size]) for x in "ab"], ["c"],
                   [("", 21)])
    sess = session(model, threads, False)
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    feeds = {"a": a, "b": a}
    sess.run(None, feeds)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times) / 1e9


# --- machine --------------------------------------------------------------------------------------

def cpu_info() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def selected_isa(flags: set[str]) -> str:
    """The variant custom_ops/cpu/cpu_features.cc picks (same rule, same ATTNEXPORT_CPU_ISA cap)."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "bmi2"} <= flags:
        detected = 2
    elif {"avx2", "fma", "bmi2", "f16c"} <= flags:
        detected = 1
    else:
        detected = 0
    cap = {"baseline": 0, "avx2": 1, "avx512": 2}.get(os.environ.get("ATTNEXPORT_CPU_ISA", ""), detected)
    return ["baseline (x86-64)", "avx2 (x86-64-v3)", "avx512 (x86-64-v4)"][min(cap, detected)]


def machine(threads: int) -> dict:
    model, flags = cpu_info()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": model, "logical_cpus": os.cpu_count(), "isa": selected_isa(flags),
            "avx512": "avx512f" in flags, "threads": threads, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "library": attnexport.library_path(), "git": commit, "load_before": os.getloadavg()}


# --- reporting ------------------------------------------------------------------------------------

def _fmt_ms(point: dict | None, path: dict, n: int) -> str:
    if point is None:
        return "skipped" if path["skipped_from"] is not None and n >= path["skipped_from"] else "-"
    ms = point["median_s"] * 1e3
    return (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}") + ("*" if point.get("note") else "")


GEMM_NAME = "GEMM (ORT MatMul, same products)"


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the non-causal and the causal table."""
    out = []
    for causal in (False, True):
        suffix = " causal" if causal else ""
        shown = [p for p in report["paths"] if p["causal"] == causal and p["kind"] != "gemm"]
        baselines = [p for p in shown if p["kind"] in ("softmax", "ort_linear")]
        header = ["n"] + [f"{p['short']} ms" for p in shown] + ["GEMM ms"]
        header += [f"elu1 vs {p['short']}" for p in baselines]
        header += ["elu1 GFLOP/s", "relu GFLOP/s", "GEMM GFLOP/s", "elu1 % GEMM", "relu % GEMM"]
        gemm_path = next(p for p in report["paths"] if p["kind"] == "gemm")
        rows = []
        for n_text, points in report["points"].items():
            n = int(n_text)
            row = [str(n)] + [_fmt_ms(points.get(p["name"]), p, n) for p in shown + [gemm_path]]
            elu = points.get("LinearAttention elu1" + suffix)
            relu = points.get("LinearAttention relu" + suffix)
            gemm = points.get(GEMM_NAME)
            for bp in baselines:
                base = points.get(bp["name"])
                row.append(f"{base['median_s'] / elu['median_s']:.1f}x" if base and elu else "-")
            rates = [flops(n) / p["median_s"] / 1e9 if p else None for p in (elu, relu, gemm)]
            row += [f"{r:.1f}" if r else "-" for r in rates]
            row += [f"{100 * r / rates[2]:.0f}%" if r and rates[2] else "-" for r in rates[:2]]
            rows.append(row)
        out.append(("causal" if causal else "non-causal", header, rows))
    return out


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    lines = ["# LinearAttention on the CPU: attnexport kernel vs ONNX Runtime", "",
             f"Command: `{command}`", "",
             f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; AVX-512: {'yes' if m['avx512'] else 'no'})",
             f"- kernel variant: {m['isa']}; intra-op threads: {m['threads']}",
             f"- onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, Python {m['python']}",
             f"- library: {m['library']} (git {m['git'] or '?'})",
             f"- load average before / after: {', '.join(f'{x:.2f}' for x in m['load_before'])} / "
             f"{', '.join(f'{x:.2f}' for x in m['load_after'])} (a shared machine: absolute times are noisy; "
             "ratios come from this one run)",
             f"- peak sgemm (ORT MatMul 2048³, same threads): {report['peak_gemm_gflops']:.1f} GFLOP/s",
             f"- B={B}, H={H}, d={D}, float32; median of up to {report['repeats']} timed runs after a warm-up "
             "(`*`: a single run).", ""]
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += ["Columns: " + "; ".join(f"{p['short']} = {p['name']}" for p in report["paths"])
              + ". `elu1 vs X`: X's time / LinearAttention elu1's time (same causality). `skipped`: not run "
              "at that length (see below).", "", "## Checks and skips", ""]
    for p in report["paths"]:
        err = p["check_error"]
        lines.append(f"- {p['name']}: matches its definition at n={CHECK_N} (max rel. error {err:.1e})"
                     + (f"; not run from n={p['skipped_from']}: {p['skip_reason']}" if p["skipped_from"] else ""))
    lines += ["", "GFLOP/s counts 4·B·H·n·d·(d+1) for LinearAttention (state φ(K)ᵀ[V,1] and read-out φ(Q)S); the "
              "GEMM row runs exactly those two products as ORT MatMuls ([H,n,64]@[H,64,65] and "
              "[H,64,n]@[H,n,65]). The causal kernel's intra-chunk products are extra work, not counted.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, causal in zip(axes, (False, True)):
        for p in report["paths"]:
            if p["causal"] != causal and p["kind"] != "gemm":
                continue
            xs, ys = [], []
            for n_text, points in report["points"].items():
                if p["name"] in points:
                    xs.append(int(n_text))
                    ys.append(points[p["name"]]["median_s"] * 1e3)
            if xs:
                style = dict(linestyle="--", color="gray") if p["kind"] == "gemm" else dict(linestyle="-")
                if p["kind"] == "kernel":
                    style["linewidth"] = 2.5
                ax.plot(xs, ys, marker="o", label=p["name"], **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_title(("causal" if causal else "non-causal") + f" (B={B}, H={H}, d={D}, {report['machine']['threads']} threads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_tables(report: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    for title, header, rows in tables(report):
        if Console is None:
            print(f"\n{title}\n" + " | ".join(header))
            for r in rows:
                print(" | ".join(r))
            continue
        table = Table(title=title, show_lines=False)
        for h in header:
            table.add_column(h, justify="right", overflow="fold")
        for r in rows:
            table.add_row(*r)
        Console(width=250).print(table)


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help=f"comma-separated sequence lengths (default {','.join(map(str, LENGTHS))})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: n = {QUICK_LENGTHS}, 2 repeats")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per point (default 7)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per point (default 20)")
    parser.add_argument("--skip-after", type=float, default=20.0,
                        help="do not run a path at larger n once a run takes (or would take) this long (default 20)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output stem: writes .md, .json and .png (default benchmarks/results/linear_attention_cpu, "
                             "with --quick ..._quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("linear_attention_cpu_quick" if args.quick else "linear_attention_cpu")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    repeats = 2 if args.quick else args.repeats
    command = "python benchmarks/bench_linear_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for var in ("ATTNEXPORT_LIBRARY", "ATTNEXPORT_CPU_ISA"):
        if os.environ.get(var):
            command = f"{var}={os.environ[var]} " + command

    info = machine(args.threads)
    print(f"CPU {info['cpu']}, kernel variant {info['isa']}, {args.threads} threads, onnxruntime {info['onnxruntime']}")
    all_paths = paths()
    for p in all_paths:
        p.check_error = check(p, args.threads)
        tol = 1e-4 if p.kind in ("kernel", "gemm") else 1e-3
        status = "ok" if p.check_error <= tol else "MISMATCH"
        print(f"check n={CHECK_N}: {p.name:<40} max rel. error {p.check_error:.1e} {status}")
        if p.check_error > tol:
            raise SystemExit(f"{p.name} does not compute what it should (error {p.check_error:.2e})")
    gemm_peak = peak_gemm(args.threads)
    print(f"peak sgemm (ORT MatMul 2048^3): {gemm_peak:.1f} GFLOP/s")

    points: dict[str, dict] = {}
    for n in lengths:
        rng = np.random.default_rng(n)
        qkv = tuple(rng.standard_normal((B, H, n, D)).astype(np.float32) for _ in range(3))
        points[str(n)] = {}
        for p in all_paths:
            if p.skipped_from is not None:
                continue
            point = time_point(p, n, qkv, args.threads, repeats, args.budget)
            points[str(n)][p.name] = point
            print(f"n={n:>6} {p.name:<40} {point['median_s'] * 1e3:10.2f} ms {point['note']}", flush=True)
            if n != lengths[-1]:
                nxt = lengths[lengths.index(n) + 1]
                scale = (nxt / n) ** (2 if p.quadratic else 1)
                if point["median_s"] > args.skip_after:
                    p.skipped_from, p.skip_reason = nxt, f"a run took {point['median_s']:.0f} s at n={n}"
                elif point["median_s"] * scale > args.skip_after:
                    p.skipped_from = nxt
                    p.skip_reason = (f"predicted {point['median_s'] * scale:.0f} s at n={nxt} "
                                     f"({'quadratic' if p.quadratic else 'linear'} from n={n}) > {args.skip_after:g} s")
                elif point["rss_growth_bytes"] * scale > available_bytes() / 2:
                    p.skipped_from = nxt
                    p.skip_reason = f"predicted memory at n={nxt} exceeds half of the available memory"
        del qkv
        gc.collect()

    info["load_after"] = os.getloadavg()
    report = {"machine": info, "peak_gemm_gflops": gemm_peak, "repeats": repeats, "lengths": lengths,
              "paths": [{"name": p.name, "causal": p.causal, "kind": p.kind, "short": p.short, "skipped_from": p.skipped_from,
                         "skip_reason": p.skip_reason, "check_error": p.check_error} for p in all_paths],
              "points": points, "command": command}
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=list))
    args.out.with_suffix(".md").write_text(markdown(report, command))
    wrote = [str(args.out.with_suffix(s)) for s in (".md", ".json")]
    if plot(report, args.out.with_suffix(".png")):
        wrote.append(str(args.out.with_suffix(".png")))
    print("wrote " + ", ".join(wrote))


if __name__ == "__main__":
    main()
