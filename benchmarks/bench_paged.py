"""Step time of minilora.paged.PagedAdamW against torch.optim.AdamW, when the state fits and when it pages.

A few million fp32 parameters with fixed random gradients; every optimizer gets its own copy. Each
configuration is timed in several rounds, interleaved with the others so that a busy machine slows all of
them alike, and the best round is reported (the least disturbed one). Paging traffic per step comes from
PagedAdamW.stats; the last column is what that traffic would cost over a 25 GB/s PCIe 4.0 x16 link.

On a CPU-only machine both the host store and the "device" pool are CPU memory: a page-in is a memcpy, so
the table measures the bookkeeping and copy overhead of the mechanism, not a real PCIe transfer.

    python benchmarks/bench_paged.py            # 8 x (1024 x 512) = 4.2M parameters
    python benchmarks/bench_paged.py --quick    # 4 x (1024 x 512) = 2.1M parameters, fewer rounds
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from minilora.paged import DEFAULT_PAGE_BYTES, PagedAdamW, adamw_state_bytes

RESULTS = Path(__file__).resolve().parent / "results"
PCIE_BYTES_PER_S = 25e9


def make_params(count, shape):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2.1M parameters, fewer rounds")
    args = parser.parse_args()
    count, shape, rounds, steps = (4, (1024, 512), 3, 3) if args.quick else (8, (1024, 512), 5, 5)

    state = adamw_state_bytes(make_params(count, shape))
    page = DEFAULT_PAGE_BYTES
    configs = {  # name -> (factory, budget in bytes or None)
        "torch.optim.AdamW": (lambda ps: torch.optim.AdamW(ps), None),
        "PagedAdamW, no budget (fits)": (lambda ps: PagedAdamW(ps), None),
        "PagedAdamW, budget = state (fits)": (lambda ps: PagedAdamW(ps, device_budget_bytes=state), state),
        "PagedAdamW, budget = state / 4": (lambda ps: PagedAdamW(ps, device_budget_bytes=state // 4),
                                           state // 4),
        "PagedAdamW, budget = 1 page": (lambda ps: PagedAdamW(ps, device_budget_bytes=page), page),
    }
    optimizers = {name: factory(make_params(count, shape)) for name, (factory, _) in configs.items()}
    for optimizer in optimizers.values():
        optimizer.step()  # first step creates the state (or the pages): not what we time
    best = {name: float("inf") for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)

    baseline = best["torch.optim.AdamW"]
    n_params = count * shape[0] * shape[1]
    lines = [f"{n_params / 1e6:.1f}M fp32 parameters in {count} tensors of {shape[0]} x {shape[1]}; "
             f"AdamW state {state / 2**20:.1f} MiB; page {page / 2**20:.0f} MiB; "
             f"torch threads {torch.get_num_threads()}; best of {rounds} rounds of {steps} steps.",
             "",
             "| optimizer | budget (MiB) | ms / step | × torch AdamW | MiB moved / step | at 25 GB/s (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (_, budget) in configs.items():
        optimizer = optimizers[name]
        moved = optimizer.stats.trace[-1]["bytes_moved"] if isinstance(optimizer, PagedAdamW) else 0
        budget_text = "—" if budget is None else f"{budget / 2**20:.1f}"
        lines.append(f"| {name} | {budget_text} | {best[name] * 1e3:.1f} | {best[name] / baseline:.2f} | "
                     f"{moved / 2**20:.1f} | {moved / PCIE_BYTES_PER_S * 1e3:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)

    RESULTS.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp") as f:
        f.write(table)
    os.replace(f.name, RESULTS / "bench_paged.md")
    print(f"wrote {RESULTS / 'bench_paged.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
