"""The training loop and its command line: full fine-tuning, LoRA, AdaLoRA and QLoRA with one readable loop.

    python -m minilora.train --model tiny --method qlora --max-steps 200 --output-dir runs/qlora-tiny

The defaults are the QLoRA paper's 7B recipe (Dettmers et al., 2023, appendix B): r 64, α 16, dropout 0.1
on all linear layers but the head, lr 2e-4 constant with 3 % warm-up, max_grad_norm 0.3, paged AdamW,
batch 1 × 16 gradient accumulation, gradient checkpointing and bf16 compute (on a GPU that has bf16; on a
CPU the compute stays fp32 unless you ask, since CPUs without bf16 instructions run bf16 matmuls slowly).

One optimizer step of the loop (`train`):

    for each of grad_accum micro-batches:   loss = model(batch).loss (+ AdaLoRA's orthogonality penalty)
                                             (loss / grad_accum).backward()
    clip the gradient norm to max_grad_norm
    optimizer.step(); AdaLoRA: allocator.update_and_allocate(step); scheduler.step(); zero_grad()
    log a metrics row; evaluate every eval_every steps; checkpoint every save_every steps

Everything that decides the next loss is in a checkpoint (trainable weights, optimizer state — paged state
included —, scheduler, RNG states, the data position, AdaLoRA's scores), so `--resume` continues with
exactly the losses the uninterrupted run would have had (tests/test_train.py checks equality).

On several GPUs the same loop runs under torchrun, one process per GPU (minilora.distributed: DDP, or FSDP
sharding the adapter; micro-batches split among the processes, the same losses as one process):

    torchrun --nproc_per_node 4 -m minilora.train --model <folder> --method qlora --distributed ddp

Reading order: `TrainConfig` (every option, validated), data (`load_data`; the JSONL reader, tokenizers and
`Batches` are in minilora.instructions), model and method (`load_model`, `apply_method`), optimizer and schedule,
`evaluate`, checkpoints (`save_checkpoint`, `load_checkpoint`; their pieces, the metrics file and the loss plot
are in minilora.checkpoints), `train`, `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from minilora import data as running_example
from minilora import distributed
from minilora.adalora import AdaLoraConfig, add_adalora, orthogonal_penalty
from minilora.adapters import save_adapter
from minilora.checkpoints import (
    CHECKPOINT_PREFIX,
    allocator_state,
    list_checkpoints,
    load_allocator_state,
    plot_losses,
    read_metrics,
    rng_state,
    set_rng_state,
    trainable_state,
    write_metrics,
)
from minilora.files import write_atomically
from minilora.instructions import Batches, CharTokenizer, HFTokenizer, TokenData, read_jsonl, tokenize_records
from minilora.lora import LoraConfig, add_lora, count_parameters
from minilora.paged import PagedAdamW
from minilora.qlora import enable_gradient_checkpointing, model_nbytes, prepare_for_kbit_training, quantize_model

METHODS = ("full", "lora", "adalora", "qlora")
OPTIMIZERS = ("adamw", "paged_adamw")
SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
RUNNING_EXAMPLE = "running-example"
# The running example's train and eval sets are fixed (independent of --seed, which orders and initialises).
TRAIN_DATA_SEED, EVAL_DATA_SEED = 1001, 1002
# Options that may differ between a run and its resumption (they do not change what is computed so far).
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "eval_every", "save_every", "save_total_limit",
                     "max_steps", "output_dir", "device", "distributed"}

# Architectures `--model` knows by name. "tiny" is the book's pretrained running-example model; the others
# are shapes for `--random-init` runs (memory and speed measurements without downloading weights).
PRESETS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
}


# ----------------------------------------------------------------------------------------------------
# The options
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every option of a run. Field names are the CLI flags with '-' for '_' (`--lora-alpha`)."""

    # what to train
    model: str = "tiny"  # a local Hugging Face folder, "tiny" (running example) or a PRESETS name
    random_init: bool = False  # build the architecture with random weights instead of loading them
    data: str = RUNNING_EXAMPLE  # "running-example" or a JSONL file of {"prompt": ..., "response": ...}
    eval_data: str | None = None  # JSONL for evaluation (the running example has its own eval set)
    train_samples: int = 4096  # running example: training examples
    eval_samples: int = 512  # running example: evaluation examples
    max_seq_len: int = 512  # JSONL: longer examples are cut at this many tokens
    # how
    method: str = "qlora"
    r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target: str = "all-linear"  # "all-linear", or comma-separated module names ("q_proj,v_proj")
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    target_r: int = 8  # AdaLoRA: final average rank (r is the initial rank)
    tinit: int = 0  # AdaLoRA: warm-up steps before pruning
    tfinal: int = 0  # AdaLoRA: final steps with the rank pattern fixed
    delta_t: int = 1  # AdaLoRA: steps between maskings
    orth_reg_weight: float = 0.5  # AdaLoRA: weight of the orthogonality penalty
    # optimization
    optimizer: str = "paged_adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3  # 0 turns clipping off
    batch_size: int = 1
    grad_accum: int = 16
    max_steps: int = 1875  # the paper's Guanaco-7B run
    gradient_checkpointing: bool = True
    compute_dtype: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    distributed: str = "auto"  # under torchrun: "ddp" or "fsdp" (auto: ddp if WORLD_SIZE > 1); "none"
    # bookkeeping
    output_dir: str = "runs/train"
    eval_every: int = 187  # 0: evaluate only at the end
    save_every: int = 250  # 0: no intermediate checkpoints
    save_total_limit: int = 2  # keep this many checkpoints (0: keep all)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the option, its value and what is allowed."""
        choices = dict(method=METHODS, optimizer=OPTIMIZERS, schedule=SCHEDULES,
                       compute_dtype=tuple(COMPUTE_DTYPES), quant_type=("nf4", "fp4", "int4"),
                       distributed=distributed.MODES,
                       blocksize=(32, 64, 128, 256, 512, 1024, 2048, 4096))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        positive_ints = ("r", "batch_size", "grad_accum", "max_steps", "train_samples", "eval_samples",
                         "max_seq_len", "target_r", "delta_t")
        for name in positive_ints:
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "save_every", "save_total_limit", "tinit", "tfinal", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_range("lora_alpha", self.lora_alpha, 0, None, low_open=True)
        _check_range("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        _check_range("lr", self.lr, 0, None, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0, None)
        _check_range("adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        _check_range("adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        _check_range("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        _check_range("max_grad_norm", self.max_grad_norm, 0, None)
        _check_range("orth_reg_weight", self.orth_reg_weight, 0, None)
        if self.method == "adalora" and self.target_r > self.r:
            raise ValueError(f"--target-r must be <= --r (AdaLoRA starts at rank r and prunes down to "
                             f"target_r), got target_r={self.target_r} > r={self.r}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"--target must be 'all-linear' or comma-separated module names, "
                             f"got {self.target!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                                 f"got {self.device!r}") from err


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_int(name, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}")


def _check_range(name, value, low, high, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        upper = "∞)" if high is None else f"{high}{')' if high_open else ']'}"
        interval = f"{'(' if low_open else '['}{low}, {upper}"
        raise ValueError(f"--{_flag(name)} must be a number in {interval}, got {value!r}")


def make_config(config=None, **overrides) -> TrainConfig:
    """A validated TrainConfig from a TrainConfig, a dict or an argparse.Namespace, plus keyword overrides."""
    if config is None:
        values = {}
    elif isinstance(config, TrainConfig):
        values = dataclasses.asdict(config)
    elif isinstance(config, argparse.Namespace):
        values = vars(config)
    elif isinstance(config, dict):
        values = dict(config)
    else:
        raise TypeError(f"config must be a TrainConfig, dict or argparse.Namespace, "
                        f"got {type(config).__name__}")
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options are {sorted(known)}")
    result = TrainConfig(**values)
    result.validate()
    return result


# ----------------------------------------------------------------------------------------------------
# Data: the running example's task, or JSONL files read by minilora.instructions
# ----------------------------------------------------------------------------------------------------


def _from_task(task) -> TokenData:
    return TokenData(task.input_ids, task.labels, torch.ones_like(task.input_ids))


def load_data(config: TrainConfig, tokenizer) -> tuple[TokenData, TokenData | None]:
    """(train, eval) data: the running example's cipher task, or JSONL files."""
    if config.data == RUNNING_EXAMPLE:
        train = running_example.make_task("finetune", config.train_samples, seed=TRAIN_DATA_SEED)
        evaluation = running_example.make_task("finetune", config.eval_samples, seed=EVAL_DATA_SEED)
        return _from_task(train), _from_task(evaluation)
    if tokenizer is None:
        raise ValueError(f"--data {config.data}: a JSONL file needs a tokenizer, and --model {config.model} "
                         f"has none (a Hugging Face folder with tokenizer files, or 'tiny')")
    train = tokenize_records(read_jsonl(config.data), tokenizer, config.max_seq_len, config.data)
    evaluation = None
    if config.eval_data is not None:
        evaluation = tokenize_records(read_jsonl(config.eval_data), tokenizer, config.max_seq_len,
                                      config.eval_data)
    return train, evaluation


# ----------------------------------------------------------------------------------------------------
# Device, dtypes, model, method
# ----------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CUDA with bf16), fp32 otherwise, unless asked explicitly."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return COMPUTE_DTYPES[name]


def load_model(config: TrainConfig, dtype: torch.dtype):
    """(model, tokenizer or None). `dtype`: the dtype the (frozen or trained) weights are loaded in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LlamaForCausalLM._from_config(LlamaConfig(**PRESETS[config.model]), dtype=dtype)
        return model, None
    folder = Path(config.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {config.model!r}: no such folder, and not a known name "
                                f"(known: 'tiny', {', '.join(repr(p) for p in PRESETS)})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {config.model!r}: not a Hugging Face model folder (no config.json in it)")
    if config.random_init:
        from transformers import AutoConfig
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder))
    return model, tokenizer


def lora_config(config: TrainConfig) -> LoraConfig:
    target = config.target.strip()
    targets = target if target == "all-linear" else tuple(t.strip() for t in target.split(",") if t.strip())
    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets)


def apply_method(model: nn.Module, config: TrainConfig, compute_dtype: torch.dtype):
    """Turn the loaded model into what `config.method` trains; returns (model, adapter config, allocator)."""
    allocator = None
    if config.method == "full":
        model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.config.use_cache = False
            enable_gradient_checkpointing(model)
        return model, None, None
    if config.method == "qlora":
        quantize_model(model, blocksize=config.blocksize, double_quant=config.double_quant,
                       quant_type=config.quant_type, compute_dtype=compute_dtype)
    # Adapters: freeze the base, norms in fp32, checkpointing that still reaches the adapter weights.
    prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    adapter = lora_config(config)
    if config.method == "adalora":
        adapter = AdaLoraConfig(init_r=config.r, target_r=config.target_r, tinit=config.tinit,
                                tfinal=config.tfinal, deltaT=config.delta_t, total_step=config.max_steps,
                                orth_reg_weight=config.orth_reg_weight, lora_alpha=config.lora_alpha,
                                lora_dropout=config.lora_dropout, target_modules=adapter.target_modules)
        allocator = add_adalora(model, adapter)
    else:
        add_lora(model, adapter)
    return model, adapter, allocator


# ----------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------------------


def build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.weight_decay)
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
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, device: torch.device, autocast, batch_size: int = 64,
             progress: bool = False) -> dict:
    """{"loss": mean cross-entropy per response token, "accuracy": share of examples with every response
    token right (teacher forcing)} — the running example's definitions (minilora.data.evaluate)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, targets = logits.float()[:, :-1], batch["labels"][:, 1:]  # position t predicts token t+1
        scored = targets != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        tokens += int(scored.sum())
        correct += int(((logits.argmax(-1) == targets) | ~scored).all(dim=1).sum())
    model.train(was_training)
    return {"loss": loss_sum / tokens, "accuracy": correct / len(data)}


# ----------------------------------------------------------------------------------------------------
# Checkpoints: everything the next loss depends on (the pieces: minilora.checkpoints), written atomically
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model, adapter, optimizer, scheduler, batches, allocator,
                    keep: int, optimizer_state: dict | None = None) -> Path:
    """run_dir/checkpoint-<step>/: trainable.safetensors (exact trainable weights), adapter/ (peft format,
    for LoRA and QLoRA), training_state.pt (optimizer, scheduler, RNG, data position, AdaLoRA state).

    Written into a temporary folder and renamed into place, so a crash leaves either the complete checkpoint
    or none: `--resume` never finds half of one. `optimizer_state` (default: optimizer.state_dict()) lets a
    distributed run pass the state it gathered from all ranks.
    """
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if isinstance(adapter, LoraConfig):
            save_adapter(model, tmp / "adapter", adapter)
        if optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "data_position": batches.position,
                    "allocator": None if allocator is None else allocator_state(allocator)},
                   tmp / "training_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler, allocator, job=None, opt_params=None) -> dict:
    """Restore a checkpoint into the run; `job` (a minilora.distributed.Distributed) puts each rank's share of
    sharded (FSDP) tensors in place, `opt_params` being the tensors the optimizer updates."""
    job = job or distributed.Distributed()
    saved = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        raise ValueError(f"{folder}: the checkpoint's trainable tensors do not match this model "
                         f"(missing {sorted(expected - set(saved))[:5]}, "
                         f"unexpected {sorted(set(saved) - expected)[:5]})")
    with torch.no_grad():
        for name, tensor in saved.items():
            job.copy_into_parameter(params[name], tensor)
    state = torch.load(folder / "training_state.pt", weights_only=False)
    job.load_optimizer_state(optimizer, state["optimizer"], opt_params)
    scheduler.load_state_dict(state["scheduler"])
    if allocator is not None:
        load_allocator_state(allocator, state["allocator"])
    return state


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


def _autocast_factory(device: torch.device, compute_dtype: torch.dtype):
    """A function returning the context every forward runs in: bf16 autocast, or nothing for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_config = run_dir / "config.json"
    if config.resume:
        if not list_checkpoints(run_dir):
            raise ValueError(f"--resume: no {CHECKPOINT_PREFIX}<step> folder in {run_dir} to resume from")
        old = json.loads(saved_config.read_text())
        changed = {k for k, v in dataclasses.asdict(config).items() if old.get(k) != v} - RESUMABLE_CHANGES
        if changed:
            raise ValueError(f"--resume: options {sorted(changed)} differ from the run in {run_dir} "
                             f"(was {({k: old.get(k) for k in sorted(changed)})}); "
                             f"a resumed run must use the same")
    elif list_checkpoints(run_dir) or (run_dir / "metrics.csv").exists():
        if not config.overwrite:
            raise ValueError(f"--output-dir {run_dir} already holds a run; pass --resume to continue it or "
                             f"--overwrite to start again")
        for old in list_checkpoints(run_dir):
            shutil.rmtree(old)
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    write_atomically(saved_config, lambda tmp: Path(tmp).write_text(text))
    return run_dir


def train(config=None, **overrides) -> TrainResult:
    """Run one training job; `config` is a TrainConfig, a dict or an argparse.Namespace (or nothing), and
    keyword arguments override single options: `train(method="lora", max_steps=50, output_dir="runs/x")`.

    Under `torchrun` every process calls this; `--distributed` (minilora.distributed) decides how they share
    the work. Alone, the same code runs with a single-process `Distributed` whose methods do nothing."""
    config = make_config(config, **overrides)
    job = distributed.setup(config.distributed, resolve_device(config.device))
    try:
        return _train(config, job)
    finally:
        job.close()


def _train(config: TrainConfig, job: distributed.Distributed) -> TrainResult:
    started = time.perf_counter()
    distributed.check_options(job.mode, config.method, config.grad_accum, job.world_size)
    device = job.device  # under torchrun with CUDA: this process's GPU
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_dir, error = Path(config.output_dir), None
    if job.is_main:  # only rank 0 touches the run folder
        try:
            run_dir = _prepare_run_dir(config)
        except (ValueError, OSError) as err:
            error = err
    job.broadcast_error(error)
    random.seed(config.seed)  # the same seed on every rank: the same initial adapter everywhere
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # Weights: trained ones in fp32 (full fine-tuning's master copy), frozen ones in the compute dtype.
    load_dtype = torch.float32 if config.method == "full" else compute_dtype
    model, tokenizer = load_model(config, load_dtype)
    train_data, eval_data = load_data(config, tokenizer)
    model.to(device)
    model, adapter, allocator = apply_method(model, config, compute_dtype)
    forward_model = job.wrap(model)  # DDP's wrapper, or model itself (FSDP shards it in place)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_params = job.optimizer_params(params)  # FSDP: this rank's shards; otherwise `params` itself
    optimizer = build_optimizer(opt_params, config)
    scheduler = build_scheduler(optimizer, config)
    batches = Batches(train_data, config.batch_size, seed=config.seed)
    autocast = _autocast_factory(device, compute_dtype)

    metrics_path = run_dir / "metrics.csv"
    rows, start_step = [], 0
    if config.resume:
        checkpoint = list_checkpoints(run_dir)[-1]
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, allocator, job, opt_params)
        start_step, batches.position = state["step"], state["data_position"]
        rows = [row for row in read_metrics(metrics_path) if row["step"] <= start_step]
        set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before step 1

    model.train()
    progress = config.progress and job.is_main
    mine = job.micro_batches_per_rank(config.grad_accum)  # grad_accum in a single process
    bar = tqdm(total=config.max_steps, initial=start_step, desc=config.method, disable=not progress)
    for step in range(start_step, config.max_steps):
        loss_sum, done_here = 0.0, 0
        for micro in range(config.grad_accum):
            batch = batches.next()  # every rank advances the same data position ...
            if not job.is_mine(micro):
                continue  # ... and computes only its own micro-batches (micro % world_size == rank)
            done_here += 1
            batch = {k: v.to(device) for k, v in batch.items()}
            with job.gradient_sync(forward_model, sync=done_here == mine):  # reduce after the last one
                with autocast():
                    loss = forward_model(**batch).loss
                    total = loss
                    if allocator is not None and config.orth_reg_weight > 0:
                        total = loss + config.orth_reg_weight * orthogonal_penalty(model)
                (total / mine).backward()  # DDP/FSDP average over ranks: Σ loss / grad_accum in all
            loss_sum += loss.item()
        loss_sum = job.sum_over_ranks(loss_sum)
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = job.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = optimizer.param_groups[0]["lr"]
        job.hand_gradients_to_optimizer(params, opt_params)
        optimizer.step()
        if allocator is not None:
            allocator.update_and_allocate(step)  # after step(), before zero_grad(): it needs the gradients
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        job.zero_grad(params)

        done = step + 1
        row = {"step": done, "loss": loss_sum / config.grad_accum, "lr": lr, "grad_norm": grad_norm,
               "eval_loss": None, "eval_accuracy": None, "elapsed_s": round(time.perf_counter() - started, 3)}
        if eval_data is not None and ((config.eval_every and done % config.eval_every == 0)
                                      or done == config.max_steps):
            result = evaluate(model, eval_data, device, autocast, progress=progress)  # on every rank
            row["eval_loss"], row["eval_accuracy"] = result["loss"], result["accuracy"]
        rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        if config.save_every and (done % config.save_every == 0 or done == config.max_steps):
            optimizer_state = job.full_optimizer_state(optimizer, params)  # FSDP: gathered from all ranks
            with job.gathered(model):  # FSDP: full adapter weights on every rank while rank 0 saves
                if job.is_main:
                    write_metrics(metrics_path, rows)
                    save_checkpoint(run_dir, done, model, adapter, optimizer, scheduler, batches, allocator,
                                    config.save_total_limit, optimizer_state)
            job.barrier()
    bar.close()

    if job.is_main:
        write_metrics(metrics_path, rows)
        plot_losses(run_dir / "loss.png", rows, f"{config.method} on {config.data}")
    evals = [{"step": r["step"], "loss": r["eval_loss"], "accuracy": r["eval_accuracy"]}
             for r in rows if r["eval_loss"] is not None]
    final_eval = evals[-1] if evals and evals[-1]["step"] == config.max_steps else None
    trainable, total = count_parameters(model)
    with job.gathered(model):
        model_bytes = model_nbytes(model)
    job.barrier()
    return TrainResult(config=config, run_dir=run_dir, losses=[r["loss"] for r in rows], evals=evals,
                       final_eval=final_eval, trainable_params=trainable, all_params=total,
                       model_bytes=model_bytes, peak_memory_bytes=_peak_memory(device),
                       seconds=time.perf_counter() - started, model=model)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

HELP = {
    "model": "local Hugging Face model folder, 'tiny' (the running example) or a preset: "
             + ", ".join(PRESETS),
    "random_init": "random weights instead of loading them (presets need it)",
    "data": "'running-example' or a JSONL file with one {\"prompt\": ..., \"response\": ...} per line",
    "eval_data": "JSONL file for evaluation",
    "method": "what trains: " + ", ".join(METHODS),
    "target": "'all-linear' (every linear layer but the head) or comma-separated names, e.g. q_proj,v_proj",
    "r": "LoRA rank (AdaLoRA: initial rank); --lora-r under torchrun",
    "target_r": "AdaLoRA: final average rank",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "compute_dtype": "auto: bf16 on a GPU that supports it, else fp32",
    "eval_every": "evaluate every N optimizer steps (0: only at the end)",
    "save_every": "checkpoint every N optimizer steps (0: none)",
    "resume": "continue from the newest checkpoint in --output-dir",
    "distributed": "under torchrun: ddp (replicated model, all-reduced LoRA gradients) or fsdp (sharded "
                   "adapter); auto: ddp when WORLD_SIZE > 1",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilora.train",
        description="Fine-tune a causal LM with full fine-tuning, LoRA, AdaLoRA or QLoRA. "
                    "Defaults: the QLoRA paper's 7B recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"method": METHODS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
               "compute_dtype": tuple(COMPUTE_DTYPES), "quant_type": ("nf4", "fp4", "int4"),
               "distributed": distributed.MODES}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + _flag(f.name)
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=HELP.get(f.name, " "))
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("lora_alpha", "lora_dropout", "lr", "weight_decay", "warmup_ratio",
                          "max_grad_norm"):
                kind = float
            # torchrun's own parser claims abbreviations of its options (--r would match --rdzv-...), so
            # `torchrun ... -m minilora.train` needs the long spelling --lora-r.
            aliases = ("--lora-r",) if f.name == "r" else ()
            parser.add_argument(flag, *aliases, type=kind, default=default, choices=choices.get(f.name),
                                help=HELP.get(f.name, " "))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run folder: {result.run_dir}")
    print(f"trainable params: {result.trainable_params:,d} || all params: {result.all_params:,d}")
    print(f"final train loss: {result.losses[-1]:.4f}")
    if result.final_eval is not None:
        final = result.final_eval
        print(f"final eval: loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f}")
    print(f"peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
