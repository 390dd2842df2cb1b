"""The pieces of a training run, built from its options (minilora.options.TrainConfig): the device and compute
dtype, the model, the method that turns it into what trains (full, LoRA, AdaLoRA, QLoRA), the data, the
optimizer and the learning-rate schedule.

Each function checks what it is given and raises before anything is written: minilora.train checks the model's
plan, the data and the adapter's targets before it builds the model (`plan_model`, `load_data`,
`check_targets`, then `build_model`), and creates the run folder only after that. scripts/qlora_7b.py builds
its model, method, optimizer and schedule here too, so the 7B measurement runs the recipe the command line runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from minilora import data as running_example
from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora
from minilora.architecture import PRESETS
from minilora.bypass import check_rank_bound, find_target_modules
from minilora.instructions import ByteTokenizer, CharTokenizer, HFTokenizer, read_jsonl, tokenize_records
from minilora.loop import TokenData
from minilora.lora import LoraConfig, add_lora
from minilora.model_builder import ModelPlan, plan_checkpoint, plan_random, preset_config, skeleton, state_weights
from minilora.options import RECIPES, RUNNING_EXAMPLE, TrainConfig
from minilora.paged import PagedAdamW
from minilora.qlora import enable_gradient_checkpointing, prepare_for_kbit_training, quantize_model

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


def plan_model(config: TrainConfig, dtype: torch.dtype) -> tuple[ModelPlan, object]:
    """(the model's plan, its tokenizer or None): everything about the model that can be checked before a
    weight is read (minilora.model_builder): its architecture as a skeleton on the meta device, a checkpoint
    folder's files against it, the tokenizer. `dtype`: the dtype the weights are built in.

    "tiny" is the running example (pretrained, or random with --random-init; its letters tokenizer); a preset
    of minilora.architecture is only an architecture, so it needs --random-init, and its tokenizer reads text
    as UTF-8 bytes (random weights match no real tokenizer); a local Hugging Face folder has its config.json,
    safetensors weights (or random ones with --random-init) and its own tokenizer files, if any.
    """
    from transformers import AutoConfig, AutoTokenizer

    if config.model == "tiny":
        tiny = (running_example.build_tiny_llama(seed=config.seed) if config.random_init
                else running_example.pretrained_tiny_llama())
        return ModelPlan(skeleton(tiny.config, dtype), state_weights(tiny.state_dict()), dtype), CharTokenizer()
    if config.model in PRESETS:
        if not config.random_init:
            raise ValueError(f"--model {config.model}: a preset is only an architecture (no weights are "
                             f"downloaded here); add --random-init, or give a local Hugging Face folder")
        plan = plan_random(preset_config(config.model), dtype, config.seed)
        fits_bytes = plan.skeleton.config.vocab_size >= ByteTokenizer.vocab_size
        return plan, ByteTokenizer() if fits_bytes else None
    folder = Path(config.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {config.model!r}: no such folder, and not a known name "
                                f"(known: 'tiny', {', '.join(repr(p) for p in PRESETS)})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {config.model!r}: not a Hugging Face model folder (no config.json in it)")
    if config.random_init:
        plan = plan_random(AutoConfig.from_pretrained(folder), dtype, config.seed)
    else:
        plan = plan_checkpoint(folder, dtype)
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder))
    return plan, tokenizer


def check_targets(model: nn.Module, config: TrainConfig) -> None:
    """The adapter's target modules match layers of `model` (a skeleton will do), and --r fits each of them
    (minilora.bypass.check_rank_bound: `--lora-r 1000000` is a typo that would exhaust the memory): a mistake
    fails here, before any weight or adapter is built."""
    if config.method == "full":
        return
    try:
        for name in find_target_modules(model, config.target_modules()):
            check_rank_bound(model.get_submodule(name), config.r, "--r", name)
    except ValueError as err:
        raise on_the_command_line(err, config) from err


def on_the_command_line(err: ValueError, config: TrainConfig) -> ValueError:
    """`err` as the command line says it: naming --model, and the recipe where the recipe chose r."""
    chosen = RECIPES[config.recipe].get("r") == config.r
    recipe = f" (--recipe {config.recipe} chose r={config.r}; give --r, or a larger --model)" if chosen else ""
    return ValueError(f"--model {config.model}: {err}{recipe}")


def build_model(plan: ModelPlan, config: TrainConfig, device: torch.device, compute_dtype: torch.dtype):
    """The planned model on `device`, one decoder layer at a time; for QLoRA each layer's linears are quantized
    (minilora.qlora.quantize_model) as soon as the layer exists, so the 16-bit model never does."""
    quantize = None
    if config.method == "qlora":
        def quantize(layer: nn.Module) -> nn.Module:
            return quantize_model(layer, blocksize=config.blocksize, double_quant=config.double_quant,
                                  quant_type=config.quant_type, compute_dtype=compute_dtype, skip=())
    return plan.build(device, quantize)


def adapter_config(config: TrainConfig) -> LoraConfig | AdaLoraConfig | None:
    """The adapter `config.method` trains (None for full fine-tuning)."""
    common = dict(lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  target_modules=config.target_modules())
    if config.method == "adalora":
        return AdaLoraConfig(init_r=config.r, target_r=config.target_r, tinit=config.tinit,
                             tfinal=config.tfinal, deltaT=config.delta_t, total_step=config.max_steps,
                             orth_reg_weight=config.orth_reg_weight, **common)
    return None if config.method == "full" else LoraConfig(r=config.r, **common)


def apply_method(model: nn.Module, config: TrainConfig):
    """Turn the built model (QLoRA's quantized already) into what `config.method` trains, in place; returns
    (adapter config, allocator)."""
    adapter = adapter_config(config)
    if adapter is None:  # full fine-tuning: every weight trains
        model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.config.use_cache = False
            enable_gradient_checkpointing(model)
        return None, None
    # Adapters: freeze the base, norms in fp32, checkpointing that still reaches the adapter weights.
    prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    try:
        if isinstance(adapter, AdaLoraConfig):
            layers = add_adalora(model, adapter, autocast_adapter_dtype=config.autocast_adapter_dtype)
            return adapter, RankAllocator(layers, adapter)
        add_lora(model, adapter, autocast_adapter_dtype=config.autocast_adapter_dtype)
        return adapter, None
    except ValueError as err:
        raise on_the_command_line(err, config) from err


def load_data(config: TrainConfig, tokenizer) -> tuple[TokenData, TokenData | None]:
    """(train, eval) data: the running example's cipher task, or JSONL files."""
    if config.data == RUNNING_EXAMPLE:
        return (running_example.make_task("finetune", config.train_samples, seed=TRAIN_DATA_SEED),
                running_example.make_task("finetune", config.eval_samples, seed=EVAL_DATA_SEED))
    if tokenizer is None:
        raise ValueError(f"--data {config.data}: a JSONL file needs a tokenizer, and --model {config.model} "
                         f"has none (a Hugging Face folder brings its tokenizer files, 'tiny' its letters, a "
                         f"preset with --random-init reads UTF-8 bytes if its vocabulary has "
                         f"{ByteTokenizer.vocab_size} tokens or more)")
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
