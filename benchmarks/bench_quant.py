"""Blockwise NF4 quantize / dequantize: minilora.nf4 next to bitsandbytes' CPU kernels, same tensor, same process.

    python benchmarks/bench_quant.py                # 4096 x 4096 and 11008 x 4096 bf16, at 1 and 2 threads
    python benchmarks/bench_quant.py --quick        # 4096 x 4096 only, fewer repeats
    python benchmarks/bench_quant.py --threads 1    # one thread count only

For every shape and thread count: the median wall time of quantize (bf16 -> packed NF4 + absmax, blocksize 64)
and dequantize (-> a new bf16 tensor), the ratio ours / bitsandbytes, and a plain bf16 copy of the same matrix
(`clone`, also into a new tensor) as a memory-bandwidth yardstick; then the decode into an existing buffer
(`out=`) against `copy_` into one, which is the decode's own cost without page faults. New tensors come from
fresh pages every time (`fresh_pages_for_every_new_tensor`), so that the allocator's history does not decide
the figures. The candidates are timed in turn (ours, bitsandbytes, copy, ours, ...), so that a change in the
machine's load hits all of them alike; the median is over `--repeats` such rounds. Then the dequantize rounds
again beside a busy process (a second Python process spinning on one core), the condition in which many small
parallel regions collapse. Also checks that both libraries produce the same bytes and values (bit-exact).
Goals (issue 12): quantize at most 0.5x bitsandbytes' time; dequantize at most 1.0x bitsandbytes and 1.3x a
bf16 copy; at most 1.5x bitsandbytes when busy. Prints a Markdown table headed by
`minilora.machine.describe_line()` (taken while the measurement ran) and writes it to
benchmarks/results/bench_quant.md. Timings, not asserts: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import ctypes
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

from minilora import native  # noqa: E402
from minilora.machine import describe_line  # noqa: E402
from minilora.nf4 import dequantize_4bit, quantize_4bit  # noqa: E402

BLOCKSIZE = 64


def alternating_medians(fns: dict, repeats: int) -> dict:
    """{name: median seconds}, timing the functions in turn, `repeats` rounds, after one warm-up round."""
    for fn in fns.values():
        fn()  # warm-up: allocator, code tables, worker threads, lazy initialisation
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fresh_pages_for_every_new_tensor() -> str:
    """Make every new tensor of 4 MiB or more come from fresh pages: glibc's mallopt(M_MMAP_THRESHOLD, 4 MiB).

    A 4096 x 4096 bf16 tensor is 32 MiB, exactly glibc's largest dynamic mmap threshold. Whether a new one
    faults in fresh pages (8,193 faults, most of a copy's time) or reuses freed ones then depends on what was
    freed before, and that moved the copy and the decode by about 30 % between runs. A fixed threshold stops
    the adjustment: every new tensor pays its page faults, for all candidates alike. 4 MiB, not less: the
    steps' own temporaries (1-2 MiB) stay on reused pages, as they do in any long-running process (at 1 MiB
    the quantize took 1.6x as long). Returns what was done.
    """
    try:
        fixed = ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        fixed = False
    return ("every new tensor of 4 MiB or more on fresh pages (glibc's mmap threshold fixed at 4 MiB)" if fixed
            else "the allocator as it is (no glibc mallopt here)")


def busy_process():
    """A second process spinning on one core, started now; the caller kills it."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let the scheduler see it
    return spinner


def bench_shape(shape, threads: int, repeats: int) -> list[dict]:
    import bitsandbytes.functional as bnb_f

    torch.set_num_threads(threads)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(torch.bfloat16)
    packed, absmax = quantize_4bit(w, BLOCKSIZE, "nf4")
    bnb_packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
    ours_w = dequantize_4bit(packed, absmax, shape, BLOCKSIZE, "nf4", torch.bfloat16)
    bnb_w = bnb_f.dequantize_4bit(bnb_packed, state)
    quant_exact = torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(
        absmax.view(torch.int32), state.absmax.view(torch.int32))
    dequant_exact = torch.equal(ours_w.view(torch.int16), bnb_w.view(torch.int16))
    del ours_w, bnb_w

    quantize = {"ours": lambda: quantize_4bit(w, BLOCKSIZE, "nf4"),
                "bnb": lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"),
                "copy": lambda: w.clone()}
    dequantize = {"ours": lambda: dequantize_4bit(packed, absmax, shape, BLOCKSIZE, "nf4", torch.bfloat16),
                  "bnb": lambda: bnb_f.dequantize_4bit(bnb_packed, state),
                  "copy": lambda: w.clone()}
    # Into an existing buffer: no page faults, the decode's own cost. bitsandbytes' CPU dequantize takes no
    # `out` (bitsandbytes::dequantize_4bit.out has no CPU kernel in 0.50), so only ours and a copy_ here.
    buffer, flat_w = torch.empty(w.numel(), dtype=torch.bfloat16).fill_(0), w.reshape(-1)
    into_buffer = {"ours": lambda: dequantize_4bit(packed, absmax, shape, BLOCKSIZE, "nf4", torch.bfloat16, out=buffer),
                   "copy": lambda: buffer.copy_(flat_w)}
    rows = []
    for op, fns, exact, goal in [("quantize", quantize, quant_exact, 0.5),
                                 ("dequantize", dequantize, dequant_exact, 1.0),
                                 ("dequantize into a buffer", into_buffer, dequant_exact, None)]:
        t = alternating_medians(fns, repeats)
        rows.append({"shape": shape, "threads": threads, "op": op, "bnb": None, **t, "goal": goal,  # t: bnb's too
                     "exact": exact, "load": describe_line()})
    spinner = busy_process()
    try:
        t = alternating_medians(dequantize, repeats)
        load = describe_line()
    finally:
        spinner.kill()
        spinner.wait()
    rows.append({"shape": shape, "threads": threads, "op": "dequantize, busy", **t, "goal": 1.5,
                 "exact": dequant_exact, "load": load})
    return rows


def markdown(rows: list[dict], decode_path: str, allocator: str) -> str:
    lines = [
        f"# bench_quant: NF4, blocksize {BLOCKSIZE}, bf16 weights, median of alternating timed runs",
        "",
        f"{describe_line()} (at the end; each row's load average, taken as it ran, is in the last column)",
        "",
        f"minilora's decode: {decode_path}",
        "",
        f"New tensors: {allocator}. Into a buffer: ours with `out=`, the copy as `copy_`; bitsandbytes' CPU "
        "dequantize takes no `out`.",
        "",
        "| shape | threads | op | minilora (ms) | bitsandbytes (ms) | ratio | goal | bf16 copy (ms) | vs copy "
        "| bit-exact | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r["bnb"] is None:
            bnb = ratio = goal = "—"
        else:
            bnb, ratio = f"{1e3 * r['bnb']:.1f}", f"{r['ours'] / r['bnb']:.2f}"
            goal = f"<= {r['goal']} ({'yes' if r['ours'] / r['bnb'] <= r['goal'] else 'no'})"
        vs_copy = r["ours"] / r["copy"]
        copy_goal = (f" (<= 1.3: {'yes' if vs_copy <= 1.3 else 'no'})"
                     if r["op"] in ("dequantize", "dequantize into a buffer") else "")
        load = r["load"].split("load ")[1].split(",")[0]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['op']} | {1e3 * r['ours']:.1f} | "
                     f"{bnb} | {ratio} | {goal} | {1e3 * r['copy']:.1f} | "
                     f"{vs_copy:.2f}{copy_goal} | {'yes' if r['exact'] else 'NO'} | {load} |")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default 7)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_quant.md")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    thread_counts = [int(t) for t in args.threads.split(",")]

    allocator = fresh_pages_for_every_new_tensor()
    start = time.perf_counter()   # compile (first run on a machine) or load the optional compiled decode
    compiled = native.decoder() is not None
    decode_path = (f"minilora.native's compiled AVX2 loop (compiling or loading it took "
                   f"{time.perf_counter() - start:.1f} s, before and outside the timings)" if compiled
                   else "eager PyTorch (minilora.native is not compiled here)")
    rows = []
    for shape in shapes:
        for threads in thread_counts:
            rows += bench_shape(shape, threads, repeats)
    table = markdown(rows, decode_path, allocator)
    print(table)
    write_atomically(args.out, table)
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
