"""The sketch-preconditioned least-squares solver (attnexport.linalg) against numpy.linalg.lstsq and
plain CGLS, and the choice of NystromAttention's landmark solver. One run, one process:

    python benchmarks/bench_solver.py            # full run (a few minutes on 2 busy cores)
    python benchmarks/bench_solver.py --quick    # small shapes, smoke test

1. Tall regressions of the shapes calibration produces (rows x features, 4 right-hand sides), with
   Gaussian features (well conditioned) and with columns scaled to condition 1e6: time, iterations,
   relative residual ‖Ax − b‖/‖b‖ and the gap to lstsq's residual (a least-squares solution has the
   smallest residual; gap = (res − res_lstsq)/res_lstsq). CGLS gets at most min(10·p, 300) iterations.
2. Landmark kernels M = softmax(L_q L_kᵀ/√d) (m = 32..256) from random Q/K and from real
   all-MiniLM-L6-v2 queries and keys (one pydoc passage, every layer and head): their condition, and
   the consistent system M X = M X₀ solved by each method — relative residual, and whether the
   normal equations (numpy solve of MᵀM) or CGLS fail where the sketch solver does not.
3. NystromAttention's solver on real MiniLM queries/keys/values: relative error of Y against exact
   softmax attention and the time of the m x m solve, for sketch / direct (ridge 1e-2) and
   newton_schulz (6 iterations), plus the forward error of the regularised solution at small ridge
   (sketch vs the Cholesky normal equations of "direct", against an SVD solution).

Writes benchmarks/results/solver_cpu.{md,json} with the command, the machine's load and numpy's BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from attnexport.linalg import cgls, lstsq
from attnexport.ops import nystrom_reference as ny
from attnexport.ops.reference import softmax_attention

RESULTS = Path(__file__).resolve().parent / "results"
CGLS_MAX_ITER = 300


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def relative_residual(a, x, b) -> float:
    return float(np.linalg.norm(a @ x - b) / np.linalg.norm(b))


# -- 1. tall regressions ---------------------------------------------------------------------------

def tall_rows(shapes, rhs: int, seed: int = 0) -> list[dict]:
    rows = []
    rng = np.random.default_rng(seed)
    for n, p in shapes:
        for condition in (1.0, 1e6):
            a = rng.standard_normal((n, p))
            if condition > 1:
                a *= np.geomspace(1.0, 1.0 / condition, p)
            b = a @ rng.standard_normal((p, rhs)) + 0.1 * rng.standard_normal((n, rhs))
            t_np, (x_np, *_ ) = timed(lambda: np.linalg.lstsq(a, b, rcond=None))
            res_np = relative_residual(a, x_np, b)
            t_sk, (x_sk, info_sk) = timed(lambda: lstsq(a, b))
            t_cg, (x_cg, info_cg) = timed(lambda: cgls(a, b, tol=1e-10, max_iter=min(10 * p, CGLS_MAX_ITER)))
            for name, t, x, it, ok in (("numpy.linalg.lstsq", t_np, x_np, None, True),
                                       ("sketch lstsq", t_sk, x_sk, info_sk.iterations, info_sk.converged),
                                       ("CGLS", t_cg, x_cg, info_cg.iterations, info_cg.converged)):
                res = relative_residual(a, x, b)
                rows.append({"rows": n, "cols": p, "rhs": rhs, "condition": condition, "method": name,
                             "seconds": t, "iterations": it, "converged": ok, "residual": res,
                             "gap_to_lstsq": (res - res_np) / res_np, "speedup_vs_lstsq": t_np / t})
            print(f"  {n} x {p} cond {condition:g}: lstsq {t_np:.2f}s, sketch {t_sk:.2f}s "
                  f"({info_sk.iterations} it), CGLS {t_cg:.2f}s ({info_cg.iterations} it, converged {info_cg.converged})",
                  flush=True)
    return rows


# -- 2. landmark kernels -----------------------------------------------------------------------------

def minilm_qkv(max_passages: int = 1):
    """Queries, keys, values [layers*heads, n, 32] of all-MiniLM-L6-v2 on pydoc passages (>= 128 tokens)."""
    import torch
    from transformers import BertModel

    from attnexport import fidelity

    model = BertModel.from_pretrained(str(fidelity.minilm_dir()), attn_implementation="eager").eval()
    texts = fidelity.passages(min_tokens=128).evaluation[:max_passages]
    captured = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        for part in ("query", "key", "value"):
            module = getattr(layer.attention.self, part)
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, key=(index, part): captured.__setitem__(key, out.detach().numpy())))
    heads = model.config.num_attention_heads
    tokens = fidelity.tokenizer()(texts, truncation=True, max_length=fidelity.MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        model(**tokens)
    for h in hooks:
        h.remove()

    def split(x):  # [1, n, H*d] -> [H, n, d]
        n = x.shape[1]
        return x[0].reshape(n, heads, -1).transpose(1, 0, 2)

    layers = len(model.encoder.layer)
    q = np.concatenate([split(captured[(i, "query")]) for i in range(layers)])
    k = np.concatenate([split(captured[(i, "key")]) for i in range(layers)])
    v = np.concatenate([split(captured[(i, "value")]) for i in range(layers)])
    return q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)


def landmark_kernel(q, k, m):
    d = q.shape[-1]
    lq, lk = ny.landmarks(q, m), ny.landmarks(k, m)
    return ny.softmax_rows(lq @ lk.T / np.sqrt(d))


def landmark_rows(sources: dict, sizes) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    for source, (qs, ks) in sources.items():
        for m in sizes:
            if m > min(qs.shape[1], ks.shape[1]):
                continue
            stats = {"sketch": [], "normal equations": [], "CGLS": [], "numpy.linalg.lstsq": []}
            conds, times = [], {key: 0.0 for key in stats}
            iterations = {"sketch": [], "CGLS": []}
            for head in range(qs.shape[0]):
                kernel = landmark_kernel(qs[head], ks[head], m)
                conds.append(np.linalg.cond(kernel))
                b = kernel @ rng.standard_normal((m, 8))
                t, (x, info) = timed(lambda: lstsq(kernel, b))
                stats["sketch"].append(info.residual)
                times["sketch"] += t
                iterations["sketch"].append(info.iterations)
                t, x = timed(lambda: np.linalg.solve(kernel.T @ kernel, kernel.T @ b))
                stats["normal equations"].append(relative_residual(kernel, x, b))
                times["normal equations"] += t
                t, (x, info) = timed(lambda: cgls(kernel, b, tol=1e-10))
                stats["CGLS"].append(info.residual)
                times["CGLS"] += t
                iterations["CGLS"].append(info.iterations)
                t, (x, *_) = timed(lambda: np.linalg.lstsq(kernel, b, rcond=None))
                stats["numpy.linalg.lstsq"].append(relative_residual(kernel, x, b))
                times["numpy.linalg.lstsq"] += t
            for method, residuals in stats.items():
                rows.append({"source": source, "m": m, "systems": len(conds),
                             "median_condition": float(np.median(conds)), "max_condition": float(np.max(conds)),
                             "method": method, "median_residual": float(np.median(residuals)),
                             "worst_residual": float(np.max(residuals)),
                             "solved_below_1e-8": int(np.sum(np.asarray(residuals) < 1e-8)),
                             "mean_iterations": float(np.mean(iterations[method])) if method in iterations else None,
                             "ms_per_system": 1e3 * times[method] / len(conds)})
            print(f"  {source} m={m}: median cond {np.median(conds):.2e}", flush=True)
    return rows


# -- 3. the NystromAttention solver choice -----------------------------------------------------------

def nystrom_rows(q, k, v, sizes) -> list[dict]:
    rows = []
    heads = q.shape[0]
    exact = softmax_attention(q[None], k[None], v[None])[0]
    configs = [("sketch", {"ridge": 1e-2}), ("direct", {"ridge": 1e-2}), ("newton_schulz", {"newton_iterations": 6})]
    for m in sizes:
        if m > q.shape[1]:
            continue
        for solver, kw in configs:
            errors, solve_seconds = [], 0.0
            for head in range(heads):
                lq, lk = ny.landmarks(q[head], m), ny.landmarks(k[head], m)
                s = 1.0 / np.sqrt(q.shape[-1])
                kernel = ny.softmax_rows(s * lq @ lk.T)
                rhs = ny.softmax_rows(s * lq @ k[head].T) @ v[head]
                t, x = timed(lambda: ny.solve_landmark_system(kernel, rhs, solver, **kw), repeats=3)
                solve_seconds += t
                y = ny.softmax_rows(s * q[head] @ lk.T) @ x
                errors.append(np.linalg.norm(y - exact[head]) / np.linalg.norm(exact[head]))
            rows.append({"m": m, "solver": solver, **kw, "heads": heads, "mean_rel_error": float(np.mean(errors)),
                         "worst_rel_error": float(np.max(errors)), "ms_per_solve": 1e3 * solve_seconds / heads})
        print(f"  nystrom m={m} done", flush=True)
    return rows


def ridge_rows(q, k, m: int) -> list[dict]:
    """Forward error of the regularised landmark solution at small ridge: sketch vs Cholesky normal equations."""
    rows = []
    rng = np.random.default_rng(2)
    for ridge in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12):
        errs = {"sketch": [], "direct": []}
        for head in range(q.shape[0]):
            kernel = landmark_kernel(q[head], k[head], m)
            rhs = rng.standard_normal((m, 4))
            stacked = np.concatenate([kernel, np.sqrt(ridge) * np.eye(m)])
            truth = np.linalg.lstsq(stacked, np.concatenate([rhs, np.zeros((m, 4))]), rcond=None)[0]
            for solver in errs:
                try:
                    x = ny.solve_landmark_system(kernel, rhs, solver, ridge=ridge)
                    errs[solver].append(np.linalg.norm(x - truth) / np.linalg.norm(truth))
                except np.linalg.LinAlgError:
                    errs[solver].append(float("inf"))
        for solver, e in errs.items():
            rows.append({"m": m, "ridge": ridge, "solver": solver, "median_forward_error": float(np.median(e)),
                         "worst_forward_error": float(np.max(e))})
    return rows


def markdown(report) -> str:
    lines = [f"# Sketch-preconditioned solver, CPU ({report['machine']['processor']})", "",
             f"Command: `{report['command']}`  ", f"numpy {report['machine']['numpy']}, load before/after "
             f"{report['machine']['load_before']} / {report['machine']['load_after']} (shared 2-core machine: "
             "timings are noisy; ratios are from the same run)", "",
             "## 1. Tall regressions (4 right-hand sides)", "",
             "| rows x cols | condition | method | seconds | iterations | converged | rel. residual | gap to lstsq | speed-up vs lstsq |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["tall"]:
        lines.append(f"| {r['rows']} x {r['cols']} | {r['condition']:g} | {r['method']} | {r['seconds']:.3f} | "
                     f"{'' if r['iterations'] is None else r['iterations']} | {r['converged']} | {r['residual']:.6g} | "
                     f"{r['gap_to_lstsq']:.1e} | {r['speedup_vs_lstsq']:.2f}x |")
    lines += ["", "## 2. Landmark kernels M = softmax(L_q L_kᵀ/√d), consistent systems M X = B", "",
              "| source | m | systems | median cond | max cond | method | median rel. residual | worst | solved < 1e-8 | mean iterations | ms / system |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["landmark"]:
        it = "" if r["mean_iterations"] is None else f"{r['mean_iterations']:.1f}"
        lines.append(f"| {r['source']} | {r['m']} | {r['systems']} | {r['median_condition']:.1e} | {r['max_condition']:.1e} | "
                     f"{r['method']} | {r['median_residual']:.1e} | {r['worst_residual']:.1e} | "
                     f"{r['solved_below_1e-8']}/{r['systems']} | {it} | {r['ms_per_system']:.2f} |")
    lines += ["", "## 3. NystromAttention's landmark solver on real MiniLM heads (error of Y vs softmax attention)", "",
              "| m | solver | mean rel. error | worst | ms / solve |", "|---|---|---|---|---|"]
    for r in report["nystrom"]:
        extra = f" (ridge {r['ridge']:g})" if "ridge" in r else f" ({r['newton_iterations']} it)"
        lines.append(f"| {r['m']} | {r['solver']}{extra} | {r['mean_rel_error']:.3f} | {r['worst_rel_error']:.3f} | "
                     f"{r['ms_per_solve']:.2f} |")
    lines += ["", "Forward error of the regularised solution (vs an SVD solution of the stacked system):", "",
              "| m | ridge | solver | median | worst |", "|---|---|---|---|---|"]
    for r in report["ridge"]:
        lines.append(f"| {r['m']} | {r['ridge']:g} | {r['solver']} | {r['median_forward_error']:.1e} | "
                     f"{r['worst_forward_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "solver_cpu"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    shapes = [(20000, 64), (5000, 128)] if args.quick else [(200000, 64), (50000, 384), (20000, 1024)]
    sizes = [16, 32] if args.quick else [32, 64, 128, 256]
    print("tall regressions", flush=True)
    tall = tall_rows(shapes, rhs=4)
    rng = np.random.default_rng(3)
    print("MiniLM queries and keys", flush=True)
    mq, mk, mv = minilm_qkv()
    n_random = 256 if args.quick else 1024
    sources = {"random Q/K (n=%d, d=64)" % n_random: (rng.standard_normal((4, n_random, 64)),
                                                      rng.standard_normal((4, n_random, 64))),
               f"MiniLM Q/K (n={mq.shape[1]}, d={mq.shape[2]}, {mq.shape[0]} heads)": (mq, mk)}
    print("landmark kernels", flush=True)
    landmark = landmark_rows(sources, sizes)
    print("nystrom solver choice", flush=True)
    nystrom = nystrom_rows(mq, mk, mv, [8, 16] if args.quick else [16, 32, 64, 128])
    ridge = ridge_rows(mq, mk, 16 if args.quick else 64)
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "machine": {"processor": platform.processor() or platform.machine(), "numpy": np.__version__,
                          "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)},
              "tall": tall, "landmark": landmark, "nystrom": nystrom, "ridge": ridge}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
