"""QLoRA on a 7B model: memory, time per step, tokens/s and MFU, minilora beside transformers + bitsandbytes + peft.

    # measure without weights: the architecture of a preset, random weights, synthetic data
    python scripts/qlora_7b.py --config llama-7b --random-init --seq-len 512 --steps 3 --stack both
    # the same on a CPU, one step at seq 64 (about 8 GiB; chapter 7, "The 7B recipe on a CPU")
    python scripts/qlora_7b.py --config llama-7b --random-init --device cpu --seq-len 64 --steps 1 --warmup 0 \
        --grad-accum 1
    # fine-tune a local checkpoint folder (safetensors) on a JSONL file of {"prompt", "response"}
    python scripts/qlora_7b.py --model /data/llama-7b-hf --data train.jsonl --steps 100
    # seconds on a CPU: the code path of the above on the book's tiny shape (tests use it)
    python scripts/qlora_7b.py --dry-run

The recipe is the QLoRA paper's for 7B (minilora.options.RECIPES["qlora-7b"]): NF4 with double
quantization, LoRA r 64, α 16, dropout 0.1 on every linear layer but the head, lr 2e-4, max_grad_norm 0.3,
paged AdamW, batch 1 × 16 gradient accumulation, gradient checkpointing, bf16 compute.

The model is built as `python -m minilora.train` builds it (minilora.build.plan_model and build_model, on
minilora.model_builder): its skeleton on the meta device, then one decoder layer at a time, read from the
checkpoint's safetensors files or drawn at random, each quantized before the next exists. The peak is the 4-bit
model plus one 16-bit layer plus the embeddings and head, never the 13.5 GB of a bf16 7B. The transformers +
bitsandbytes + peft stack gets the same random weights through the same builder, with bitsandbytes' Linear4bit
as the quantizer; from a checkpoint folder it loads as its users do, `from_pretrained(folder,
quantization_config=BitsAndBytesConfig(...))`.

Both stacks then run the same timed loop (`run_steps`: minilora.loop.train_step, the step of minilora.train
and of the notebooks): `warmup` optimizer steps, then `steps` timed ones. Reported per stack:

    setup s       building (or loading) the model, the adapter and the optimizer
    peak memory   GPU: torch.cuda.max_memory_allocated over setup + training (the allocator's high-water mark);
                  CPU: the process's peak resident and anonymous memory over setup + training
                  (minilora.measure.HostMemory; chapter 7, "Two kinds of peak")
    predicted     minilora.memory.estimate(...) for the same setup, next to the measurement
    s/step        wall time of one timed optimizer step (grad_accum micro-batches)
    tokens/s      trained tokens (attention-mask ones) in the timed steps ÷ their wall time
    MFU           tokens/s × FLOPs/token ÷ the GPU's peak dense bf16 FLOP/s, FLOPs/token =
                  minilora.memory.training_flops_per_token(N, "qlora", gradient_checkpointing=False) = 4N:
                  forward 2N + input-gradient backward 2N (no weight gradients for the frozen base), N = all
                  parameters, attention's T² term and the tiny adapters ignored. Checkpointing's recomputed
                  forward (+2N, 6N in all) is real work but not *model* FLOPs: it is reported as HFU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilora import memory  # noqa: E402
from minilora.architecture import PRESETS, architecture, linear_shapes  # noqa: E402
from minilora.build import (  # noqa: E402
    apply_method,
    build_model,
    build_optimizer,
    build_scheduler,
    load_data,
    plan_model,
    resolve_compute_dtype,
    resolve_device,
)
from minilora.loop import Batches, Job, TokenData, train_step  # noqa: E402
from minilora.lora import count_parameters  # noqa: E402
from minilora.measure import HostMemory  # noqa: E402
from minilora.options import RUNNING_EXAMPLE, TrainConfig, make_config  # noqa: E402
from minilora.paged import page_bytes_for  # noqa: E402

STACKS = ("minilora", "peft", "both")
# Peak dense bf16 tensor-core FLOP/s (no sparsity), NVIDIA datasheets; first matching name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312),
                    ("L40S", 362), ("L4", 121), ("A10", 125))
DRY_RUN = dict(config="tiny-llama", model=None, random_init=True, seq_len=[16], samples=8, steps=1, warmup=1,
               grad_accum=2, r=4, device="cpu")


# ----------------------------------------------------------------------------------------------------
# The quantizer of the transformers + bitsandbytes + peft stack
# ----------------------------------------------------------------------------------------------------


def bnb_quantizer(compute_dtype: torch.dtype, device: torch.device):
    """bitsandbytes' Linear4bit with the settings of BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16): what
    transformers puts in place of every linear when it loads a model with that config."""
    import bitsandbytes as bnb

    def quantize(layer: nn.Module) -> nn.Module:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=64,
                                           compress_statistics=True, quant_type="nf4", module=new).to(device)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
        return layer

    return quantize


def bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------------------------------
# The two stacks: model + adapter + optimizer
# ----------------------------------------------------------------------------------------------------


def setup_minilora(recipe: TrainConfig, device, compute_dtype):
    """The model, method and optimizer exactly as `python -m minilora.train` builds them."""
    plan, _ = plan_model(recipe, compute_dtype)
    model = build_model(plan, recipe, device, compute_dtype)
    torch.manual_seed(recipe.seed)
    apply_method(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, build_optimizer(params, recipe)  # minilora.paged.PagedAdamW


def setup_peft(recipe: TrainConfig, device, compute_dtype):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if recipe.random_init:  # the same random weights as ours, quantized by bitsandbytes
        plan, _ = plan_model(recipe, compute_dtype)
        model = plan.build(device, bnb_quantizer(compute_dtype, device))
        model.is_loaded_in_4bit = True  # as transformers marks a model it loaded with a BitsAndBytesConfig
    else:
        model = AutoModelForCausalLM.from_pretrained(recipe.model, quantization_config=bnb_config(compute_dtype),
                                                     dtype=compute_dtype, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(recipe.seed)
    model = get_peft_model(model, LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha,
                                             lora_dropout=recipe.lora_dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=recipe.lr, betas=(recipe.adam_beta1, recipe.adam_beta2),
                                          weight_decay=recipe.weight_decay)
    return model, params, optimizer


# ----------------------------------------------------------------------------------------------------
# Data and the timed loop
# ----------------------------------------------------------------------------------------------------


def load_tokens(args, recipe: TrainConfig, compute_dtype: torch.dtype) -> TokenData:
    """Synthetic sequences of exactly seq_len random tokens (every token scored), or the JSONL file read as
    minilora.train reads it (the model's tokenizer; a preset's UTF-8 bytes). Checked before any model is built."""
    plan, tokenizer = plan_model(recipe, compute_dtype)  # the skeleton only: no weight is read
    if args.data != "synthetic":
        return load_data(recipe, tokenizer)[0]
    generator = torch.Generator().manual_seed(args.seed)
    vocab_size = plan.skeleton.config.vocab_size
    ids = torch.randint(0, vocab_size, (args.samples, recipe.max_seq_len), generator=generator)
    return TokenData(ids, ids.clone(), torch.ones_like(ids))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CountingBatches(Batches):
    """minilora.loop.Batches that also counts the tokens it serves (attention-mask ones), for tokens/s."""

    tokens = 0

    def next(self) -> dict[str, torch.Tensor]:
        batch = super().next()
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def run_steps(model, optimizer, scheduler, batches: CountingBatches, recipe: TrainConfig, device, compute_dtype,
              steps: int, warmup: int) -> dict:
    """`warmup` + `steps` optimizer steps of minilora.loop.train_step (the loop of minilora.train); times the
    last `steps`: grad_accum × (forward under bf16 autocast, backward of loss / grad_accum), clip to
    max_grad_norm, optimizer and scheduler step, zero_grad."""
    autocast = contextlib.nullcontext
    if compute_dtype != torch.float32:
        autocast = lambda: torch.autocast(device.type, dtype=compute_dtype)  # noqa: E731
    job, losses, started = Job(device), [], None
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            started, batches.tokens = time.perf_counter(), 0
        result = train_step(model, batches, optimizer, step, grad_accum=recipe.grad_accum,
                            max_grad_norm=recipe.max_grad_norm, scheduler=scheduler, job=job, autocast=autocast)
        losses.append(result["loss"])
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"losses": losses, "timed_tokens": batches.tokens, "timed_seconds": seconds,
            "tokens_per_s": batches.tokens / seconds}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def predicted_report(config, recipe: TrainConfig, seq_len: int, stack: str, compute_dtype: torch.dtype,
                     device: torch.device) -> memory.MemoryReport:
    """minilora.memory.estimate for this run. Adapters, their gradients and Adam state are fp32 in both stacks
    (adapter_bytes=4); the weights that stay 16-bit (embeddings, head, norms) are in the compute dtype in ours
    and fp32 in peft's (prepare_model_for_kbit_training casts them). Activations are in the compute dtype; the
    dropout mask is a bool per entry on a GPU and has the compute dtype on a CPU."""
    compute_bytes = torch.finfo(compute_dtype).bits // 8
    return memory.estimate(config, method="qlora", r=recipe.r, target="all-linear", batch_size=recipe.batch_size,
                           seq_len=seq_len, gradient_checkpointing=True, optimizer="paged_adamw",
                           lora_dropout=recipe.lora_dropout, adapter_bytes=4, compute_bytes=compute_bytes,
                           dropout_mask_bytes=1 if device.type == "cuda" else compute_bytes,
                           weight_bytes=4 if stack == "peft" else compute_bytes)


def predicted_bytes(config, recipe: TrainConfig, seq_len: int, stack: str, compute_dtype: torch.dtype,
                    device: torch.device) -> int:
    return predicted_report(config, recipe, seq_len, stack, compute_dtype, device).total


def overhead_terms(config, recipe: TrainConfig, compute_dtype: torch.dtype, runtime: int) -> dict[str, int]:
    """What a CPU process of our stack holds beyond the memory model's tensors, term by term (chapter 7, "Two
    kinds of peak"), for a QLoRA run of `config` with minilora's adapters (fp32):

    runtime    the interpreter and the libraries, before any model (measured: `runtime_anonymous_bytes`);
    decode     Linear4bit decodes each weight into a buffer kept per size (minilora.kernels.scratch), in the
               compute dtype: one per distinct weight size (at 7B two, 4096 x 4096 and 11008 x 4096);
    pages      paged AdamW keeps each parameter's state in whole pages (minilora.paged.page_bytes_for): the
               rounding up of its 8 bytes per adapter parameter;
    allocator  memory freed but kept by glibc's malloc, which gives back to the system only blocks it mapped on
               their own, those above its mmap threshold (which grows up to 32 MiB as large blocks are freed); the
               adapters' gradients and the step's temporaries (1 to 3 MiB each at 7B) stay below it. Bounded by
               the gradients' bytes: on 12 of 7B's 32 layers, the step's peak was 0.224 GiB higher than with the
               threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_=131072), the gradients being 0.223 GiB;
    saving     safetensors' save_file copies every tensor to bytes before writing: the adapter once more.
    """
    report = predicted_report(config, recipe, 1, "minilora", compute_dtype, torch.device("cpu"))
    shapes = list(linear_shapes(config).values())
    adapter_shapes = [s for d_out, d_in in shapes for s in ((recipe.r, d_in), (d_out, recipe.r))]
    page = page_bytes_for([torch.empty(s, device="meta") for s in adapter_shapes])
    per_layer_pages = sum(math.ceil(8 * math.prod(s) / page) for s in adapter_shapes)
    pages = architecture(config).num_hidden_layers * per_layer_pages * page
    decode = torch.finfo(compute_dtype).bits // 8 * sum({d_out * d_in for d_out, d_in in shapes})
    return {"runtime": runtime, "decode": decode, "pages": pages - report.optimizer_state,
            "allocator": report.gradients, "saving": report.lora_params}


def runtime_anonymous_bytes() -> int:
    """The anonymous memory of a fresh process that has imported what a run imports (the interpreter, torch,
    transformers, minilora), before any model exists: measured, since it depends on the installed libraries."""
    code = ("import minilora.train, transformers.models.llama.modeling_llama\n"
            "from minilora.measure import status_bytes\nprint(status_bytes()['RssAnon'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(done.stdout.split()[-1])


def recipe_for(args, seq_len: int) -> TrainConfig:
    """The qlora-7b recipe with this script's options: the model, the sizes, the data's length."""
    return make_config(recipe="qlora-7b", model=args.config or args.model, random_init=args.random_init,
                       data=RUNNING_EXAMPLE if args.data == "synthetic" else args.data, max_seq_len=seq_len,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, r=args.r, lr=args.lr,
                       max_steps=args.warmup + args.steps, seed=args.seed, device=args.device,
                       compute_dtype=args.compute_dtype)


def measure(stack: str, recipe: TrainConfig, data: TokenData, args, device: torch.device) -> dict:
    """Build one stack, train it for warmup + steps, and return its numbers (frees everything after)."""
    compute_dtype = resolve_compute_dtype(recipe.compute_dtype, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    setup = setup_minilora if stack == "minilora" else setup_peft
    with HostMemory() as host:
        started = time.perf_counter()
        model, params, optimizer = setup(recipe, device, compute_dtype)
        setup_seconds = time.perf_counter() - started
        setup_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        batches = CountingBatches(data, recipe.batch_size, seed=args.seed)
        scheduler = build_scheduler(optimizer, recipe)
        timing = run_steps(model, optimizer, scheduler, batches, recipe, device, compute_dtype, args.steps,
                           args.warmup)
    cuda = device.type == "cuda"
    trainable, _ = count_parameters(model)
    n = memory.parameter_counts(model.config)["total"]
    flops_per_token = memory.training_flops_per_token(n, "qlora", gradient_checkpointing=False)  # 4N
    with_recompute = memory.training_flops_per_token(n, "qlora", gradient_checkpointing=True)  # 6N
    peak_flops = peak_tflops(device, args.peak_tflops)
    result = {
        "stack": stack, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "seq_len": data.input_ids.shape[1], "batch_size": recipe.batch_size, "grad_accum": recipe.grad_accum,
        "parameters": n, "trainable": trainable, "setup_seconds": setup_seconds, "setup_bytes": setup_bytes,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else host.resident,
        "peak_kind": "allocated (torch.cuda)" if cuda else "resident (process)",
        "peak_anonymous_bytes": None if cuda else host.anonymous,
        "predicted_bytes": predicted_bytes(model.config, recipe, data.input_ids.shape[1], stack, compute_dtype,
                                           device),
        "flops_per_token": flops_per_token, "peak_tflops": peak_flops,
        "mfu": None if peak_flops is None else memory.mfu(timing["tokens_per_s"], flops_per_token, peak_flops * 1e12),
        "hfu": None if peak_flops is None else memory.mfu(timing["tokens_per_s"], with_recompute, peak_flops * 1e12),
        **timing,
    }
    del model, params, optimizer, scheduler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown_table(results: list[dict]) -> str:
    """One row per (stack, seq_len): setup time, measured peak (GPU: allocated; CPU: resident and anonymous),
    the memory model's prediction, time per step, tokens/s, MFU, HFU."""
    rows = ["| stack | seq len | batch × accum | setup s | peak GiB (measured) | anonymous GiB | "
            "GiB (memory model) | s/step | tokens/s | MFU (4N) | HFU (6N) | last loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per_step = r["timed_seconds"] / max(1, len(r["losses"]) - r.get("warmup", 0))
        rows.append(f"| {r['stack']} | {r['seq_len']} | {r['batch_size']} × {r['grad_accum']} | "
                    f"{r['setup_seconds']:.1f} | {_gib(r['peak_bytes'])} | {_gib(r['peak_anonymous_bytes'])} | "
                    f"{_gib(r['predicted_bytes'])} | {per_step:.2f} | {r['tokens_per_s']:,.1f} | "
                    f"{_percent(r['mfu'])} | {_percent(r['hfu'])} | {r['losses'][-1]:.4f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    recipe = make_config(recipe="qlora-7b")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="local Hugging Face checkpoint folder, safetensors (nothing is downloaded)")
    p.add_argument("--config", "--preset", dest="config",
                   help=f"architecture preset for --random-init: {', '.join(PRESETS)}")
    p.add_argument("--random-init", action="store_true", help="random weights (memory/speed without weights)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a JSONL file of {prompt, response}")
    p.add_argument("--seq-len", type=int, nargs="+", default=[512],
                   help="synthetic length / JSONL cut-off; several values run one after the other")
    p.add_argument("--samples", type=int, default=64, help="synthetic sequences")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--batch-size", type=int, default=recipe.batch_size)
    p.add_argument("--grad-accum", type=int, default=recipe.grad_accum)
    p.add_argument("--r", "--lora-r", dest="r", type=int, default=recipe.r)
    p.add_argument("--lr", type=float, default=recipe.lr)
    p.add_argument("--stack", choices=STACKS, default="minilora", help="minilora, peft (+bitsandbytes) or both")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s for MFU (default: looked up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results (a list, one entry per stack and length) to this file")
    p.add_argument("--markdown", help="write the results table to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shape, 2 steps: " + ", ".join(f"{k}={v}" for k, v in DRY_RUN.items()))
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="only print the Markdown table of result files")
    return p


def check_args(args) -> None:
    if (args.model is None) == (args.config is None):
        raise ValueError("give exactly one of --model <checkpoint folder> and --config <preset> "
                         f"(got --model={args.model!r}, --config={args.config!r})")
    if args.config is not None and args.config not in PRESETS:
        raise ValueError(f"--config must be one of {sorted(PRESETS)}, got {args.config!r}")
    if args.config is not None and not args.random_init:
        raise ValueError(f"--config {args.config}: a preset is only an architecture; add --random-init")
    if min(args.seq_len) < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    for name in ("samples", "steps", "batch_size", "grad_accum", "r"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        raise ValueError(f"--warmup and --threads must be >= 0, got {args.warmup} and {args.threads}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        results = [r for path in args.summarize for r in json.loads(Path(path).read_text())]
        print(markdown_table(results))
        return 0
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_args(args)
        device = resolve_device(args.device)
        stacks = ("minilora", "peft") if args.stack == "both" else (args.stack,)
        results = []
        for seq_len in args.seq_len:
            recipe = recipe_for(args, seq_len)
            data = load_tokens(args, recipe, resolve_compute_dtype(recipe.compute_dtype, device))
            for stack in stacks:
                results.append(dict(measure(stack, recipe, data, args, device), warmup=args.warmup))
                r = results[-1]
                print(f"{stack}, seq {r['seq_len']}: losses {[round(x, 4) for x in r['losses']]}, "
                      f"setup {r['setup_seconds']:.1f} s, {r['tokens_per_s']:,.1f} tokens/s, peak "
                      f"{_gib(r['peak_bytes'])} GiB {r['peak_kind']}", flush=True)
                if args.json:  # after every measurement: a run cut short keeps what it measured
                    _write_text(args.json, json.dumps(results, indent=2) + "\n")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    r = results[0]
    print(f"model: {r['parameters']:,d} parameters, {r['trainable']:,d} trainable (LoRA r={recipe.r}); "
          f"device {r['device']}; MFU = tokens/s × {r['flops_per_token'] / r['parameters']:.0f}N FLOPs/token ÷ "
          f"peak {r['peak_tflops'] or '?'} TFLOP/s")
    table = markdown_table(results)
    print(table)
    if args.markdown:
        _write_text(args.markdown, table + "\n")
    return 0


def _write_text(path, text: str) -> None:
    """Atomically: a temporary file in the same folder, then renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
