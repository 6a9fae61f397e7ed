"""attnexport command line: inspect, convert, calibrate, verify, bench.

Every problem a user can cause ends in one line, `attnexport: error: …`, and a non-zero exit code; a
traceback appears only with --debug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from attnexport import __version__
from attnexport.errors import AttnExportError

# Piped output (files, CI logs, tests) has no terminal width; tables fold at 80 columns unless widened.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


class _Guarded(click.Group):
    """Turns attnexport's errors (and unexpected ones) into one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnExportError as e:
            err_console.print(f"attnexport: error: {e}", markup=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # pragma: no cover - the message is what matters
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err_console.print(f"attnexport: internal error: {type(e).__name__}: {first} (rerun with --debug for the "
                              "traceback)", markup=False, soft_wrap=True)
            sys.exit(3)


@click.group(cls=_Guarded)
@click.version_option(__version__, prog_name="attnexport")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def main(ctx, debug):
    """Replace softmax attention in ONNX models with efficient attention operators."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _feeds(inputs_path):
    if inputs_path is None:
        return None
    from attnexport.verification import load_feeds

    return load_feeds(inputs_path)


# -- inspect -------------------------------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help="Probe with these inputs (.npz) instead of synthesised ones.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, inputs_path, as_json):
    """List the attention sites of MODEL and whether each can be replaced."""
    from attnexport.api import inspect as find
    from attnexport.methods import METHODS

    sites = find(model, feeds=_feeds(inputs_path))
    if as_json:
        rows = []
        for s in sites:
            row = s.to_dict()
            row["methods"] = {name: (m.unsupported(s) if s.replaceable else s.reason) or "ok" for name, m in METHODS.items()}
            rows.append(row)
        click.echo(json.dumps({"model": model, "sites": rows}, indent=2))
        return
    if not sites:
        console.print(f"{model}: no softmax attention found")
        return
    table = Table(title=f"{model}: {len(sites)} attention site(s)")
    for column in ("#", "name", "source", "heads", "kv heads", "head dim", "scale", "mask", "replaceable"):
        table.add_column(column, overflow="fold")
    for s in sites:
        verdicts = []
        if s.replaceable:
            for name, method in METHODS.items():
                why = method.unsupported(s)
                verdicts.append(f"{name}: yes" if why is None else f"{name}: no — {why}")
        else:
            verdicts.append(f"no — {s.reason}")
        table.add_row(str(s.index), s.name, s.source, str(s.num_heads or "?"), str(s.num_kv_heads or "?"),
                      str(s.head_dim or "?"), f"{s.scale:.4g}" if s.scale else "?", s.mask.describe(), "\n".join(verdicts))
    console.print(table)


# -- convert -------------------------------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output path (default: MODEL.<method>.onnx).")
@click.option("--method", default="linear", show_default=True, help="Replacement method.")
@click.option("--feature-map", default="elu1", show_default=True,
              type=click.Choice(["elu1", "relu", "taylor2", "favor"]), help="Linear attention's feature map.")
@click.option("--expansion-point", default="zero", show_default=True, type=click.Choice(["zero", "mean", "max"]),
              help="taylor2: where exp is expanded, per query row.")
@click.option("--num-features", type=int, help="favor: number of random features (default 2 * head dim).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random draws (favor, sparse random blocks), recorded.")
@click.option("--eps", type=float, default=1e-6, show_default=True, help="Added to linear attention's normaliser.")
@click.option("--window", help="sparse, clustered: one-sided window W (2W+1 keys, W+1 on causal sites) or 'full' "
              "(sparse's default: the site's own pattern; clustered needs it).")
@click.option("--dilation", type=int, default=1, show_default=True,
              help="sparse, clustered: every D-th key of the window.")
@click.option("--global", "num_global", type=int, default=0, show_default=True,
              help="sparse, clustered: the first G positions attend and are attended everywhere.")
@click.option("--clusters", "num_clusters", type=int,
              help="clustered: k-means clusters per (batch, kv head) standing in for the keys outside the window.")
@click.option("--iterations", type=int, default=10, show_default=True, help="clustered: Lloyd iterations of k-means.")
@click.option("--cluster", "cluster", default="keys", show_default=True, type=click.Choice(["keys", "queries"]),
              help="clustered: cluster the far keys, or the queries (fast-transformers' clustered attention).")
@click.option("--centroids", "centroids_path", type=click.Path(exists=True, dir_okay=False),
              help="clustered: fitted centres (.npz), array 'site<i>' [kv heads, clusters, head dim] for site #i of "
                   "`attnexport inspect`; needed by causal sites, used as fixed centres where given.")
@click.option("--random-blocks", type=int, default=0, show_default=True,
              help="sparse: BigBird random key blocks per query block (needs --block-size).")
@click.option("--block-size", type=int, default=0, show_default=True, help="sparse: block size of the random blocks.")
@click.option("--causal-only", is_flag=True, help="sparse: replace causal sites only.")
@click.option("--landmarks", "num_landmarks", type=int, default=64, show_default=True,
              help="nystrom: landmarks per head (>= the number of keys: exact).")
@click.option("--landmark-method", default="segment_means", show_default=True,
              type=click.Choice(["segment_means", "kmeans"]), help="nystrom: how landmarks are chosen.")
@click.option("--solver", default="sketch", show_default=True, type=click.Choice(["sketch", "newton_schulz", "direct"]),
              help="nystrom: how the landmark system is solved.")
@click.option("--ridge", type=float, default=1e-2, show_default=True, help="nystrom: ridge of the landmark system.")
@click.option("--layers", help="Sites to replace, e.g. 0,2,5-7 (default: all).")
@click.option("--min-seq-len", type=int, help="Keep sites whose static sequence length is shorter.")
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help="Probe with these inputs (.npz) instead of synthesised ones.")
@click.option("--recurrent", is_flag=True,
              help="MODEL is a decoder exported with its KV cache: replace each layer's cache inputs/outputs by "
                   "a fixed-size state (past_state.<l> / present_state.<l>); --method lse, linear, or clustered "
                   "(with --centroids and a finite --window).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def convert(model, output, method, feature_map, expansion_point, num_features, seed, eps, window, dilation, num_global,
            num_clusters, iterations, cluster, centroids_path, random_blocks, block_size, causal_only, num_landmarks,
            landmark_method, solver, ridge, layers, min_seq_len, inputs_path, recurrent, dry_run, as_json):
    """Replace the softmax attention of MODEL and write the converted model."""
    from attnexport.api import convert as run_convert
    from attnexport.methods import MethodOptions

    options = MethodOptions(feature_map=feature_map, expansion_point=expansion_point, eps=eps,
                            num_features=num_features, seed=seed, window=_window(window), dilation=dilation,
                            num_global=num_global, random_blocks=random_blocks, block_size=block_size,
                            causal_only=causal_only, num_clusters=num_clusters, iterations=iterations,
                            cluster=cluster, centroids=_centroids(centroids_path), num_landmarks=num_landmarks,
                            landmarks=landmark_method, solver=solver, ridge=ridge)
    status = err_console.status("converting", spinner="dots") if not as_json else None
    if status:
        status.start()
    try:
        result = run_convert(model, output, method=method, options=options, layers=layers, min_seq_len=min_seq_len,
                             feeds=_feeds(inputs_path), dry_run=dry_run, recurrent=recurrent,
                             progress=(lambda text: status.update(text)) if status else None)
    finally:
        if status:
            status.stop()
    if as_json:
        click.echo(json.dumps({"output": result.output_path, "plan": json.loads(result.plan.to_json())}, indent=2))
        return
    table = Table(title=f"plan: --method {method}")
    for column in ("#", "name", "mask", "action"):
        table.add_column(column, overflow="fold")
    for p in result.plan.sites:
        if p.selected:
            attrs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.replacement.attributes.items())
            action = f"{p.replacement.op.name}({attrs})"
        else:
            action = f"keep — {p.skip_reason}"
        table.add_row(str(p.site.index), p.site.name, p.site.mask.describe(), action)
    console.print(table)
    if dry_run:
        console.print("dry run: nothing written")
    else:
        console.print(f"replaced {result.replaced} of {len(result.sites)} sites → {result.output_path}")


def _centroids(path):
    """--centroids: the arrays of an .npz file by name; None when not given."""
    if path is None:
        return None
    import numpy as np

    from attnexport.errors import UnsupportedError

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise UnsupportedError(f"--centroids {path}: not a readable .npz file ({e})") from None


def _window(text):
    """--window: a size >= 0, or 'full' (-1, unbounded); None when not given."""
    if text is None:
        return None
    if text.strip().lower() in ("full", "inf", "unbounded"):
        return -1
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < 0:
        from attnexport.errors import UnsupportedError

        raise UnsupportedError(f"--window {text}: give a size >= 0 or 'full'")
    return value


# -- calibrate -----------------------------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output path (default: MODEL.<method>.calibrated.onnx).")
@click.option("--method", default="linear", show_default=True,
              help="Replacement method: linear, nystrom, sparse, lse or clustered.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration inputs: .npz of arrays named like the model's inputs, examples along axis 0.")
@click.option("--texts", "texts_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration texts, one per line (needs a tokenizer).")
@click.option("--tokenizer", help="Tokenizer directory or local name for --texts (default: the one MODEL records).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per calibration batch.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="--texts: longer texts are cut.")
@click.option("--feature-map", default="elu1", show_default=True,
              type=click.Choice(["elu1", "relu", "taylor2", "favor"]), help="Linear attention's feature map.")
@click.option("--num-features", type=int, help="favor: fix F instead of choosing among Dk, 2Dk, 4Dk.")
@click.option("--seed", type=int, default=0, show_default=True, help="favor: first seed of the random draws.")
@click.option("--eps", type=float, default=1e-6, show_default=True, help="Added to linear attention's normaliser.")
@click.option("--window", help="sparse, clustered: the widest window to consider (default: the site's own pattern; "
                                "clustered: 128).")
@click.option("--global", "num_global", type=int, default=0, show_default=True,
              help="sparse, clustered: the first G positions attend and are attended everywhere.")
@click.option("--clusters", "num_clusters", type=int, help="clustered: the most clusters to consider (default 64).")
@click.option("--iterations", type=int, default=10, show_default=True, help="clustered: Lloyd steps of the k-means.")
@click.option("--budget", type=float,
              help="Largest relative output error per site: sparse picks the smallest window within it, nystrom "
                   "the fewest landmarks, clustered the cheapest window + clusters (default 0.05 for all three); "
                   "favor the fewest features.")
@click.option("--recurrent", is_flag=True,
              help="MODEL is a decoder exported with its KV cache: write it with a fixed-size state per layer, as "
                   "convert --recurrent (lse, linear, clustered).")
@click.option("--save-centroids", type=click.Path(dir_okay=False),
              help="clustered: also write the fitted centres as an .npz for convert --centroids.")
@click.option("--layers", help="Sites to replace, e.g. 0,2,5-7 (default: all).")
@click.option("--independent", is_flag=True,
              help="Fit every site on the original's inputs (default: each site sees the earlier sites replaced).")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print what was fitted as JSON.")
def calibrate(model, output, method, data_path, texts_path, tokenizer, batch_size, max_tokens, feature_map,
              num_features, seed, eps, window, num_global, num_clusters, iterations, budget, recurrent, save_centroids,
              layers, independent, threads, as_json):
    """Replace the softmax attention of MODEL like convert, with each replacement fitted to the original on
    calibration inputs (parameters, per-head output maps); what was fitted is recorded in the output's
    metadata."""
    from attnexport.api import calibrate as run_calibrate
    from attnexport.methods import MethodOptions

    options = MethodOptions(feature_map=feature_map, eps=eps, num_features=num_features, seed=seed,
                            window=_window(window), num_global=num_global, num_clusters=num_clusters,
                            iterations=iterations)
    if save_centroids and method != "clustered":
        from attnexport.errors import UnsupportedError

        raise UnsupportedError("--save-centroids goes with --method clustered")
    if save_centroids:
        from attnexport.calibration.centroids import check_path

        check_path(model, save_centroids)  # before the work, not after
    status = err_console.status("calibrating", spinner="dots") if not as_json else None
    if status:
        status.start()
    try:
        result = run_calibrate(model, output, method=method, options=options, data=data_path, texts=texts_path,
                               tokenizer=tokenizer, batch_size=batch_size, max_tokens=max_tokens, layers=layers,
                               budget=budget, sequential=not independent, threads=threads,
                               progress=(lambda text: status.update(text)) if status else None, recurrent=recurrent)
        if save_centroids:
            from attnexport.calibration.centroids import save_fitted

            save_fitted(result.fits, save_centroids, model)
    finally:
        if status:
            status.stop()
    if as_json:
        click.echo(json.dumps({"output": result.output_path, "calibration": result.record}, indent=2))
        return
    table = Table(title=f"calibrate: --method {method} on {result.record['examples']} examples ({result.record['data']})")
    for column in ("#", "name", "fitted", "error before", "error after"):
        table.add_column(column, overflow="fold")
    for p in result.plan.sites:
        fit = result.fits.get(p.site.index)
        if fit is None:
            table.add_row(str(p.site.index), p.site.name, f"keep — {p.skip_reason}", "", "")
            continue
        shown = {k: v for k, v in fit.parameters.items() if not isinstance(v, dict) and not k.startswith("map_")}
        fitted = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        table.add_row(str(p.site.index), p.site.name, fitted, f"{fit.error_before:.4g}", f"{fit.error_after:.4g}")
    console.print(table)
    console.print("errors: relative output error of the site on held-out calibration batches")
    console.print(f"calibrated {len(result.fits)} of {len(result.plan.sites)} sites → {result.output_path}")


# -- verify --------------------------------------------------------------------------------------------

@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False), help="Real inputs (.npz).")
@click.option("--seq-len", type=int, help="Sequence length of synthesised inputs (default 16).")
@click.option("--batch", type=int, default=2, show_default=True, help="Batch of synthesised inputs.")
@click.option("--tolerance", type=float,
              help="Largest relative error (max |diff| / max |original|) allowed on graph outputs.")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify(original, converted, inputs_path, seq_len, batch, tolerance, threads, as_json):
    """Compare ORIGINAL and CONVERTED: kernels vs reference functions vs the original, per site and output."""
    from attnexport.verification import raise_if_failed
    from attnexport.verification import verify as run_verify

    report = run_verify(original, converted, feeds=_feeds(inputs_path), seq_len=seq_len, batch=batch,
                        tolerance=tolerance, threads=threads)
    if as_json:
        click.echo(report.to_json())
    else:
        _print_report(report)
    raise_if_failed(report)


def _print_report(report) -> None:
    kind = "exact" if report.exact else "approximate"
    table = Table(title=f"verify: {report.converted} ({report.method}, {kind}) vs {report.original}")
    for column in ("value", "kind", "kernel vs function (rel)", "converted vs original: max abs", "rel", "cosine",
                   "status"):
        table.add_column(column, overflow="fold")
    for c in report.comparisons:
        o = c.kernel_vs_original
        table.add_row(c.name, c.kind, f"{c.kernel_vs_function['rel']:.2e}", f"{o['max_abs']:.3e}", f"{o['rel']:.2e}",
                      f"{o['cosine']:.6f}", "ok" if c.passed else "FAIL: " + "; ".join(c.problems))
    console.print(table)
    console.print("inputs: " + ", ".join(f"{k} {v}" for k, v in report.feeds.items()))
    console.print("PASSED" if report.passed else "FAILED")


# -- bench ---------------------------------------------------------------------------------------------

@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option("--seq-len", "seq_lens", default="128,512,2048", show_default=True,
              help="Comma-separated sequence lengths.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--repeat", type=int, default=5, show_default=True, help="Timed runs per point (after a warm-up).")
@click.option("--json", "as_json", is_flag=True)
def bench(original, converted, seq_lens, batch, threads, repeat, as_json):
    """Time ORIGINAL and CONVERTED side by side (same inputs, same run), with peak memory."""
    from attnexport.bench import bench_pair

    lengths = [int(x) for x in seq_lens.split(",") if x.strip()]
    rows = bench_pair(original, converted, lengths, batch=batch, threads=threads, repeat=repeat)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"bench: {Path(converted).name} vs {Path(original).name} (batch {batch})")
    for column in ("seq len", "original ms", "converted ms", "speed-up", "original peak MB", "converted peak MB"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["seq_len"]), _fmt(r["original"].get("median_ms")), _fmt(r["converted"].get("median_ms")),
                      _fmt(r.get("speedup"), "×"), _fmt(r["original"].get("peak_mb")), _fmt(r["converted"].get("peak_mb")))
    console.print(table)
    for r in rows:
        for which in ("original", "converted"):
            if "error" in r[which]:
                console.print(f"{which} at seq len {r['seq_len']}: {r[which]['error']}", markup=False)


def _fmt(value, suffix="") -> str:
    if value is None:
        return "—"
    return f"{value:.3g}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


if __name__ == "__main__":  # pragma: no cover
    main()
