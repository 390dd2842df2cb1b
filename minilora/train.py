"""The training loop and its command line: full fine-tuning, LoRA, AdaLoRA and QLoRA through one loop.

    python -m minilora.train                                         # the running example: QLoRA, r 8, ~1 min
    python -m minilora.train --method adalora --max-steps 60 --output-dir runs/adalora
    python -m minilora.train --recipe qlora-7b --model <folder> --data train.jsonl   # the paper's 7B recipe

Every option, its default and its check are in minilora.options; one optimizer step is
minilora.loop.train_step, the same step the notebooks (`minilora.data.finetune`) and scripts/qlora_7b.py take:
micro-batches → loss → backward → clip → optimizer step → AdaLoRA's allocator → scheduler.

A run checks everything it can before it writes anything: the options, the run folder, the model and the
method (a target that matches nothing, a rank too large for a layer), the data files. Then it creates the run
folder (minilora.checkpoints, which also says what the folder guarantees) and trains, holding a lock on the
folder until it ends. It ends with run_dir/adapter/, the trained adapter in peft's format (LoRA, QLoRA,
AdaLoRA), and `--resume` continues a checkpointed run with exactly the losses the uninterrupted run would have
had (tests/test_train.py checks equality).

On several GPUs the same loop runs under torchrun, one process per GPU (minilora.distributed: DDP, or FSDP
sharding the adapter; the micro-batches are split among the processes, the losses are those of one process):

    torchrun --nproc_per_node 4 -m minilora.train --model <folder> --lora-r 16 --distributed ddp

Reading order: `build_run` (everything a run needs, built and checked by minilora.build), `train` and its
loop, then the command line (`build_parser`, `main`).
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

from minilora import distributed
from minilora.adalora import AdaLoraConfig, RankAllocator, orthogonal_penalty
from minilora.adapters import save_adapter
from minilora.build import (
    apply_method,
    build_model,
    build_optimizer,
    build_scheduler,
    check_targets,
    load_data,
    plan_model,
    resolve_compute_dtype,
    resolve_device,
)
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
from minilora.loop import Batches, Progress, TokenData, evaluate, train_step
from minilora.lora import LoraConfig, count_parameters
from minilora.measure import HostMemory
from minilora.options import HELP, RECIPES, TrainConfig, flag, make_config
from minilora.qlora import model_nbytes

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
    # Every check that needs no weight comes first: the model's architecture and checkpoint files, the data,
    # the adapter's targets. Then the model is built on the device one decoder layer at a time (QLoRA quantizes
    # each as it comes). Weights: trained ones in fp32 (full fine-tuning's master copy), frozen ones in the
    # compute dtype.
    plan, tokenizer = plan_model(config, torch.float32 if config.method == "full" else compute_dtype)
    train_data, eval_data = load_data(config, tokenizer)
    check_targets(plan.skeleton, config)
    model = build_model(plan, config, job.device, compute_dtype)
    adapter, allocator = apply_method(model, config)
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
    peak_memory_bytes: int  # CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory
    seconds: float
    model: nn.Module = field(repr=False)
    peak_anonymous_bytes: int | None = None  # CPU: the process's peak anonymous memory (sampled)


def train(config=None, **overrides) -> TrainResult:
    """Run one training job; `config` is a TrainConfig, a dict or an argparse.Namespace (or nothing), and
    keyword arguments override single options: `train(method="lora", max_steps=50, output_dir="runs/x")`.

    Under `torchrun` every process calls this; `--distributed` (minilora.distributed) decides how they share
    the work. Alone, the same code runs with a single-process `Distributed` whose methods are the plain ones."""
    config = make_config(config, **overrides)
    if config.threads:
        torch.set_num_threads(config.threads)
    job = distributed.setup(config.distributed, resolve_device(config.device))
    on_cuda = job.device.type == "cuda"
    try:
        # the run's peak: CUDA's allocator counts it; on a CPU it is the process's (minilora.measure)
        with contextlib.nullcontext() if on_cuda else HostMemory() as host:
            result = _train(config, job)
    finally:
        job.close()
    if on_cuda:
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(job.device)
    else:
        result.peak_memory_bytes, result.peak_anonymous_bytes = host.resident, host.anonymous
    return result


def _train(config: TrainConfig, job: distributed.Distributed) -> TrainResult:
    started = time.perf_counter()
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    job.run_on_main(check_run_dir, config)  # refuse a bad run folder before building anything
    run = build_run(config, job)            # model, method, data, optimizer: the other checks happen here
    # Rank 0 locks the run folder for the whole run (a second run into it gets an error) and writes config.json.
    with job.run_on_main(start_run_dir, config) or contextlib.nullcontext():
        return _loop(run, config, job, Path(config.output_dir), started)


def _loop(run: Run, config: TrainConfig, job, run_dir: Path, started: float) -> TrainResult:
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
    return TrainResult(config=config, run_dir=run_dir, losses=[r["loss"] for r in rows], evals=evals,
                       final_eval=final_eval, trainable_params=trainable, all_params=total,
                       model_bytes=model_bytes, peak_memory_bytes=0,  # train() measures the whole run's
                       seconds=time.perf_counter() - started, model=run.model)


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
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
    # No abbreviations anywhere: `--r 4` must not be read as `--recipe 4` (nor `--rec` as --recipe by one
    # parser and not the other).
    recipe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad options or input: nothing was trained
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk is full, a folder is not writable, ...: said in one line
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run folder: {result.run_dir} (adapter: {result.run_dir / 'adapter'})")
    print(f"trainable params: {result.trainable_params:,d} || all params: {result.all_params:,d}")
    print(f"final train loss: {result.losses[-1]:.4f}")
    if result.final_eval is not None:
        final = result.final_eval
        print(f"final eval: loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f}")
    if result.peak_anonymous_bytes is None:
        print(f"peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB")
    else:  # CPU: the process's memory (chapter 7, "Two kinds of peak")
        print(f"peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB resident, "
              f"{result.peak_anonymous_bytes / 2**20:.1f} MiB anonymous")
    return 0


if __name__ == "__main__":
    sys.exit(main())
