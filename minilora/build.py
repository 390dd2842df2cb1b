"""The pieces of a training run, built from its options (minilora.options.TrainConfig): the device and compute
dtype, the model, the method that turns it into what trains (full, LoRA, AdaLoRA, QLoRA), the data, the
optimizer and the learning-rate schedule.

Each function checks what it is given and raises before anything is written: minilora.train builds every
piece first and only then creates the run folder. scripts/qlora_7b.py builds its optimizer and schedule here
too, so the 7B measurement runs the recipe the command line runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from minilora import data as running_example
from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora
from minilora.architecture import PRESETS
from minilora.instructions import CharTokenizer, HFTokenizer, read_jsonl, tokenize_records
from minilora.loop import TokenData
from minilora.lora import LoraConfig, add_lora
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
    try:
        if isinstance(adapter, AdaLoraConfig):
            return adapter, RankAllocator(add_adalora(model, adapter), adapter)
        add_lora(model, adapter)
        return adapter, None
    except ValueError as err:
        recipe = f" (--recipe {config.recipe} chose r={config.r}; give --r, or a larger --model)"
        raise ValueError(f"--model {config.model}: {err}{recipe if 'r' in RECIPES[config.recipe] else ''}") from err


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
