#!/usr/bin/env python
"""The architecture × exporter matrix: every architecture of attnexport.zoo exported with every exporter,
then inspected, converted and verified; the table goes to benchmarks/results/architecture_matrix.md and
into README.md (between the architecture-matrix markers).

    python scripts/architecture_matrix.py              # everything (about 20 min on 2 busy cores, --jobs 2)
    python scripts/architecture_matrix.py --arch t5,swin --exporter dynamo18   # a subset: printed only

Per cell (architecture, exporter):
1. export (attnexport.zoo.export) — if the exporter fails, the cell gives its error in one line;
2. inspect must find exactly the architecture's number of attention sites (one per attention layer;
   encoder-decoders: encoder self + decoder self + decoder cross attention per layer);
3. convert --method linear, then verify (kernels vs reference functions vs the original);
4. when linear attention cannot take some site (an additive position bias, a sliding window), the cell
   gives attnexport's reason and the result of --method sparse --window full, which is exact.

Each cell runs in its own process (an exporter crash or a leak stays there).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "architecture_matrix.md"
README = ROOT / "README.md"
START, END = "<!-- architecture-matrix:start -->", "<!-- architecture-matrix:end -->"
COMMAND = "python scripts/architecture_matrix.py"


def _one_line(error: BaseException, limit: int = 240) -> str:
    """An exception as one line. torch.onnx wraps the real error in generic ones ("Failed to convert the
    exported program ..."): the innermost cause says what went wrong, so it is quoted after the outer type."""
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).strip().splitlines() if line.strip()]
    first = re.sub(r"\x1b\[[0-9;]*m", "", re.sub(r"\s+", " ", lines[0] if lines else ""))
    # ONNX Runtime: "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/... failed:This is ..."
    first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ", r"\1: ", first)
    first = re.sub(r"Load model from \S+ failed:\s*", "", first)
    first = re.sub(r"Non-zero status code returned while running (\w+) node\. Name:'[^']+' Status Message: ", r"\1: ",
                   first)
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    names = type(error).__name__ if inner is error else f"{type(error).__name__} ({type(inner).__name__})"
    return f"{names}: {first}" if first else names


def _runs_in_ort(path: str, batch: int) -> str | None:
    """None if the exported model runs in ONNX Runtime (no attnexport involved) on synthesised inputs of
    this batch size, else ORT's error in one line."""
    from attnexport import inputs, model_io
    from attnexport.runtime import create_session

    try:
        session = create_session(path, with_library=False, quiet=True)
        session.run(None, inputs.synthesize(model_io.load(path), inputs.ProbeShape(batch=batch, seq_len=16)))
    except Exception as e:
        return _one_line(e)
    return None


def _masks(sites) -> str:
    kinds = sorted({s.mask.describe() for s in sites})
    return ", ".join(kinds)


def _verify(source: str, converted: str, batch: int) -> tuple[bool, str]:
    """(passed, a short account) of attnexport.verify."""
    import attnexport

    report = attnexport.verify(source, converted, batch=batch)
    if report.passed:
        return True, "verified exact" if report.exact else "verified"
    first = next(p for c in report.comparisons for p in c.problems)
    return False, f"verify fails: {first}"


def _convert(source: str, out: str, method: str, options=None):
    import attnexport

    return attnexport.convert(source, out, method=method, options=options)


def run_cell(arch_name: str, exporter: str, workdir: str) -> dict:
    """Export, inspect, convert and verify one (architecture, exporter); returns the cell's record: its
    status, its text, and the long reasons the text refers to as footnotes ({0}, {1}, ... in the text)."""
    started = time.perf_counter()
    import attnexport
    from attnexport import zoo
    from attnexport.methods import METHODS, MethodOptions

    arch = zoo.ARCHITECTURES[arch_name]
    record = {"arch": arch_name, "exporter": exporter, "expected_sites": arch.num_sites, "notes": []}

    def note(text: str) -> str:
        record["notes"].append(text)
        return "{%d}" % (len(record["notes"]) - 1)

    def done(status: str, text: str) -> dict:
        record.update(status=status, text=text, seconds=round(time.perf_counter() - started, 1))
        return record

    source = os.path.join(workdir, f"{arch_name}_{exporter}.onnx")
    try:
        zoo.export(arch_name, exporter, source)
    except Exception as e:
        record["error"] = _one_line(e)
        if arch.export_failure(exporter):  # the diagnosed cause, recorded in the zoo
            return done("export-fails", "the exporter fails " + note(arch.export_failure(exporter)))
        return done("export-fails-unexpectedly", "the exporter fails " + note(record["error"]))
    # The exported model must run in ONNX Runtime by itself before attnexport is asked anything.
    batch, batch_note = 2, ""
    problem = _runs_in_ort(source, batch=2)
    if problem is not None:
        if _runs_in_ort(source, batch=1) is not None:
            record["error"] = problem
            if arch.export_failure(exporter):
                return done("export-fails", "the exported model does not run in ONNX Runtime "
                            + note(arch.export_failure(exporter)))
            return done("export-fails-unexpectedly", "the exported model does not run in ONNX Runtime " + note(problem))
        batch = 1
        cause = f"the exported model itself fails at batch 2 in ONNX Runtime: {problem}"
        if "RotaryEmbedding" in problem and "cos_cache" in problem:
            cause += (" (torch.onnx writes the cos/sin caches of the opset-23 RotaryEmbedding with batch 1, "
                      "[1, S, d/2]; ORT wants the input's batch)")
        batch_note = " at batch 1 " + note(cause)
    if arch.export_failure(exporter):
        record["unexpected"] = f"zoo expects this export to fail ({arch.export_failure(exporter)}), but it ran"

    try:
        sites = attnexport.inspect(source)
    except Exception as e:
        return done("inspect-fails", "inspect fails " + note(_one_line(e)))
    record["sites"] = len(sites)
    record["masks"] = _masks(sites)
    if len(sites) != arch.num_sites:
        found = f"inspect finds {len(sites)} of {arch.num_sites} sites" + (f" ({record['masks']})" if sites else "")
        if arch.known_gap:
            return done("known-gap", f"{found} " + note(arch.known_gap))
        return done("wrong-site-count", found)

    linear = METHODS["linear"]
    blocked = {}
    for site in sites:
        why = site.reason if not site.replaceable else linear.unsupported(site)
        if why:
            blocked[site.index] = why
    if not blocked:
        try:
            result = _convert(source, os.path.join(workdir, f"{arch_name}_{exporter}.linear.onnx"), "linear")
            passed, account = _verify(source, result.output_path, batch)
        except Exception as e:
            return done("convert-fails", "convert --method linear fails " + note(_one_line(e)))
        if not passed:
            return done("verify-fails", "verify fails " + note(account))
        return done("ok", f"converted, {account}{batch_note} ({len(sites)} sites: {record['masks']})")

    # Some site cannot take linear attention: say why, and try what can take it.
    reasons = " ".join(note(r) for r in sorted(set(blocked.values())))
    parts = [f"linear refuses {len(blocked)} of {len(sites)} sites {reasons}"]
    linear_ok = len(sites) - len(blocked)
    if linear_ok:
        try:
            result = _convert(source, os.path.join(workdir, f"{arch_name}_{exporter}.linear.onnx"), "linear")
            passed, account = _verify(source, result.output_path, batch)
            parts[-1] += f", converts the other {result.replaced}, {account}" if passed else f", {account}"
        except Exception as e:
            parts[-1] += ", convert --method linear fails " + note(_one_line(e))
    status = "linear-partial" if linear_ok else "linear-none"
    if "sparse" in METHODS:
        try:
            result = _convert(source, os.path.join(workdir, f"{arch_name}_{exporter}.sparse.onnx"), "sparse",
                              MethodOptions(window=-1))
            passed, account = _verify(source, result.output_path, batch)
            if passed and result.replaced == len(sites):
                parts.append(f"sparse --window full: converted, {account}{batch_note} ({result.replaced} sites: "
                             f"{record['masks']})")
                status = "sparse-ok"
            elif passed:
                parts.append(f"sparse --window full: converts {result.replaced} of {len(sites)} sites, {account}")
            else:
                parts.append("sparse --window full: verify fails " + note(account))
        except Exception as e:
            parts.append("sparse --window full fails " + note(_one_line(e)))
    else:
        parts.append("(the sparse method is not available in this checkout)")
    return done(status, "; ".join(parts))


def plain_text(record: dict) -> str:
    """The cell's text with its footnotes written out (console output)."""
    return re.sub(r"\{(\d+)\}", lambda m: f"({record['notes'][int(m.group(1))]})", record["text"])


def _run_isolated(arch_name: str, exporter: str, workdir: str) -> dict:
    try:
        return run_cell(arch_name, exporter, workdir)
    except BaseException as e:  # a cell never takes the matrix down
        return {"arch": arch_name, "exporter": exporter, "status": "error", "text": "matrix script error {0}",
                "notes": [_one_line(e)], "seconds": 0.0}


def render(records: list[dict], exporters: list[str], seconds: float) -> str:
    """The markdown table; long reasons become numbered notes under it (each distinct text once)."""
    from attnexport import zoo

    footnotes: dict[str, int] = {}

    def cell_text(record: dict) -> str:
        def number(match) -> str:
            text = record["notes"][int(match.group(1))]
            footnotes.setdefault(text, len(footnotes) + 1)
            return f"[{footnotes[text]}]"

        return re.sub(r"\{(\d+)\}", number, record["text"]).replace("|", "\\|")

    by_cell = {(r["arch"], r["exporter"]): r for r in records}
    archs = list(dict.fromkeys(r["arch"] for r in records))
    lines = [
        "| architecture | family | attention sites | " + " | ".join(exporters) + " |",
        "|---|---|---|" + "---|" * len(exporters),
    ]
    for name in archs:
        arch = zoo.ARCHITECTURES[name]
        label = f"{name} ({arch.note})" if arch.note else name
        cells = [("—" if (name, e) not in by_cell else cell_text(by_cell[(name, e)])) for e in exporters]
        sites = str(arch.num_sites) + (" (3 per layer)" if arch.family == zoo.ENCODER_DECODER else "")
        lines.append(f"| {label} | {arch.family} | {sites} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"[{n}] {text.replace('|', '/')}  " for text, n in footnotes.items()]
    ok = sum(r["status"] in ("ok", "sparse-ok") for r in records)
    lines += [
        "",
        f"{len(archs)} architectures, {len(records)} cells: in {ok}, every attention site is found and replaced, "
        "and the converted model verifies (with linear attention, or with exact sparse attention where a site has a "
        "position bias or a sliding window that linear attention cannot take).",
        "",
        "*converted, verified (N sites: masks)*: `attnexport inspect` found exactly N sites (one per attention layer; "
        "encoder-decoders: encoder self, decoder self and decoder cross attention per layer), `convert --method "
        "linear` replaced all N and `verify` passed (kernels agree with the reference functions; linear attention is "
        "an approximation, so no tolerance to the original applies). *linear refuses k of N sites [n]*: attnexport's "
        "reason for leaving those sites to another method, then what `convert --method sparse --window full` did "
        "(*verified exact*: the converted model matches the original to float32 round-off). Decoders run without a "
        "KV cache (use_cache=False). Where the exporter fails, or the model it writes does not run in ONNX Runtime "
        "by itself, the note gives the cause diagnosed in `attnexport/zoo.py` (the script prints the observed error).",
        "",
        f"Generated by `{COMMAND}` in {seconds / 60:.1f} min (torch {_version('torch')}, transformers "
        f"{_version('transformers')}, onnx {_version('onnx')}, onnxruntime {_version('onnxruntime')}, "
        f"onnxscript {_version('onnxscript')}, Python {platform.python_version()}).",
    ]
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "?"


def write_results(table: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Architecture × exporter matrix\n\n" + table)
    readme = README.read_text()
    block = f"{START}\n{table}{END}"
    if START in readme and END in readme:
        before, rest = readme.split(START, 1)
        _, after = rest.split(END, 1)
        readme = before + block + after
    else:
        readme = readme.rstrip("\n") + (
            "\n\n## Architectures\n\n"
            "Small random configurations of these `transformers` architectures are exported at test time with "
            "three exporters (torch.onnx dynamo at opsets 18 and 23, TorchScript at opset 17; "
            "`attnexport/zoo.py`), then inspected, converted and verified. Regenerate the table with\n\n"
            f"    {COMMAND}\n\n" + block + "\n")
    README.write_text(readme)


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from attnexport import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="comma-separated architectures (default: all); a subset is printed only")
    parser.add_argument("--exporter", help="comma-separated exporters (default: all); a subset is printed only")
    parser.add_argument("--jobs", type=int, default=2, help="cells run in parallel (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print the table; write nothing")
    args = parser.parse_args(argv)
    archs = args.arch.split(",") if args.arch else list(zoo.ARCHITECTURES)
    exporters = args.exporter.split(",") if args.exporter else list(zoo.EXPORTERS)
    unknown = [a for a in archs if a not in zoo.ARCHITECTURES] + [e for e in exporters if e not in zoo.EXPORTERS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    write = not args.no_write and not args.arch and not args.exporter

    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="attnexport-matrix-") as workdir:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context,
                                         max_tasks_per_child=1) as pool:
            jobs = {pool.submit(_run_isolated, a, e, workdir): (a, e) for a in archs for e in exporters}
            for job in futures.as_completed(jobs):
                a, e = jobs[job]
                try:
                    record = job.result()
                except Exception as error:  # the worker died (e.g. killed for memory)
                    record = {"arch": a, "exporter": e, "status": "error", "seconds": 0.0,
                              "text": "the worker process died {0}", "notes": [_one_line(error)]}
                records.append(record)
                seen = f" [observed: {record['error']}]" if record.get("error") else ""
                seen += f" [{record['unexpected']}]" if record.get("unexpected") else ""
                print(f"[{len(records)}/{len(jobs)}] {a} × {e} ({record['seconds']} s): {plain_text(record)}{seen}",
                      flush=True)
    order = {(a, e): i for i, (a, e) in enumerate((a, e) for a in archs for e in exporters)}
    records.sort(key=lambda r: order[(r["arch"], r["exporter"])])
    table = render(records, exporters, time.perf_counter() - started)
    print()
    print(table)
    if write:
        write_results(table)
        print(f"wrote {RESULTS.relative_to(ROOT)} and the README's architecture table")
    # Honest outcomes: success, or a cause recorded in the zoo (the exporter's, or a diagnosed attnexport gap).
    bad = [r for r in records if r["status"] not in ("ok", "sparse-ok", "export-fails", "known-gap")]
    for r in bad:
        print(f"unexpected: {r['arch']} × {r['exporter']}: {plain_text(r)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
