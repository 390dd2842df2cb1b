"""The 7B QLoRA step on this machine's CPU: minilora against transformers + bitsandbytes + peft, interleaved.

    python benchmarks/bench_7b.py            # llama-7b from a bf16 checkpoint folder (13.5 GB of disk), 3 rounds
    python benchmarks/bench_7b.py --quick    # llama-7b's widths with 2 of its 32 layers, 1 round: a smoke run
    python benchmarks/bench_7b.py --wrap "../shared/tools/with-memory-limit 11G"   # every run in a memory cgroup
    python benchmarks/bench_7b.py --predict 23.4          # the memory model's table for a 23.4 GiB host, no run
    # the largest model that table says this machine fine-tunes, once (random weights: no 65 GB folder):
    python benchmarks/bench_7b.py --preset llama-33b --r 16 --compute-dtype bf16 --source random \\
        --stacks minilora --rounds 1 --warmup 0 --wrap "../shared/tools/with-memory-limit 22G"

With `--source folder` (the default) it first writes a checkpoint folder of the preset with random weights
(scripts/random_checkpoint.py: bf16 safetensors shards, one at a time) in a temporary folder, deleted at the end
(or in --keep DIR, kept). Then, --rounds times, it runs one process per stack, the first stack alternating between
rounds so that a slow drift of the machine reaches both alike:

    python scripts/qlora_7b.py --model <folder> --stack <stack> --device cpu --seq-len 64 --steps 1 --warmup 1 \\
        --grad-accum 1 --r <r> --compute-dtype <dtype> --json <file>

Each process loads the folder its own way (minilora: minilora.model_builder, layer by layer; peft: transformers'
from_pretrained with a BitsAndBytesConfig) and takes one untimed and one timed optimizer step of the qlora-7b
recipe (--warmup). Reported per stack, the median over the rounds: setup (loading the folder, the adapter and
the optimizer), the peak memory (resident and anonymous, minilora.measure.HostMemory), seconds per timed step,
tokens/s, and the first loss (the same weights in both stacks: the two agree to the quantization's rounding).
Figures, not asserts: written to results/bench_7b.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import qlora_7b  # noqa: E402
import random_checkpoint  # noqa: E402

from minilora.machine import describe_line  # noqa: E402
from minilora.model_builder import preset_config  # noqa: E402

STACKS = ("minilora", "peft")


def run_once(args, stack: str, model_args: list[str], out: Path) -> dict:
    """One process of scripts/qlora_7b.py for one stack; its result row (or a row saying how it failed)."""
    cmd = shlex.split(args.wrap) + [sys.executable, str(ROOT / "scripts" / "qlora_7b.py"), *model_args,
                                    "--stack", stack, "--device", "cpu", "--seq-len", str(args.seq_len),
                                    "--steps", "1", "--warmup", str(args.warmup), "--grad-accum", "1",
                                    "--r", str(args.r),
                                    "--compute-dtype", args.compute_dtype, "--json", str(out)]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    print(done.stdout[-1500:], done.stderr[-1500:], sep="\n", flush=True)
    if done.returncode != 0 or not out.is_file():
        killed = " (killed: over the memory cap?)" if done.returncode in (137, -9) else ""
        return {"stack": stack, "failed": f"exit {done.returncode}{killed}"}
    return json.loads(out.read_text())[0]


def summary(rows: list[dict]) -> dict:
    """The median of each figure over the rounds of one stack."""
    ok = [r for r in rows if "failed" not in r]
    if not ok:
        return {"stack": rows[0]["stack"], "failed": rows[0]["failed"]}
    per_step = [r["timed_seconds"] for r in ok]  # one timed step per run
    return {"stack": ok[0]["stack"], "rounds": len(ok),
            "setup_seconds": statistics.median(r["setup_seconds"] for r in ok),
            "resident": statistics.median(r["peak_bytes"] for r in ok),
            "anonymous": statistics.median(r["peak_anonymous_bytes"] for r in ok),
            "predicted": ok[0]["predicted_bytes"], "seconds_per_step": statistics.median(per_step),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok), "loss": ok[0]["losses"][0],
            "seq_len": ok[0]["seq_len"], "parameters": ok[0]["parameters"]}


def table(summaries: list[dict], header: str) -> str:
    gib = 2**30
    rows = [header, "", "| stack | runs | setup s (load) | peak resident GiB | peak anonymous GiB | "
            "memory model GiB | s/step | tokens/s | first loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        if "failed" in s:
            rows.append(f"| {s['stack']} | {s['failed']} | | | | | | | |")
            continue
        rows.append(f"| {s['stack']} | {s['rounds']} | {s['setup_seconds']:.1f} | {s['resident'] / gib:.2f} | "
                    f"{s['anonymous'] / gib:.2f} | {s['predicted'] / gib:.2f} | {s['seconds_per_step']:.1f} | "
                    f"{s['tokens_per_s']:.2f} | {s['loss']:.4f} |")
    return "\n".join(rows)


def prediction_table(host_gib: float, seq_len: int) -> str:
    """The memory model's QLoRA step (r 16 and 64) for llama-7b/13b/33b on a CPU with bf16 compute and fp32
    adapters (scripts/qlora_7b.py's prediction), plus the process's overhead (qlora_7b.overhead_terms, its runtime
    measured here), against a host of `host_gib`."""
    runtime = qlora_7b.runtime_anonymous_bytes()
    rows = [f"| model | r | memory model GiB | + overhead GiB | total GiB | fits {host_gib} GiB |",
            "|---|---:|---:|---:|---:|---|"]
    for preset in ("llama-7b", "llama-13b", "llama-33b"):
        for r in (16, 64):
            recipe = qlora_7b.make_config(recipe="qlora-7b", batch_size=1, r=r)
            config, bf16 = preset_config(preset), torch.bfloat16
            model = qlora_7b.predicted_bytes(config, recipe, seq_len, "minilora", bf16, torch.device("cpu"))
            overhead = sum(qlora_7b.overhead_terms(config, recipe, bf16, runtime).values())
            total = (model + overhead) / 2**30
            rows.append(f"| {preset} | {r} | {model / 2**30:.2f} | {overhead / 2**30:.2f} | {total:.2f} | "
                        f"{'yes' if total <= host_gib else 'no'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 1 round: a smoke run")
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--layers", type=int, help="keep only this many decoder layers (default: all)")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--source", choices=("folder", "random"), default="folder",
                   help="load a checkpoint folder written first, or build from random weights (no disk)")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated: minilora, peft")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before the timed one (the first pays one-time costs: compiling the native "
                        "decode, creating the optimizer state)")
    p.add_argument("--wrap", default="", help="a command to run each process under, e.g. a memory cgroup tool")
    p.add_argument("--keep", help="write the checkpoint folder here and keep it (default: a temporary folder)")
    p.add_argument("--predict", type=float, metavar="HOST_GIB", help="only print the memory model's table")
    args = p.parse_args(argv)
    if args.predict:
        print(prediction_table(args.predict, args.seq_len))
        return 0
    if args.quick:
        args.layers, args.rounds = args.layers or 2, 1
    stacks = args.stacks.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_7b-", dir=None if args.keep else "/tmp") as tmp:
        model_args, header = ["--config", args.preset, "--random-init"], ""
        if args.source == "folder":
            folder = Path(args.keep or Path(tmp) / "checkpoint")
            if not (folder / "config.json").is_file():
                started = time.perf_counter()
                overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
                written = random_checkpoint.write_checkpoint(preset_config(args.preset, **overrides), folder,
                                                             torch.bfloat16)
                header = (f"Wrote the checkpoint folder ({written / 1e9:.2f} GB of bf16 safetensors shards) in "
                          f"{time.perf_counter() - started:.0f} s.\n\n")
            model_args = ["--model", str(folder)]
        elif args.layers:
            raise SystemExit("--layers needs --source folder (a preset's layers come from its name)")
        rows = {stack: [] for stack in stacks}
        for round_ in range(args.rounds):
            order = stacks if round_ % 2 == 0 else stacks[::-1]
            for stack in order:
                rows[stack].append(run_once(args, stack, model_args, Path(tmp) / f"{stack}-{round_}.json"))
    what = f"{args.preset}" + (f" ({args.layers} layers)" if args.layers else "") + f", {args.source}"
    text = table([summary(rows[s]) for s in stacks],
                 f"{header}QLoRA step, {what}, r {args.r}, batch 1 x {args.seq_len}, compute {args.compute_dtype}, "
                 f"medians of {args.rounds} interleaved rounds; {describe_line()}")
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_7b.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
