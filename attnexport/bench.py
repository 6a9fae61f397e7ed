"""bench: time an original and a converted model on the same inputs, side by side.

Each (model, sequence length) point runs in its own subprocess, so its peak resident memory is its own
(ru_maxrss of the child) and a point that runs out of memory or time does not take the others down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER_TIMEOUT_S = 600


def bench_pair(original: str, converted: str, seq_lens: list[int], *, batch: int = 1, threads: int | None = None,
               repeat: int = 5) -> list[dict]:
    rows = []
    for n in seq_lens:
        a = _point(original, n, batch, threads, repeat, with_library=False)
        b = _point(converted, n, batch, threads, repeat, with_library=True)
        row = {"seq_len": n, "original": a, "converted": b}
        if a.get("median_ms") and b.get("median_ms"):
            row["speedup"] = a["median_ms"] / b["median_ms"]
        rows.append(row)
    return rows


def _point(model: str, seq_len: int, batch: int, threads: int | None, repeat: int, *, with_library: bool) -> dict:
    command = [sys.executable, "-m", "attnexport.bench", os.path.abspath(model), str(seq_len), str(batch),
               str(threads or 0), str(repeat), "1" if with_library else "0"]
    try:
        # From a neutral directory: `python -m` puts the working directory first on sys.path, and a
        # source checkout there would shadow the installed package (and its built library).
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        message = (done.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": message[:200]}
    return json.loads(lines[-1])


def _worker(model: str, seq_len: int, batch: int, threads: int, repeat: int, with_library: bool) -> dict:
    import resource

    from attnexport import inputs, model_io
    from attnexport.runtime import create_session

    ir_model = model_io.load(model)
    feeds = inputs.synthesize(ir_model, inputs.ProbeShape(batch=batch, seq_len=seq_len))
    session = create_session(model, with_library=with_library, threads=threads or None)
    accepted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in accepted}
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "peak_mb": peak_kb / 1024.0,
            "runs": len(times), "threads": threads or os.cpu_count()}


if __name__ == "__main__":
    model_path, n, b, t, r, lib = sys.argv[1:7]
    print(json.dumps(_worker(model_path, int(n), int(b), int(t), int(r), lib == "1")))
