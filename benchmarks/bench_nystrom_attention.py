"""NystromAttention (attnexport CPU kernel) against ONNX Runtime's softmax attention, one run.

    python benchmarks/bench_nystrom_attention.py [--lengths 1024,4096,16384] [--landmarks 32,64] [--threads 2]

B=1, H=8, d=64, float32, non-causal (NystromAttention refuses causal). Paths in this one process, same
inputs: NystromAttention with m landmarks (segment means) and each solver (sketch, newton_schulz, direct),
and com.microsoft MultiHeadAttention (ORT's non-causal softmax attention). Before timing, the kernel is
checked at n = 96 against the numpy reference (attnexport/ops/nystrom_reference.py) and MultiHeadAttention
against exact softmax attention, so each row computes what its name says. Time = CPU time of the process
during a run / threads (idle ORT threads sleep), the median of 3 runs after a warm-up (the first run
alone when it takes > 2 s); wall time is kept too. Speed-up = MultiHeadAttention's time / the row's.
The approximation error of NystromAttention is not measured here (random Q/K are the worst case for a
low-rank method): see benchmarks/results/solver_cpu.md for it on real MiniLM heads.

Writes benchmarks/results/nystrom_attention_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import attnexport
from attnexport.ops import nystrom_reference
from attnexport.ops.reference import softmax_attention

H, D = 8, 64
RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("sketch", "newton_schulz", "direct")


def _session(node, layout: str, threads: int, library: bool) -> ort.InferenceSession:
    shape = [1, H, "n", D] if layout == "bhsd" else [1, "n", H * D]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in "qkv"]
    graph = helper.make_graph([node], "bench", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    imports = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("attnexport", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        options.register_custom_ops_library(attnexport.library_path())
    model = helper.make_model(graph, opset_imports=imports, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def nystrom(m: int, solver: str, threads: int):
    node = helper.make_node("NystromAttention", ["q", "k", "v"], ["y"], domain="attnexport", num_landmarks=m,
                            solver=solver)
    return _session(node, "bhsd", threads, True), "bhsd"


def mha(threads: int):
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H)
    return _session(node, "bsd", threads, False), "bsd"


def feeds(q, k, v, layout):
    if layout == "bhsd":
        return {"q": q, "k": k, "v": v}
    n = q.shape[2]
    return {name: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(1, n, H * D)) for name, x in zip("qkv", (q, k, v))}


def check(threads: int, landmarks) -> dict[str, float]:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 96, D)).astype(np.float32) for _ in range(3))
    out = {}
    for m in landmarks:
        for solver in SOLVERS:
            session, layout = nystrom(m, solver, threads)
            got = session.run(None, feeds(q, k, v, layout))[0]
            ref = nystrom_reference.nystrom_attention(q, k, v, num_landmarks=m, solver=solver)
            out[f"NystromAttention m={m} {solver} vs numpy"] = float(np.abs(got - ref).max())
    session, layout = mha(threads)
    got = session.run(None, feeds(q, k, v, layout))[0].reshape(1, 96, H, D).transpose(0, 2, 1, 3)
    out["MultiHeadAttention vs softmax"] = float(np.abs(got - softmax_attention(q, k, v)).max())
    return out


def time_session(session, feed, threads: int) -> dict:
    def once():
        wall, cpu = time.perf_counter(), time.process_time()
        session.run(None, feed)
        return time.perf_counter() - wall, time.process_time() - cpu

    first = once()
    runs = [first] if first[1] / threads > 2.0 else [once() for _ in range(3)]
    return {"seconds": statistics.median(c for _, c in runs) / threads,
            "wall_seconds": statistics.median(w for w, _ in runs), "runs": len(runs)}


def markdown(report) -> str:
    lines = [f"# NystromAttention vs ONNX Runtime softmax attention, CPU ({report['machine']['processor']})", "",
             f"Command: `{report['command']}`  ", f"onnxruntime {report['machine']['onnxruntime']}, "
             f"{report['threads']} threads, load before/after {report['machine']['load_before']} / "
             f"{report['machine']['load_after']}; B=1, H={H}, d={D}, float32, non-causal", "",
             "Checks at n = 96 (max abs difference): " + ", ".join(f"{k} {v:.1e}" for k, v in report["checks"].items()),
             "", "| n | path | seconds (CPU/threads) | wall | speed-up vs MHA |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"| {r['n']} | {r['path']} | {r['seconds']:.4f} | {r['wall_seconds']:.4f} | {speedup} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--landmarks", default="32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "nystrom_attention_cpu"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    landmarks = [int(x) for x in args.landmarks.split(",")]
    load_before = os.getloadavg()[0]
    checks = check(args.threads, landmarks)
    rows = []
    rng = np.random.default_rng(1)
    for n in lengths:
        q, k, v = (rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(3))
        session, layout = mha(args.threads)
        base = time_session(session, feeds(q, k, v, layout), args.threads)
        rows.append({"n": n, "path": "ORT MultiHeadAttention", **base, "speedup": None})
        print(f"n={n} MHA {base['seconds']:.3f}s", flush=True)
        for m in landmarks:
            for solver in SOLVERS:
                session, layout = nystrom(m, solver, args.threads)
                t = time_session(session, feeds(q, k, v, layout), args.threads)
                rows.append({"n": n, "path": f"NystromAttention m={m} {solver}", **t,
                             "speedup": base["seconds"] / t["seconds"]})
                print(f"n={n} m={m} {solver} {t['seconds']:.4f}s ({base['seconds'] / t['seconds']:.1f}x)", flush=True)
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "threads": args.threads,
              "machine": {"processor": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
                          "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)},
              "checks": checks, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
