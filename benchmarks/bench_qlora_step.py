"""One QLoRA training step: minilora vs transformers + bitsandbytes Linear4bit + peft LoRA, on this machine.

Each configuration runs in its own Python process (so one stack's memory never inflates another's) on the
same tiny Llama (~34M parameters; --quick: ~5M), the same batch and the same LoRA (r=16 on all linear layers
but the head). Reported: the median time of the measured steps (after warm-up steps) and the process's peak
resident memory (max RSS, which includes the Python interpreter, torch and the libraries each stack imports).

    qlora   base linear layers in NF4 + double quantization, compute bf16, LoRA on top
            minilora: quantize_model + add_lora + PagedAdamW
            peft/bnb: bitsandbytes.nn.Linear4bit(nf4, compress_statistics) + peft LoRA
                      + bitsandbytes.optim.PagedAdamW32bit (on CPU an ordinary fp32 AdamW)
    lora    the same model entirely in bf16 (no quantization): minilora.add_lora vs peft LoRA, torch AdamW

In the qlora rows everything outside the quantized layers (embeddings, norms, head) is fp32 in both stacks;
the LoRA matrices are fp32 in every row. No gradient
checkpointing. Figures, not asserts; on a CPU without bf16 instructions the bf16 matmuls dominate.

    python benchmarks/bench_qlora_step.py            # ~34M parameters, batch 4 x 128 tokens, 5 steps
    python benchmarks/bench_qlora_step.py --quick    # ~5M parameters, batch 2 x 64 tokens, 3 steps
    python benchmarks/bench_qlora_step.py --profile  # + torch.profiler's top ops of one step per stack,
                                                     #   written to results/bench_qlora_step_profile.md
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("minilora qlora", "peft+bnb qlora", "minilora lora", "peft lora")
SIZES = {  # name -> (LlamaConfig settings, batch, seq_len, warm-up steps, measured steps)
    "full": (dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8), 4, 128, 2, 5),
    "quick": (dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4), 2, 64, 1, 3),
}
RANK = 16
ROOT = Path(__file__).resolve().parent.parent
TOP_OPS = 12


def build_model(settings):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, use_cache=False, **settings))


def setup_minilora(model, quantized):
    import torch

    from minilora.lora import LoraConfig, add_lora
    from minilora.paged import PagedAdamW
    from minilora.qlora import quantize_model

    if quantized:
        quantize_model(model, blocksize=64, double_quant=True, quant_type="nf4", compute_dtype=torch.bfloat16)
    else:
        model.to(torch.bfloat16)
    add_lora(model, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    if quantized:  # page size as minilora.train picks it (2 MiB pages would waste memory on small matrices)
        optimizer = PagedAdamW(params, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    return model, optimizer


def setup_peft(model, quantized):
    import torch
    from peft import LoraConfig, get_peft_model

    if quantized:
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64)
                layer = layer.to("cpu")  # quantizes the weight
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        model.is_loaded_in_4bit = True
    else:
        model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    if quantized:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    return model, optimizer


def profile_step(model, optimizer, ids) -> list[tuple[str, int, float]]:
    """One training step under torch.profiler: the TOP_OPS ops by self CPU time, (name, calls, ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in events[:TOP_OPS]]


def worker(config: str, size: str, profiled: bool = False) -> dict:
    """Build one stack, run warm-up + measured steps, return timings and peak RSS."""
    import torch

    warnings.filterwarnings("ignore")
    settings, batch, seq_len, warmup, steps = SIZES[size]
    model = build_model(settings)
    setup = setup_minilora if config.startswith("minilora") else setup_peft
    model, optimizer = setup(model, quantized=config.endswith("qlora"))
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, settings["vocab_size"], (batch, seq_len), generator=generator)
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    top_ops = profile_step(model, optimizer, ids) if profiled else []
    return {"config": config, "top_ops": top_ops, "median_step_s": statistics.median(times), "steps": steps,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": trainable, "first_loss": losses[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~5M parameters, fewer steps")
    parser.add_argument("--profile", action="store_true", help="also profile one step per stack")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    if args.worker:
        print(json.dumps(worker(args.worker, size, args.profile)))
        return 0
    sys.path.insert(0, str(ROOT))
    from minilora.machine import describe_line

    settings, batch, seq_len, _, steps = SIZES[size]
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", config] + (["--quick"] if args.quick else []) + (
            ["--profile"] if args.profile else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{config}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{config}: {results[config]['median_step_s']:.3f} s/step, "
              f"{results[config]['peak_rss_mib']:.0f} MiB", flush=True)

    params = build_model(settings).num_parameters()
    lines = [describe_line(), "",
             f"Tiny Llama, {params / 1e6:.1f}M parameters, batch {batch} x {seq_len} tokens, LoRA r={RANK} on "
             f"all linear layers, median of {steps} steps, one process per row.", "",
             "| stack | median step (s) | peak RSS (MiB) | trainable | step vs peft | RSS vs peft |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for config in CONFIGS:
        r = results[config]
        ref = results["peft+bnb qlora" if config.endswith("qlora") else "peft lora"]
        lines.append(f"| {config} | {r['median_step_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['trainable']:,d} | "
                     f"{r['median_step_s'] / ref['median_step_s']:.2f}x | "
                     f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_qlora_step.md").write_text(table)
    if args.profile:
        profile = [describe_line(), "", f"Top {TOP_OPS} ops by self CPU time, one step after warm-up.", ""]
        for config in CONFIGS:
            profile += [f"### {config}", "", "| op | calls | self CPU (ms) |", "| --- | ---: | ---: |"]
            profile += [f"| `{name}` | {calls} | {ms:.1f} |" for name, calls, ms in results[config]["top_ops"]]
            profile.append("")
        print("\n".join(profile))
        (RESULTS / "bench_qlora_step_profile.md").write_text("\n".join(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
