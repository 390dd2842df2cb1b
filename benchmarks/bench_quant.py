"""Blockwise NF4 quantize / dequantize: minilora.nf4 next to bitsandbytes' CPU kernels, same tensor, same process.

    python benchmarks/bench_quant.py            # 4096 x 4096 and 11008 x 4096 bf16 (a 7B MLP projection)
    python benchmarks/bench_quant.py --quick    # 4096 x 4096 only, fewer repeats
    python benchmarks/bench_quant.py --threads 1

For every shape: median wall time of quantize (bf16 -> packed NF4 + absmax, blocksize 64) and dequantize
(-> bf16), the ratio ours / bitsandbytes, and a plain bf16 copy of the same matrix as a memory-bandwidth
yardstick. Also checks that both libraries produce the same bytes and values (bit-exact). Then the
dequantize again beside a busy process (a second Python process spinning on one core), the condition in
which many small parallel regions collapse. Goals (issue 12): quantize at most 0.5x bitsandbytes' time,
dequantize at most 1.0x bitsandbytes and 1.3x a bf16 copy, and at most 1.5x bitsandbytes when busy.
Prints a Markdown table headed by `minilora.machine.describe_line()` and writes it to
benchmarks/results/bench_quant.md. Timings, not asserts: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing

from minilora.machine import describe_line  # noqa: E402
from minilora.nf4 import dequantize_4bit, quantize_4bit  # noqa: E402

BLOCKSIZE = 64


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, code tables, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def busy_process():
    """A second process spinning on one core, started now; the caller kills it."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let the scheduler see it
    return spinner


def bench_shape(shape, repeats: int) -> list[dict]:
    import bitsandbytes.functional as bnb_f

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(torch.bfloat16)
    packed, absmax = quantize_4bit(w, BLOCKSIZE, "nf4")
    bnb_packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
    ours_w = dequantize_4bit(packed, absmax, shape, BLOCKSIZE, "nf4", torch.bfloat16)
    bnb_w = bnb_f.dequantize_4bit(bnb_packed, state)
    quant_exact = torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(
        absmax.view(torch.int32), state.absmax.view(torch.int32))
    dequant_exact = torch.equal(ours_w.view(torch.int16), bnb_w.view(torch.int16))

    copy = median_seconds(lambda: w.clone(), repeats)
    rows = []
    for op, ours_fn, bnb_fn, exact, goal in [
        ("quantize", lambda: quantize_4bit(w, BLOCKSIZE, "nf4"),
         lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"), quant_exact, 0.5),
        ("dequantize", lambda: dequantize_4bit(packed, absmax, shape, BLOCKSIZE, "nf4", torch.bfloat16),
         lambda: bnb_f.dequantize_4bit(bnb_packed, state), dequant_exact, 1.0),
    ]:
        ours, theirs = median_seconds(ours_fn, repeats), median_seconds(bnb_fn, repeats)
        rows.append({"shape": shape, "op": op, "ours": ours, "bnb": theirs, "ratio": ours / theirs, "goal": goal,
                     "copy": copy, "exact": exact})
    spinner = busy_process()
    try:
        ours = median_seconds(ours_fn, repeats)  # the loop's last pair: the dequantize
        theirs = median_seconds(bnb_fn, repeats)
        busy_copy = median_seconds(lambda: w.clone(), repeats)
    finally:
        spinner.kill()
        spinner.wait()
    rows.append({"shape": shape, "op": "dequantize, busy", "ours": ours, "bnb": theirs, "ratio": ours / theirs,
                 "goal": 1.5, "copy": busy_copy, "exact": dequant_exact})
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"# bench_quant: NF4, blocksize {BLOCKSIZE}, bf16 weights, median of timed runs",
        "",
        f"{describe_line()} (threads asked: {threads})",
        "",
        "| shape | op | minilora (ms) | bitsandbytes (ms) | ratio | goal | bf16 copy (ms) | vs copy | bit-exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "yes" if r["ratio"] <= r["goal"] else "no"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['op']} | {1e3 * r['ours']:.1f} | "
                     f"{1e3 * r['bnb']:.1f} | {r['ratio']:.2f} | <= {r['goal']} ({ok}) | {1e3 * r['copy']:.1f} | "
                     f"{r['ours'] / r['copy']:.2f} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 7)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_quant.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]

    rows = []
    for shape in shapes:
        rows += bench_shape(shape, repeats)
    table = markdown(rows, args.threads or torch.get_num_threads())
    print(table)
    write_atomically(args.out, table)
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
