"""attnexport's CUDA kernels against ONNX Runtime CUDA's fused softmax attention, float16, one run.

    python benchmarks/bench_cuda.py                 # B 1,4 x H 16,32 x d 64,128 x n 1k,4k,16k,64k
    python benchmarks/bench_cuda.py --quick         # B 1, H 16, d 64,128, n 1k,16k,64k
    python benchmarks/bench_cuda.py --lengths 16384 --batches 1 --heads 16 --dims 64

Needs a CUDA GPU, onnxruntime-gpu and the op library built with its CUDA part (scripts/gpu_check.sh
sets all of it up and runs this). Paths, all float16, inputs and outputs resident on the GPU through
IO binding (no host copy inside a timed run):

- attnexport LinearAttention elu1, non-causal and causal;
- attnexport SparseAttention, window 512 (non-causal: 512 keys each side; causal: 512 back), and with
  an unbounded window (the same kernel visiting every key tile: its work-skipping ratio);
- attnexport LseAttention, causal;
- ORT com.microsoft MultiHeadAttention, non-causal and unidirectional (flash / memory-efficient /
  cuDNN, whichever ORT picks), and GroupQueryAttention (causal), also with local_window_size=513 (the
  windowed causal computation; flash attention skips the blocks outside the window).

Before timing, every path is checked at n = 256 against numpy (float64 on the float16-rounded inputs),
and every timed output is checked finite. Timing: two warm-up runs, then the median of up to --repeats
runs within --budget seconds per point (ORT's run returns once the GPU is done; outputs are synchronised).
A softmax path whose predicted time at the next length (quadratic) passes --skip-after seconds is not run
there; skips are in the table.

TFLOP/s use each path's own count of multiply-adds x 2: softmax 4·B·H·Sq·keys·d (keys per row: n,
(n+1)/2 causal, the window's keys); LinearAttention 4·B·H·n·d·dv (the state and its read-out) plus the
causal intra-chunk products B·H·n·64·(d+dv); LseAttention the same with chunks of 32. GB/s: bytes of Q,
K, V read and Y written (GQA also writes its present K and V) over the time. Both next to the GPU's
datasheet peaks (H100 SXM: 989.4 dense float16 TFLOP/s, 3.35 TB/s) and to two ceilings measured in the
same run through ORT: a float16 MatMul 8192^3 (cuBLAS) and a device-to-device pass (Mul by 1 over 1 GiB).

Output: the table on stdout and benchmarks/results/cuda_<gpu>.{md,json}, with the GPU, driver, ORT
version and the summary the issue asks for (causal LinearAttention vs the fastest causal softmax path
at 16k and 64k; SparseAttention w=512 against full attention and the ideal n/(2w+1)).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attnexport  # noqa: E402
from attnexport.ops.reference import linear_attention, lse_attention, softmax_attention, sparse_attention  # noqa: E402

WINDOW = 512
PEAKS = {  # datasheet: dense float16 tensor TFLOP/s, memory TB/s
    "H100 SXM": (989.4, 3.35), "H100 80GB HBM3": (989.4, 3.35), "H100 PCIe": (756.0, 2.0), "H100 NVL": (835.0, 3.9),
    "H200": (989.4, 4.8), "A100-SXM4-80GB": (312.0, 2.04), "A100-SXM4-40GB": (312.0, 1.56), "A100": (312.0, 1.94),
    "L4": (121.0, 0.3), "A10": (125.0, 0.6),
}


def gpu_info() -> dict:
    info = {"name": "unknown", "driver": "?"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        name, driver, memory, clock = [s.strip() for s in out.splitlines()[0].split(",")]
        info.update(name=name, driver=driver, memory=memory, max_sm_clock=clock)
    except Exception as e:  # noqa: BLE001
        info["error"] = str(e)
    peak = next((v for k, v in sorted(PEAKS.items(), key=lambda kv: -len(kv[0])) if k in info["name"]), None)
    info["peak_tflops"], info["peak_tbs"] = peak if peak else (None, None)
    return info


# -- models --------------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, opsets):
    g = helper.make_graph(nodes, "bench", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT16, None)
                                                   if o != "present_state" else
                                                   helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                   for o in outputs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=9).SerializeToString()


def _vi(name, dims, elem=TensorProto.FLOAT16):
    return helper.make_tensor_value_info(name, elem, dims)


@dataclass
class Shape:
    b: int
    h: int
    n: int
    d: int


@dataclass
class PathSpec:
    name: str
    kind: str  # "ours" or "softmax"
    causal: bool
    build: object  # Shape -> model bytes
    feeds: object  # (Shape, q, k, v in [B, H, n, d]) -> dict of numpy arrays
    unpack: object  # outputs -> y [B, H, n, d]
    reference: object  # (q, k, v) float64 -> y
    flops: object  # Shape -> float
    bytes_: object  # Shape -> float
    quadratic: bool = False


def _packed(x):  # [B, H, n, D] -> [B, n, H*D]
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def _unpacked(y, h):
    return y.reshape(y.shape[0], y.shape[1], h, -1).transpose(0, 2, 1, 3)


def _qkv_bytes(s: Shape, extra=0.0):
    return 2.0 * s.b * s.h * s.n * s.d * 4 + extra


def ours(op: str, name: str, causal: bool, flops, **attrs) -> PathSpec:
    def build(s: Shape):
        outputs = ["y", "present_state"] if op == "LseAttention" else ["y"]
        node = helper.make_node(op, ["q", "k", "v"], outputs, domain="attnexport", causal=int(causal), **attrs)
        return _model([node], [_vi(x, [s.b, s.h, s.n, s.d]) for x in "qkv"], outputs, [("", 18), ("attnexport", 1)])

    def reference(q, k, v):
        if op == "LinearAttention":
            return linear_attention(q, k, v, causal=int(causal), **attrs)
        if op == "LseAttention":
            return lse_attention(q, k, v, causal=int(causal))
        return sparse_attention(q, k, v, causal=int(causal), **attrs)

    return PathSpec(name, "ours", causal, build, lambda s, q, k, v: {"q": q, "k": k, "v": v}, lambda out, s: out[0],
                    reference, flops, _qkv_bytes)


def mha(causal: bool) -> PathSpec:
    def build(s: Shape):
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=s.h,
                                unidirectional=int(causal))
        return _model([node], [_vi(x, [s.b, s.n, s.h * s.d]) for x in "qkv"], ["y"], [("", 18), ("com.microsoft", 1)])

    return PathSpec("ORT MultiHeadAttention" + (" unidirectional" if causal else ""), "softmax", causal, build,
                    lambda s, q, k, v: {"q": _packed(q), "k": _packed(k), "v": _packed(v)},
                    lambda out, s: _unpacked(out[0], s.h), lambda q, k, v: softmax_attention(q, k, v, causal=int(causal)),
                    lambda s:                     (2.0 if causal else 4.0) * s.b * s.h * s.n * s.n * s.d, _qkv_bytes, quadratic=True)


def gqa(window: int | None) -> PathSpec:
    def build(s: Shape):
        inputs = [_vi(x, [s.b, s.n, s.h * s.d]) for x in "qkv"] + [
            _vi("seqlens_k", [s.b], TensorProto.INT32), _vi("total", [1], TensorProto.INT32)]
        attrs = {"local_window_size": window + 1} if window else {}
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
                                ["y", "present_k", "present_v"], domain="com.microsoft", num_heads=s.h, kv_num_heads=s.h,
                                **attrs)
        return _model([node], inputs, ["y", "present_k", "present_v"], [("", 18), ("com.microsoft", 1)])

    def feeds(s, q, k, v):
        return {"q": _packed(q), "k": _packed(k), "v": _packed(v), "seqlens_k": np.full([s.b], s.n - 1, np.int32),
                "total": np.array([s.n], np.int32)}

    keys = (lambda s: min(s.n, window + 1)) if window else (lambda s: (s.n + 1) / 2)
    ref = ((lambda q, k, v: sparse_attention(q, k, v, causal=1, window_left=window)) if window
           else (lambda q, k, v: softmax_attention(q, k, v, causal=1)))
    return PathSpec("ORT GroupQueryAttention" + (f" local {window + 1}" if window else ""), "softmax", True, build, feeds,
                    lambda out, s: _unpacked(out[0], s.h), ref, lambda s: 4.0 * s.b * s.h * s.n * keys(s) * s.d,
                    lambda s: _qkv_bytes(s, extra=2.0 * s.b * s.h * s.n * s.d * 2), quadratic=window is None)


def paths() -> list[PathSpec]:
    la_flops = lambda s: 4.0 * s.b * s.h * s.n * s.d * s.d  # noqa: E731
    return [
        ours("LinearAttention", "attnexport LinearAttention", False, la_flops, feature_map="elu1"),
        ours("LinearAttention", "attnexport LinearAttention causal", True,
             lambda s: la_flops(s) + s.b * s.h * s.n * 64.0 * 2 * s.d, feature_map="elu1"),
        ours("SparseAttention", f"attnexport SparseAttention w{WINDOW}", False,
             lambda s: 4.0 * s.b * s.h * s.n * min(s.n, 2 * WINDOW + 1) * s.d, window_left=WINDOW, window_right=WINDOW),
        ours("SparseAttention", f"attnexport SparseAttention w{WINDOW} causal", True,
             lambda s: 4.0 * s.b * s.h * s.n * min(s.n, WINDOW + 1) * s.d, window_left=WINDOW),
        ours("SparseAttention", "attnexport SparseAttention full", False, lambda s: 4.0 * s.b * s.h * s.n * s.n * s.d),
        ours("LseAttention", "attnexport LseAttention causal", True,
             lambda s: la_flops(s) + s.b * s.h * s.n * 32.0 * 2 * s.d),
        mha(False), mha(True), gqa(None), gqa(WINDOW),
    ]


# -- running -------------------------------------------------------------------------------------------

def session(model: bytes, with_library: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if with_library:
        so.register_custom_ops_library(attnexport.library_path())
    sess = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError("ORT did not give this session the CUDA provider")
    return sess


def bound(sess, feeds):
    io = sess.io_binding()
    for name, arr in feeds.items():
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda")
    return io


def timed(sess, io, repeats: int, budget: float) -> list[float]:
    for _ in range(2):
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    return times


_POOL = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float16)


def random_half(shape) -> np.ndarray:
    """Random float16 data (normal), without drawing a number per element: a pool of 4M, repeated."""
    return np.resize(_POOL, int(np.prod(shape))).reshape(shape)


def check_paths(all_paths: list[PathSpec]) -> dict[str, str]:
    """Each path at n = 256 against numpy; returns failures by path name."""
    s = Shape(1, 2, 256, 64)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((s.b, s.h, s.n, s.d)).astype(np.float16) for _ in range(3))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    bad = {}
    for p in all_paths:
        try:
            sess = session(p.build(s), p.kind == "ours")
            out = sess.run(None, p.feeds(s, q, k, v))
            y = np.asarray(p.unpack(out, s), np.float64)
            ref = p.reference(q64, k64, v64)
            err = float(np.abs(y - ref).max() / max(1.0, np.abs(ref).max()))
            if not np.isfinite(y).all() or err > 5e-3:
                bad[p.name] = f"check at n=256 failed: rel error {err:.2e}"
        except Exception as e:  # noqa: BLE001
            bad[p.name] = f"check at n=256 failed: {str(e).splitlines()[0][:160]}"
    return bad


def ceilings() -> dict:
    """A float16 MatMul 8192^3 (cuBLAS) and a 1 GiB elementwise pass, through ORT on the GPU."""
    res = {}
    try:
        n = 8192
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        model = helper.make_model(helper.make_graph([node], "mm", [_vi("a", [n, n]), _vi("b", [n, n])], [_vi("c", [n, n])]),
                                  opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()
        sess = session(model, False)
        io = bound(sess, {"a": random_half((n, n)), "b": random_half((n, n))})
        t = statistics.median(timed(sess, io, 20, 3.0))
        res["matmul_tflops"] = 2.0 * n ** 3 / t / 1e12
        m = 1 << 29  # 1 GiB of float16
        node = helper.make_node("Mul", ["x", "one"], ["y"])
        one = helper.make_tensor("one", TensorProto.FLOAT16, [1], np.array([1.0], np.float16).tobytes(), raw=True)
        model = helper.make_model(helper.make_graph([node], "copy", [_vi("x", [m])], [_vi("y", [m])], initializer=[one]),
                                  opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()
        sess = session(model, False)
        io = bound(sess, {"x": random_half((m,))})
        t = statistics.median(timed(sess, io, 20, 3.0))
        res["copy_tbs"] = 2.0 * m * 2 / t / 1e12
    except Exception as e:  # noqa: BLE001
        res["error"] = str(e).splitlines()[0][:200]
    return res


@dataclass
class Row:
    path: str
    b: int
    h: int
    d: int
    n: int
    ms: float | None = None
    tflops: float | None = None
    tbs: float | None = None
    note: str = ""
    times: list = field(default_factory=list)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--heads", default="16,32")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per point")
    ap.add_argument("--skip-after", type=float, default=2.0, help="skip a softmax point predicted slower than this")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/cuda_<gpu>)")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.heads, args.dims, args.lengths = "1", "16", "64,128", "1024,16384,65536"
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"no CUDAExecutionProvider in onnxruntime {ort.__version__}: install onnxruntime-gpu (scripts/gpu_check.sh)")
        return 2
    gpu = gpu_info()
    all_paths = paths()
    print(f"GPU: {gpu.get('name')} (driver {gpu.get('driver')}), onnxruntime {ort.__version__}, "
          f"op library {attnexport.library_path()}", flush=True)
    failures = check_paths(all_paths)
    for name, why in failures.items():
        print(f"  {name}: {why}", flush=True)
    ceil = ceilings()
    print(f"measured ceilings: {ceil}", flush=True)

    rows: list[Row] = []
    for b in ints(args.batches):
        for h in ints(args.heads):
            for d in ints(args.dims):
                last: dict[str, float] = {}
                for n in ints(args.lengths):
                    s = Shape(b, h, n, d)
                    q = random_half((b, h, n, d))
                    k = random_half((b, h, n, d))
                    v = random_half((b, h, n, d))
                    for p in all_paths:
                        row = Row(p.name, b, h, d, n)
                        rows.append(row)
                        if p.name in failures:
                            row.note = "failed its check"
                            continue
                        prev = last.get(p.name)
                        if p.quadratic and prev is not None and prev[1] * (n / prev[0]) ** 2 > args.skip_after:
                            row.note = f"skipped (predicted {prev[1] * (n / prev[0]) ** 2:.1f} s)"
                            continue
                        try:
                            sess = session(p.build(s), p.kind == "ours")
                            io = bound(sess, p.feeds(s, q, k, v))
                            times = timed(sess, io, args.repeats, args.budget)
                            y = io.copy_outputs_to_cpu()[0]
                            if not np.isfinite(y.astype(np.float32)).all():
                                row.note = "NON-FINITE OUTPUT"
                            t = statistics.median(times)
                            row.ms, row.times = t * 1e3, times
                            row.tflops = p.flops(s) / t / 1e12
                            row.tbs = p.bytes_(s) / t / 1e12
                            last[p.name] = (n, t)
                            del sess, io
                        except Exception as e:  # noqa: BLE001
                            row.note = "error: " + str(e).splitlines()[0][:120]
                        print(f"B={b} H={h} d={d} n={n:6d}  {p.name:42s} "
                              + (f"{row.ms:10.3f} ms {row.tflops:8.1f} TFLOP/s {row.tbs * 1e3:8.0f} GB/s" if row.ms else "")
                              + f" {row.note}", flush=True)

    summary = summarize(rows)
    write(rows, summary, gpu, ceil, failures, args)
    print("\n".join(summary))
    return 0


def summarize(rows: list[Row]) -> list[str]:
    by = {(r.path, r.b, r.h, r.d, r.n): r for r in rows}
    lines = ["", "summary (float16):"]
    for (path, b, h, d, n), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if path != "attnexport LinearAttention causal" or r.ms is None:
            continue
        causal = [by.get((p, b, h, d, n)) for p in ("ORT MultiHeadAttention unidirectional", "ORT GroupQueryAttention")]
        causal = [c for c in causal if c and c.ms]
        if causal:
            best = min(causal, key=lambda c: c.ms)
            need = {16384: 5, 65536: 20}.get(n)
            verdict = "" if need is None else (" (>= %d: %s)" % (need, "yes" if best.ms / r.ms >= need else "NO"))
            lines.append(f"  causal LinearAttention B={b} H={h} d={d} n={n}: {best.ms / r.ms:.1f}x faster than "
                         f"{best.path} ({best.ms:.2f} ms vs {r.ms:.3f} ms){verdict}")
    for (path, b, h, d, n), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if path != f"attnexport SparseAttention w{WINDOW}" or r.ms is None or n < 4 * WINDOW:
            continue
        ideal = n / (2 * WINDOW + 1)
        for full_name in ("ORT MultiHeadAttention", "attnexport SparseAttention full"):
            full = by.get((full_name, b, h, d, n))
            if full and full.ms:
                ratio = full.ms / r.ms
                lines.append(f"  SparseAttention w{WINDOW} B={b} H={h} d={d} n={n}: {ratio:.1f}x faster than {full_name}; "
                             f"ideal n/(2w+1) = {ideal:.1f}; {100 * ratio / ideal:.0f}% of ideal")
    nonfinite = [r for r in rows if "NON-FINITE" in r.note]
    lines.append(f"  non-finite outputs: {len(nonfinite)}")
    return lines


def write(rows, summary, gpu, ceil, failures, args):
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in gpu.get("name", "gpu")).strip("_").lower() or "gpu"
    stem = Path(args.out) if args.out else out_dir / f"cuda_{slug}"
    meta = {"gpu": gpu, "onnxruntime": ort.__version__, "python": platform.python_version(), "ceilings": ceil,
            "check_failures": failures, "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [r.__dict__ for r in rows],
                                                     "summary": summary}, indent=1))
    peak_t, peak_b = gpu.get("peak_tflops"), gpu.get("peak_tbs")
    lines = [f"# attnexport CUDA kernels vs ONNX Runtime CUDA attention ({gpu.get('name')})", "",
             f"`python benchmarks/bench_cuda.py {' '.join(sys.argv[1:])}` on {meta['date']}: onnxruntime {ort.__version__}, "
             f"driver {gpu.get('driver')}. float16, inputs and outputs on the GPU (IO binding), median of timed runs.", "",
             f"Peaks: datasheet {peak_t} TFLOP/s dense float16, {peak_b} TB/s; measured here: "
             f"MatMul 8192^3 {ceil.get('matmul_tflops', float('nan')):.0f} TFLOP/s, device pass "
             f"{ceil.get('copy_tbs', float('nan')):.2f} TB/s.", "",
             "| B | H | d | n | path | ms | TFLOP/s | % peak | TB/s | % peak | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pt = f"{100 * r.tflops / peak_t:.0f}" if r.tflops and peak_t else ""
        pb = f"{100 * r.tbs / peak_b:.0f}" if r.tbs and peak_b else ""
        lines.append(f"| {r.b} | {r.h} | {r.d} | {r.n} | {r.path} | {'' if r.ms is None else f'{r.ms:.3f}'} | "
                     f"{'' if r.tflops is None else f'{r.tflops:.1f}'} | {pt} | {'' if r.tbs is None else f'{r.tbs:.2f}'} | "
                     f"{pb} | {r.note} |")
    lines += ["", "```", *summary, "```", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    sys.exit(main())
