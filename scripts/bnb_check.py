"""minilora against bitsandbytes on the device where it matters: NF4 bytes and Linear4bit outputs.

    python scripts/bnb_check.py --device cuda --out results/      # on a GPU: bitsandbytes' CUDA kernels
    python scripts/bnb_check.py --dry-run                          # CPU, small shapes (tests use it)

tests/ check minilora against bitsandbytes' CPU code (pure PyTorch). On a GPU bitsandbytes runs its own CUDA
kernels, written separately, so equality there is a separate fact to check:

1. NF4 codes: `minilora.nf4.quantize_4bit` vs `bitsandbytes.functional.quantize_4bit(quant_type="nf4")` on the
   same tensor on the same device: packed bytes and absmax, bit for bit (bf16 and fp32 inputs).
2. Double quantization: `QuantizedWeight.from_float(double_quant=True)` vs `compress_statistics=True`: the
   8-bit constants, their second-level absmax and the offset.
3. The layer: `minilora.qlora.Linear4bit` vs `bitsandbytes.nn.Linear4bit` (nf4, double quant, bf16 compute)
   built from the same weight: outputs and input gradients, relative max difference ≤ 1e-2 (bf16 rounding).
4. Dequantize speed, side by side: `minilora.nf4.dequantize_4bit` vs bitsandbytes' kernel on the same
   device, NF4 -> bf16, and a bf16 copy of the output as the memory-bandwidth yardstick (median of timed
   runs after a warm-up), in a second table: figures, not checks (only unequal decoded values fail).

Prints a Markdown table (and writes it to OUT/correctness.md); exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import statistics  # noqa: E402
import time  # noqa: E402

from minilora.double_quant import QuantizedWeight  # noqa: E402
from minilora.machine import describe_line  # noqa: E402
from minilora.nf4 import dequantize_4bit, quantize_4bit  # noqa: E402
from minilora.qlora import Linear4bit  # noqa: E402

FULL_SHAPES = ((4096, 4096), (11008, 4096), (1000, 333))  # the last: partial final block, odd element count
DRY_RUN_SHAPES = ((64, 64), (37, 29))
RELATIVE_TOLERANCE = 1e-2


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((a != b).sum())


def check_nf4_bytes(shape, dtype, device) -> tuple[bool, str]:
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    packed, absmax = quantize_4bit(w, blocksize=64, quant_type="nf4")
    their_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bytes_off = _differing(packed, their_packed)
    absmax_off = _differing(absmax, state.absmax)
    return bytes_off == 0 and absmax_off == 0, f"{bytes_off} of {packed.numel()} bytes differ, " \
                                               f"{absmax_off} of {absmax.numel()} absmax differ"


def check_double_quant(shape, device) -> tuple[bool, str]:
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=torch.bfloat16)
    ours = QuantizedWeight.from_float(w, blocksize=64, double_quant=True, quant_type="nf4")
    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q_off = _differing(ours.qabsmax, state.absmax)
    a2_off = _differing(ours.absmax2, state.state2.absmax)
    offset_ok = torch.equal(ours.offset.reshape(-1), state.offset.reshape(-1).to(ours.offset.dtype))
    ok = q_off == 0 and a2_off == 0 and offset_ok
    return ok, (f"{q_off} of {ours.qabsmax.numel()} 8-bit constants differ, {a2_off} absmax2 differ, "
                f"offset {'equal' if offset_ok else 'differs'}")


def check_linear4bit(shape, device) -> tuple[bool, str]:
    import bitsandbytes as bnb

    out_features, in_features = shape
    torch.manual_seed(2)
    linear = nn.Linear(in_features, out_features, bias=True).to(device=device, dtype=torch.bfloat16)
    ours = Linear4bit(linear, blocksize=64, double_quant=True, quant_type="nf4", compute_dtype=torch.bfloat16)
    theirs = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16,
                               compress_statistics=True, quant_type="nf4", device="meta")
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=64,
                                      compress_statistics=True, quant_type="nf4", module=theirs).to(device)
    theirs.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    x = torch.randn(4, 16, in_features, device=device, dtype=torch.bfloat16)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)

    def relative(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    out_diff, grad_diff = relative(y_ours, y_theirs), relative(x_ours.grad, x_theirs.grad)
    ok = out_diff <= RELATIVE_TOLERANCE and grad_diff <= RELATIVE_TOLERANCE
    return ok, f"outputs: relative max diff {out_diff:.2e}; input gradients: {grad_diff:.2e}"


def median_ms(fn, device: torch.device, repeats: int = 20) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_dequantize(shape, device) -> dict:
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.bfloat16)
    packed, absmax = quantize_4bit(w, blocksize=64, quant_type="nf4")
    their_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = median_ms(lambda: dequantize_4bit(packed, absmax, shape, 64, "nf4", torch.bfloat16), device)
    theirs = median_ms(lambda: bnbf.dequantize_4bit(their_packed, state), device)
    copy = median_ms(lambda: w.clone(), device)
    equal = _differing(dequantize_4bit(packed, absmax, shape, 64, "nf4", torch.bfloat16).view(torch.int16),
                       bnbf.dequantize_4bit(their_packed, state).view(torch.int16)) == 0
    return {"shape": shape, "ours": ours, "bnb": theirs, "copy": copy, "equal": equal}


def run_checks(device: torch.device, shapes) -> list[tuple[str, bool, str]]:
    results = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            name = f"NF4 bytes {shape[0]}×{shape[1]} {str(dtype).removeprefix('torch.')}"
            results.append((name, *check_nf4_bytes(shape, dtype, device)))
        results.append((f"double quant {shape[0]}×{shape[1]}", *check_double_quant(shape, device)))
        results.append((f"Linear4bit fwd/bwd {shape[0]}×{shape[1]}", *check_linear4bit(shape, device)))
    return results


def speed_markdown(timings) -> str:
    rows = ["", "Dequantize NF4 -> bf16, blocksize 64, median of 20 runs:", "",
            "| shape | minilora (ms) | bitsandbytes (ms) | ratio | bf16 copy (ms) | vs copy | values |",
            "|---|---:|---:|---:|---:|---:|---|"]
    rows += [f"| {t['shape'][0]}×{t['shape'][1]} | {t['ours']:.3f} | {t['bnb']:.3f} | {t['ours'] / t['bnb']:.2f}x | "
             f"{t['copy']:.3f} | {t['ours'] / t['copy']:.2f}x | {'equal' if t['equal'] else 'DIFFER'} |"
             for t in timings]
    return "\n".join(rows)


def markdown(results, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [f"minilora vs bitsandbytes on {name}:", "", describe_line(), "",
            "| check | result | detail |", "|---|---|---|"]
    rows += [f"| {check} | {'PASS' if ok else 'FAIL'} | {detail} |" for check, ok, detail in results]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="folder for correctness.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU and small shapes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    shapes = DRY_RUN_SHAPES if args.dry_run else FULL_SHAPES
    results = run_checks(device, shapes)
    timings = [time_dequantize(shape, device) for shape in shapes]
    table = markdown(results, device) + "\n" + speed_markdown(timings)
    print(table, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        target = Path(args.out) / "correctness.md"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(table + "\n")
        tmp.replace(target)
    return 0 if all(ok for _, ok, _ in results) and all(t["equal"] for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
