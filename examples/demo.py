"""The main job on a bundled example: a small GPT-2 (random weights, 4 layers, width 256, 4 heads of 64,
room for 8k positions) exported with torch.onnx.export, then the four attnexport commands a user runs:

    attnexport inspect model.onnx
    attnexport convert model.onnx -o model.linear.onnx --method linear --feature-map elu1
    attnexport verify  model.onnx model.linear.onnx
    attnexport bench   model.onnx model.linear.onnx

Usage: python examples/demo.py [--workdir out/demo] [--seq-len 512,2048,8192] [--exporter dynamo18]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def export_gpt2(path: Path, exporter: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2Model

    from attnexport import zoo

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=8192,
                                 bos_token_id=0, eos_token_id=0)).eval()
    arch = zoo.Architecture("gpt2-demo", lambda: model, ("input_ids", "attention_mask"), 4, causal=True)
    wrapped = zoo._wrapper(model, arch)
    args = zoo.example_inputs(arch, seq_len=32)
    with zoo._quiet(True), torch.no_grad():
        if exporter == "torchscript17":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=17,
                              input_names=list(arch.inputs), output_names=["last_hidden_state"], dynamic_axes=axes)
        else:
            from torch.export import Dim

            shapes = {n: {0: Dim("batch", min=1, max=64), 1: Dim("sequence", min=2, max=8192)} for n in arch.inputs}
            torch.onnx.export(wrapped, args, str(path), dynamo=True, opset_version=int(exporter[-2:]),
                              input_names=list(arch.inputs), output_names=["last_hidden_state"],
                              dynamic_shapes=shapes)


def attnexport_command() -> list[str]:
    beside = Path(sys.executable).with_name("attnexport")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "attnexport.cli"]


def run(*args: str) -> None:
    command = attnexport_command() + list(args)
    print(f"\n$ attnexport {shlex.join(args)}", flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/demo")
    parser.add_argument("--seq-len", default="512,2048,8192", help="bench lengths")
    parser.add_argument("--exporter", default="dynamo18", choices=["dynamo18", "dynamo23", "torchscript17"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model = workdir / "gpt2.onnx"
    converted = workdir / "gpt2.linear.onnx"

    start = time.perf_counter()
    print(f"exporting a 4-layer GPT-2 (random weights) with {args.exporter} → {model}", flush=True)
    export_gpt2(model, args.exporter)
    print(f"exported in {time.perf_counter() - start:.1f} s")

    run("inspect", str(model))
    run("convert", str(model), "-o", str(converted), "--method", "linear", "--feature-map", "elu1")
    run("verify", str(model), str(converted), "--seq-len", "64")
    bench = ["bench", str(model), str(converted), "--seq-len", args.seq_len, "--repeat", "3"]
    if args.threads:
        bench += ["--threads", str(args.threads)]
    run(*bench)
    print("\nThe converted model runs in any ONNX Runtime session that registers the op library:\n"
          "    import attnexport\n"
          f"    session = attnexport.InferenceSession({str(converted)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
