"""The training loop and its command line: full fine-tuning, LoRA, AdaLoRA and QLoRA through one loop.

    python -m minilora.train                                         # the running example: QLoRA, r 8, ~1 min
    python -m minilora.train --method adalora --max-steps 60 --output-dir runs/adalora
    python -m minilora.train --recipe qlora-7b --model <folder> --data train.jsonl   # the paper's 7B recipe

Every option, its default and its check are in minilora.options; one optimizer step is
minilora.loop.train_step, the same step the notebooks (`minilora.data.finetune`) and scripts/qlora_7b.py take:
micro-batches → loss → backward → clip → optimizer step → AdaLoRA's allocator → scheduler.

A run checks everything it can before it writes anything: the options, the run folder, the model and the
method (a target that matches nothing, a rank too large for a layer), the data files. Then it creates the run
folder (minilora.checkpoints) and trains. It ends with run_dir/adapter/, the trained adapter in peft's format
(LoRA, QLoRA, AdaLoRA), and `--resume` continues a checkpointed run with exactly the losses the uninterrupted
run would have had (tests/test_train.py checks equality).

On several GPUs the same loop runs under torchrun, one process per GPU (minilora.distributed: DDP, or FSDP
sharding the adapter; the micro-batches are split among the processes, the losses are those of one process):

    torchrun --nproc_per_node 4 -m minilora.train --model <folder> --lora-r 16 --distributed ddp

Reading order: the model and the method (`load_model`, `apply_method`), the data (`load_data`), optimizer and
schedule, `build_run` (everything a run needs, checked), `train` and its loop, the command line (`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minilora import data as running_example
from minilora import distributed
from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora, orthogonal_penalty
from minilora.adapters import save_adapter
from minilora.checkpoints import (
    check_run_dir,
    list_checkpoints,
    load_checkpoint,
    plot_losses,
    read_metrics,
    save_checkpoint,
    set_rng_state,
    start_run_dir,
    write_metrics,
)
from minilora.instructions import CharTokenizer, HFTokenizer, read_jsonl, tokenize_records
from minilora.loop import Batches, Progress, TokenData, evaluate, train_step
from minilora.lora import LoraConfig, add_lora, count_parameters
from minilora.memory import PRESETS
from minilora.options import HELP, RECIPES, RUNNING_EXAMPLE, TrainConfig, flag, make_config
from minilora.paged import PagedAdamW
from minilora.qlora import enable_gradient_checkpointing, model_nbytes, prepare_for_kbit_training, quantize_model

# The running example's train and eval sets are fixed (independent of --seed, which orders and initialises).
TRAIN_DATA_SEED, EVAL_DATA_SEED = 1001, 1002
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# ----------------------------------------------------------------------------------------------------
# Device, model, method, data
# ----------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CUDA with bf16), fp32 otherwise, unless asked explicitly. (CPUs
    without bf16 instructions run bf16 matmuls slowly, so a CPU run stays fp32 unless told.)"""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[name]


def load_model(config: TrainConfig, dtype: torch.dtype):
    """(model, tokenizer or None): "tiny", a preset architecture of minilora.memory with random weights, or a
    local Hugging Face folder. `dtype`: the dtype the weights are loaded in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if config.model == "tiny":
        if config.random_init:
            model = running_example.build_tiny_llama(seed=config.seed)
        else:
            model = running_example.pretrained_tiny_llama()
        return model.to(dtype), CharTokenizer()
    if config.model in PRESETS:
        if not config.random_init:
            raise ValueError(f"--model {config.model}: a preset is only an architecture (no weights are "
                             f"downloaded here); add --random-init, or give a local Hugging Face folder")
        llama = LlamaConfig(**PRESETS[config.model], max_position_embeddings=2048, rms_norm_eps=1e-6,
                            tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return LlamaForCausalLM._from_config(llama, dtype=dtype), None
    folder = Path(config.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {config.model!r}: no such folder, and not a known name "
                                f"(known: 'tiny', {', '.join(repr(p) for p in PRESETS)})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {config.model!r}: not a Hugging Face model folder (no config.json in it)")
    if config.random_init:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder))
    return model, tokenizer


def adapter_config(config: TrainConfig) -> LoraConfig | AdaLoraConfig | None:
    """The adapter `config.method` trains (None for full fine-tuning)."""
    common = dict(lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  target_modules=config.target_modules())
    if config.method == "adalora":
        return AdaLoraConfig(init_r=config.r, target_r=config.target_r, tinit=config.tinit,
                             tfinal=config.tfinal, deltaT=config.delta_t, total_step=config.max_steps,
                             orth_reg_weight=config.orth_reg_weight, **common)
    return None if config.method == "full" else LoraConfig(r=config.r, **common)


def apply_method(model: nn.Module, config: TrainConfig, compute_dtype: torch.dtype):
    """Turn the loaded model into what `config.method` trains, in place; returns (adapter config, allocator)."""
    adapter = adapter_config(config)
    if adapter is None:  # full fine-tuning: every weight trains
        model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.config.use_cache = False
            enable_gradient_checkpointing(model)
        return None, None
    if config.method == "qlora":
        quantize_model(model, blocksize=config.blocksize, double_quant=config.double_quant,
                       quant_type=config.quant_type, compute_dtype=compute_dtype)
    # Adapters: freeze the base, norms in fp32, checkpointing that still reaches the adapter weights.
    prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    if isinstance(adapter, AdaLoraConfig):
        return adapter, RankAllocator(add_adalora(model, adapter), adapter)
    add_lora(model, adapter)
    return adapter, None


def load_data(config: TrainConfig, tokenizer) -> tuple[TokenData, TokenData | None]:
    """(train, eval) data: the running example's cipher task, or JSONL files."""
    if config.data == RUNNING_EXAMPLE:
        return (running_example.make_task("finetune", config.train_samples, seed=TRAIN_DATA_SEED),
                running_example.make_task("finetune", config.eval_samples, seed=EVAL_DATA_SEED))
    if tokenizer is None:
        raise ValueError(f"--data {config.data}: a JSONL file needs a tokenizer, and --model {config.model} "
                         f"has none (a Hugging Face folder with tokenizer files, or 'tiny')")
    train = tokenize_records(read_jsonl(config.data, "--data"), tokenizer, config.max_seq_len, config.data)
    if config.eval_data is None:
        return train, None
    records = read_jsonl(config.eval_data, "--eval-data")
    return train, tokenize_records(records, tokenizer, config.max_seq_len, config.eval_data)


# ----------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------------------


def build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.optimizer == "paged_adamw":
        return PagedAdamW(params, **kwargs)  # page size chosen to fit the (small) LoRA matrices
    return torch.optim.AdamW(params, **kwargs, foreach=False)


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based), as transformers' schedules:

    warm-up  step / warmup_steps for step < warmup_steps (so the very first step has lr 0);
    constant 1 afterwards;  cosine  ½ (1 + cos(π · progress)), progress from 0 to 1 over the rest.
    (Note: transformers' own "constant" schedule ignores warm-up altogether, and the QLoRA repository runs
    with it, so its warmup_ratio 0.03 has no effect there; ours warms up as asked.)
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = math.ceil(config.warmup_ratio * config.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, config.max_steps, config.schedule))


# ----------------------------------------------------------------------------------------------------
# Everything a run needs, built and checked before anything is written
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The pieces of one run; `forward` is the module to call (under DDP the wrapper around `model`)."""

    model: nn.Module
    forward: nn.Module
    adapter: LoraConfig | AdaLoraConfig | None
    allocator: RankAllocator | None
    train_data: TokenData
    eval_data: TokenData | None
    opt_params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Batches
    autocast: object
    extra_loss: object = None


def build_run(config: TrainConfig, job: distributed.Distributed) -> Run:
    distributed.check_options(job.mode, config.method, config.grad_accum, job.world_size)
    compute_dtype = resolve_compute_dtype(config.compute_dtype, job.device)
    random.seed(config.seed)  # the same seed on every rank: the same initial adapter everywhere
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    # Weights: trained ones in fp32 (full fine-tuning's master copy), frozen ones in the compute dtype.
    model, tokenizer = load_model(config, torch.float32 if config.method == "full" else compute_dtype)
    train_data, eval_data = load_data(config, tokenizer)
    adapter, allocator = apply_method(model.to(job.device), config, compute_dtype)
    forward = job.wrap(model)  # DDP's wrapper, or model itself (FSDP shards it in place)
    opt_params = job.optimizer_params([p for p in model.parameters() if p.requires_grad])
    optimizer = build_optimizer(opt_params, config)
    extra_loss = None
    if allocator is not None and config.orth_reg_weight > 0:
        extra_loss = lambda _: config.orth_reg_weight * orthogonal_penalty(model)  # noqa: E731
    autocast = contextlib.nullcontext
    if compute_dtype != torch.float32:
        autocast = lambda: torch.autocast(job.device.type, dtype=compute_dtype)  # noqa: E731
    return Run(model, forward, adapter, allocator, train_data, eval_data, opt_params, optimizer,
               build_scheduler(optimizer, config), Batches(train_data, config.batch_size, seed=config.seed),
               autocast, extra_loss)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `train` returns: the per-step losses (the whole run, resumed or not), the evaluations, the final
    evaluation, memory and parameter counts, the run folder, and the trained model itself."""

    config: TrainConfig
    run_dir: Path
    losses: list[float]
    evals: list[dict]
    final_eval: dict | None
    trainable_params: int
    all_params: int
    model_bytes: int
    peak_memory_bytes: int
    seconds: float
    model: nn.Module = field(repr=False)


def train(config=None, **overrides) -> TrainResult:
    """Run one training job; `config` is a TrainConfig, a dict or an argparse.Namespace (or nothing), and
    keyword arguments override single options: `train(method="lora", max_steps=50, output_dir="runs/x")`.

    Under `torchrun` every process calls this; `--distributed` (minilora.distributed) decides how they share
    the work. Alone, the same code runs with a single-process `Distributed` whose methods are the plain ones."""
    config = make_config(config, **overrides)
    if config.threads:
        torch.set_num_threads(config.threads)
    job = distributed.setup(config.distributed, resolve_device(config.device))
    try:
        return _train(config, job)
    finally:
        job.close()


def _train(config: TrainConfig, job: distributed.Distributed) -> TrainResult:
    started = time.perf_counter()
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    job.run_on_main(check_run_dir, config)  # refuse a bad run folder before building anything
    run = build_run(config, job)            # model, method, data, optimizer: the other checks happen here
    run_dir = job.run_on_main(start_run_dir, config) or Path(config.output_dir)
    rows, start = _resume(run, config, job, run_dir) if config.resume else ([], 0)

    run.model.train()
    bar = Progress(config.max_steps, start, desc=config.method, enabled=config.progress and job.is_main)
    for step in range(start, config.max_steps):
        result = train_step(run.forward, run.batches, run.optimizer, step, grad_accum=config.grad_accum,
                            max_grad_norm=config.max_grad_norm or math.inf, extra_loss=run.extra_loss,
                            after_step=run.allocator and run.allocator.update_and_allocate,
                            scheduler=run.scheduler, job=job, autocast=run.autocast)
        done = step + 1
        row = {"step": done, **result, "eval_loss": None, "eval_accuracy": None}
        if run.eval_data is not None and (done == config.max_steps
                                          or (config.eval_every and done % config.eval_every == 0)):
            scores = evaluate(run.model, run.eval_data, config.batch_size, run.autocast)  # on every rank
            row["eval_loss"], row["eval_accuracy"] = scores["loss"], scores["accuracy"]
        rows.append(dict(row, elapsed_s=round(time.perf_counter() - started, 3)))
        bar.update(loss=row["loss"], lr=row["lr"], eval_loss=row["eval_loss"])
        if config.save_every and (done % config.save_every == 0 or done == config.max_steps):
            _save_checkpoint(run, config, job, run_dir, rows, done)
    bar.close()
    return _finish(run, config, job, run_dir, rows, started)


def _resume(run: Run, config: TrainConfig, job, run_dir: Path) -> tuple[list[dict], int]:
    state = load_checkpoint(list_checkpoints(run_dir)[-1], run.model, run.optimizer, run.scheduler,
                            run.allocator, job, run.opt_params)
    run.batches.position = state["data_position"]
    rows = [row for row in read_metrics(run_dir / "metrics.csv") if row["step"] <= state["step"]]
    set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before the next step
    return rows, state["step"]


def _save_checkpoint(run: Run, config: TrainConfig, job, run_dir: Path, rows: list[dict], done: int) -> None:
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer_state = job.full_optimizer_state(run.optimizer, params)  # FSDP: gathered from all ranks
    with job.gathered(run.model):  # FSDP: full adapter weights on every rank while rank 0 saves
        if job.is_main:
            write_metrics(run_dir / "metrics.csv", rows)
            save_checkpoint(run_dir, done, run.model, run.adapter, optimizer_state, run.scheduler, run.batches,
                            run.allocator, config.save_total_limit)
    job.barrier()


def _finish(run: Run, config: TrainConfig, job, run_dir: Path, rows: list[dict], started: float) -> TrainResult:
    """The metrics file, the loss plot and the final adapter (run_dir/adapter/); then the numbers."""
    with job.gathered(run.model):
        if job.is_main:
            write_metrics(run_dir / "metrics.csv", rows)
            plot_losses(run_dir / "loss.png", rows, f"{config.method} on {config.data}")
            if run.adapter is not None:
                save_adapter(run.model, run_dir / "adapter", run.adapter)
        model_bytes = model_nbytes(run.model)
    job.barrier()
    evals = [{"step": r["step"], "loss": r["eval_loss"], "accuracy": r["eval_accuracy"]}
             for r in rows if r["eval_loss"] is not None]
    final_eval = evals[-1] if evals and evals[-1]["step"] == config.max_steps else None
    trainable, total = count_parameters(run.model)
    peak = torch.cuda.max_memory_allocated(job.device) if job.device.type == "cuda" else _peak_rss()
    return TrainResult(config=config, run_dir=run_dir, losses=[r["loss"] for r in rows], evals=evals,
                       final_eval=final_eval, trainable_params=trainable, all_params=total,
                       model_bytes=model_bytes, peak_memory_bytes=peak, seconds=time.perf_counter() - started,
                       model=run.model)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------


def build_parser(recipe: str = "running-example") -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag, with its help text and default (the recipe's where it has one)."""
    parser = argparse.ArgumentParser(
        prog="python -m minilora.train",
        description="Fine-tune a causal LM with full fine-tuning, LoRA, AdaLoRA or QLoRA. The defaults train "
                    "the book's running example in about a minute on a CPU; --recipe qlora-7b is the QLoRA "
                    "paper's 7B recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = {**dataclasses.asdict(TrainConfig()), **RECIPES.get(recipe, {}), "recipe": recipe}
    for f in dataclasses.fields(TrainConfig):
        default = defaults[f.name]
        if isinstance(default, bool):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=HELP[f.name])
            continue
        kind = int if f.type == "int" else float if f.type == "float" else str
        # torchrun's own parser claims abbreviations of its options (--r would match --rdzv-...), so
        # `torchrun ... -m minilora.train` needs the long spelling --lora-r.
        aliases = ("--lora-r",) if f.name == "r" else ()
        parser.add_argument(flag(f.name), *aliases, type=kind, default=default, help=HELP[f.name])
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line as a Namespace: --recipe first (it sets the defaults), then every option."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", default="running-example")
    known, _ = recipe.parse_known_args(argv)
    return build_parser(known.recipe).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"threads: {args.threads or torch.get_num_threads()} (--threads; the tiny model is fastest on 1)",
              flush=True)
    try:
        result = train(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run folder: {result.run_dir} (adapter: {result.run_dir / 'adapter'})")
    print(f"trainable params: {result.trainable_params:,d} || all params: {result.all_params:,d}")
    print(f"final train loss: {result.losses[-1]:.4f}")
    if result.final_eval is not None:
        final = result.final_eval
        print(f"final eval: loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f}")
    print(f"peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
