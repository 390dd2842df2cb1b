"""Every option of a training run, with its default, its help text and its check, in one place.

The defaults train the book's running example (the tiny Llama, QLoRA on every linear layer) and finish in
about a minute on a CPU. A *recipe* is a named set of different defaults, chosen on purpose:

    python -m minilora.train                                    # the running example, QLoRA, r 8
    python -m minilora.train --recipe qlora-7b --model <folder> # the QLoRA paper's 7B recipe, r 64, ...

Options given explicitly win over the recipe's. `make_config` turns a dict, an argparse.Namespace or keyword
arguments into a checked `TrainConfig`; minilora.train runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minilora.architecture import METHODS  # the methods the memory model knows are the ones we train
from minilora.checks import check_bool, check_choice, check_int, check_number
from minilora.nf4 import BLOCKSIZES, QUANT_TYPES

OPTIMIZERS = ("adamw", "paged_adamw")
SCHEDULES = ("constant", "cosine")
DTYPE_NAMES = ("auto", "bf16", "fp32")  # auto: bf16 on a GPU that has it, else fp32
DISTRIBUTED_MODES = ("auto", "none", "ddp", "fsdp")
RUNNING_EXAMPLE = "running-example"
# Options that may differ between a run and its resumption (they do not change what is computed so far).
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "eval_every", "save_every", "save_total_limit",
                     "max_steps", "output_dir", "device", "distributed", "threads"}

# Options only some methods read; every other option applies to every method. A value other than the
# default under a method that does not read it is refused (`--method lora --quant-type fp4` would train an
# unquantized base while config.json said fp4); the defaults are the recipe's.
METHOD_OPTIONS = {
    ("lora", "qlora", "adalora"): ("r", "lora_alpha", "lora_dropout", "target", "autocast_adapter_dtype"),
    ("qlora",): ("quant_type", "double_quant", "blocksize"),
    ("adalora",): ("target_r", "tinit", "tfinal", "delta_t", "orth_reg_weight"),
}

# The QLoRA paper's recipe for 7B (Dettmers et al., 2023, appendix B): r 64, α 16, dropout 0.1 on all linear
# layers but the head, lr 2e-4 constant with 3 % warm-up, max_grad_norm 0.3, paged AdamW, batch 1 × 16
# gradient accumulation, 1875 steps (the Guanaco-7B run), gradient checkpointing. It needs a real model:
# on the tiny one, r 64 is larger than its 32-wide attention projections.
RECIPES = {
    "running-example": {},
    "qlora-7b": dict(method="qlora", r=64, lora_alpha=16, lora_dropout=0.1, target="all-linear", lr=2e-4,
                     schedule="constant", warmup_ratio=0.03, max_grad_norm=0.3, optimizer="paged_adamw",
                     batch_size=1, grad_accum=16, max_steps=1875, gradient_checkpointing=True,
                     eval_every=187, save_every=250, threads=0),
}


CHOICES = dict(recipe=tuple(RECIPES), method=METHODS, optimizer=OPTIMIZERS, schedule=SCHEDULES,
               compute_dtype=DTYPE_NAMES, quant_type=QUANT_TYPES, distributed=DISTRIBUTED_MODES,
               blocksize=BLOCKSIZES)


@dataclass
class TrainConfig:
    """Every option of a run. Field names are the CLI flags with '-' for '_' (`--lora-alpha`)."""

    recipe: str = "running-example"
    # what to train
    model: str = "tiny"
    random_init: bool = False
    data: str = RUNNING_EXAMPLE
    eval_data: str | None = None
    train_samples: int = 2048
    eval_samples: int = 256
    max_seq_len: int = 512
    # how
    method: str = "qlora"
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target: str = "all-linear"
    autocast_adapter_dtype: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    target_r: int = 2
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg_weight: float = 0.5
    # optimization
    optimizer: str = "paged_adamw"
    lr: float = 1e-2
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 120
    gradient_checkpointing: bool = True
    compute_dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    distributed: str = "auto"
    # bookkeeping
    output_dir: str = "runs/train"
    eval_every: int = 40
    save_every: int = 60
    save_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the option, its value and what is allowed."""
        for name, allowed in CHOICES.items():
            check_choice(flag(name), getattr(self, name), allowed)
        for name in ("r", "batch_size", "grad_accum", "max_steps", "train_samples", "eval_samples",
                     "max_seq_len", "target_r", "delta_t"):
            check_int(flag(name), getattr(self, name), 1)
        for name in ("eval_every", "save_every", "save_total_limit", "tinit", "tfinal", "seed", "threads"):
            check_int(flag(name), getattr(self, name), 0)
        for name in ("lora_alpha", "lr"):
            check_number(flag(name), getattr(self, name), 0, low_open=True)
        for name in ("weight_decay", "max_grad_norm", "orth_reg_weight"):
            check_number(flag(name), getattr(self, name), 0)
        for name in ("lora_dropout", "adam_beta1", "adam_beta2", "warmup_ratio"):
            check_number(flag(name), getattr(self, name), 0, 1, high_open=True)
        if self.method == "adalora" and self.target_r > self.r:
            raise ValueError(f"--target-r must be <= --r (AdaLoRA starts at rank r and prunes down to "
                             f"target_r), got target_r={self.target_r} > r={self.r}")
        check_bool("--autocast-adapter-dtype", self.autocast_adapter_dtype)
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"--target must be 'all-linear' or comma-separated module names, "
                             f"got {self.target!r}")
        self.check_method_options()

    def check_method_options(self) -> None:
        """ValueError for an option set (away from its default) that --method does not read (METHOD_OPTIONS)."""
        defaults = TrainConfig(**RECIPES[self.recipe])
        for methods, names in METHOD_OPTIONS.items():
            unread = [name for name in names if getattr(self, name) != getattr(defaults, name)]
            if self.method not in methods and unread:
                given = ", ".join(f"{flag(name)} {getattr(self, name)!r}" for name in unread)
                raise ValueError(f"{given}: only --method {' or '.join(methods)} reads "
                                 f"{'it' if len(unread) == 1 else 'them'}, got --method {self.method}; "
                                 f"leave {'it' if len(unread) == 1 else 'them'} out, or choose that method")

    def target_modules(self) -> str | tuple[str, ...]:
        """--target as LoraConfig's target_modules: "all-linear" or a tuple of module names."""
        target = self.target.strip()
        return target if target == "all-linear" else tuple(t.strip() for t in target.split(",") if t.strip())


def flag(name: str) -> str:
    """The command-line spelling of a field: "lora_alpha" → "--lora-alpha"."""
    return "--" + name.replace("_", "-")


def make_config(config=None, **overrides) -> TrainConfig:
    """A checked TrainConfig from a TrainConfig, a dict or an argparse.Namespace, plus keyword overrides.

    The recipe's defaults come first (`recipe=` among the values, else the running example), then the
    values given. An argparse.Namespace already holds the recipe's defaults (the parser applied them).
    """
    if config is None:
        values = {}
    elif isinstance(config, TrainConfig):
        values = dataclasses.asdict(config)
    elif hasattr(config, "__dict__") and not isinstance(config, dict):  # argparse.Namespace
        values = dict(vars(config))
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
    recipe = values.get("recipe", "running-example")
    check_choice("--recipe", recipe, tuple(RECIPES))
    result = TrainConfig(**{**RECIPES[recipe], **values})
    result.validate()
    return result


# The help text of every option (`python -m minilora.train --help` shows it with the default).
HELP = {
    "recipe": "a named set of defaults: " + ", ".join(RECIPES) + " (options given explicitly win)",
    "model": "'tiny' (the running example), a local Hugging Face folder, or a preset architecture "
             "(llama-7b; needs --random-init)",
    "random_init": "random weights instead of loading them (presets need it)",
    "data": "'running-example' or a JSONL file with one {\"prompt\": ..., \"response\": ...} per line",
    "eval_data": "JSONL file for evaluation (the running example has its own eval set)",
    "train_samples": "running example: number of training examples",
    "eval_samples": "running example: number of evaluation examples",
    "max_seq_len": "JSONL: examples are cut at this many tokens",
    "method": "what trains: " + ", ".join(METHODS),
    "r": "LoRA rank (AdaLoRA: initial rank); spelled --lora-r under torchrun",
    "lora_alpha": "LoRA α: the bypass is scaled by α / r (AdaLoRA: by α / ranknum)",
    "lora_dropout": "dropout on the bypass input",
    "target": "'all-linear' (every linear layer but the head) or comma-separated names, e.g. q_proj,v_proj; "
              "a name that matches no module is an error",
    "autocast_adapter_dtype": "peft's option of that name: adapters in float32 on a 16-bit base (the default), or "
                              "with --no-autocast-adapter-dtype in the base's 16-bit compute dtype (half the "
                              "adapter, gradient and AdamW-state memory; updates round to 16 bits)",
    "quant_type": "QLoRA: the 4-bit data type of the frozen base",
    "double_quant": "QLoRA: quantize the quantization constants too",
    "blocksize": "QLoRA: weights per absmax block",
    "target_r": "AdaLoRA: final average rank",
    "tinit": "AdaLoRA: warm-up steps before pruning",
    "tfinal": "AdaLoRA: final steps with the rank pattern fixed",
    "delta_t": "AdaLoRA: steps between maskings",
    "orth_reg_weight": "AdaLoRA: weight of the orthogonality penalty in the loss",
    "optimizer": "adamw (torch) or paged_adamw (minilora.paged)",
    "lr": "peak learning rate",
    "weight_decay": "AdamW's decoupled weight decay",
    "adam_beta1": "AdamW β1",
    "adam_beta2": "AdamW β2",
    "schedule": "learning rate after warm-up: constant or cosine decay",
    "warmup_ratio": "share of max_steps with a linear warm-up from 0",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps",
    "gradient_checkpointing": "recompute activations in backward instead of keeping them",
    "compute_dtype": "auto: bf16 on a GPU that supports it, else fp32",
    "seed": "seed of the adapter's initialisation, dropout and the data order",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "threads": "torch CPU threads (0: torch's default); the tiny model runs fastest on 1",
    "distributed": "under torchrun: ddp (replicated model, all-reduced LoRA gradients) or fsdp (sharded "
                   "adapter); auto: ddp when WORLD_SIZE > 1",
    "output_dir": "run folder: config.json, metrics.csv, loss.png, checkpoints, the final adapter/",
    "eval_every": "evaluate every N optimizer steps (0: only at the end)",
    "save_every": "checkpoint every N optimizer steps (0: no intermediate checkpoints)",
    "save_total_limit": "keep this many checkpoints (0: keep all)",
    "resume": "continue from the newest checkpoint in --output-dir",
    "overwrite": "start again in an --output-dir that holds a run",
    "progress": "a progress bar on a terminal, a line every tenth of the run otherwise",
}
