"""LoRA: a frozen weight plus a trainable low-rank bypass (Hu et al., 2021).

A pretrained Linear layer computes h = W0 x with W0 of shape (d_out, d_in). Fine-tuning changes W0 by some ΔW;
LoRA bets that ΔW has low rank and writes it as a product of two thin matrices:

    h = W0 x + (α / r) · B A x,        A: (r, d_in),  B: (d_out, r),  r << min(d_in, d_out)      (LoRA eq. 3)

W0 stays frozen; only A and B train, r · (d_in + d_out) numbers per layer instead of d_in · d_out. B starts at
zero, so the wrapped model computes exactly what the pretrained one did until the first optimizer step.

Reading order: `LoRALinear` (one layer; what every bypass shares, the frozen base, the dropout and merging, is
minilora.bypass.LowRankLinear), `LoraConfig` (which layers, which rank), then `add_lora` and
`trainable_summary` for a whole model. The target-matching helpers (`find_target_modules`, `replace_module`,
`mark_only_lora_trainable`) and `merge_lora` live in minilora.bypass, shared with AdaLoRA, and are exported
here under the same names.

A base layer may be an `nn.Linear` or anything that follows the base-layer protocol of minilora.bypass (the
4-bit `minilora.qlora.Linear4bit` does).

Everything here mirrors peft 0.21 (initialisation, scaling, which modules a target pattern picks, the
parameter-count line), and tests/test_lora.py checks it against peft number for number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from minilora.bypass import (  # shared with AdaLoRA; exported from here too, as chapter 1 teaches them
    ALL_LINEAR,
    LowRankLinear,
    check_base,
    check_bypass_options,
    check_target_modules,
    find_target_modules,
    is_linear_like,
    mark_only_lora_trainable,
    merge_lora,
    replace_module,
    selected_modules,
    wrap_modules,
)
from minilora.checks import check_choice

__all__ = ["ALL_LINEAR", "INITS", "LowRankLinear", "LoRALinear", "LoraConfig", "add_lora", "check_base",
           "check_hyperparameters", "check_target_modules", "count_parameters", "find_target_modules",
           "is_linear_like", "lora_layers", "mark_only_lora_trainable", "merge_lora", "replace_module",
           "selected_modules", "trainable_summary", "wrap_modules"]

INITS = ("kaiming", "gaussian")


# ----------------------------------------------------------------------------------------------------
# Checking inputs
# ----------------------------------------------------------------------------------------------------


def check_hyperparameters(r, lora_alpha, lora_dropout, init) -> None:
    """Raise ValueError naming the argument and value for anything LoRA cannot use."""
    check_bypass_options(r, lora_alpha, lora_dropout)
    check_choice("init", init, INITS)


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


class LoRALinear(LowRankLinear):
    """h = base(x) + (α/r) · B A dropout(x), with `base` frozen and only A, B trainable (LoRA eq. 3).

    `lora_A` is (r, in_features), `lora_B` is (out_features, r), `scaling` = lora_alpha / r.
    The adapter matrices live in float32 on the base layer's device, whatever the base's dtype. The
    bypass runs in lora_A's dtype and the sum is cast back to the base output's dtype, so bf16 inputs work.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming"):
        check_hyperparameters(r, lora_alpha, lora_dropout, init)
        super().__init__(base, r, lora_alpha, lora_dropout)   # checks the base, freezes it
        self.scaling = lora_alpha / r
        self.lora_A = self.new_matrix(r, self.in_features)
        self.lora_B = self.new_matrix(self.out_features, r)
        self.reset_lora_parameters(init)
        self.train(base.training)   # a new module starts in training mode; follow the model it joins instead

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A random, B = 0: then B A = 0 and the model starts exactly where the pretrained one was.

        "kaiming": A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), the default init of an nn.Linear (kaiming_uniform_ with
        a = sqrt(5)); "gaussian": A ~ N(0, σ²) with σ = 1/r (peft's "gaussian": standard deviation 1/r).
        A must not also be zero: with A = B = 0 both gradients vanish and nothing ever trains.
        """
        check_choice("init", init, INITS)
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / self.r)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:  # ΔW already sits inside the base weight
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        # Two thin matmuls, (x A^T) B^T: the (out, in) matrix B A is never formed.
        update = (x_lora @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A, shape (out_features, in_features), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------
# Which layers and which rank: the config
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Which layers get a bypass (`target_modules`) and its hyper-parameters; defaults as peft's LoraConfig.

    target_modules, as in peft:
      - a list/tuple of names: a module matches if its full name equals an entry or ends with "." + entry
        ("q_proj" matches "model.layers.0.self_attn.q_proj");
      - a str: a regular expression that must match the *whole* module name (re.fullmatch);
      - "all-linear": every Linear layer except the output head.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | list[str] = ("q_proj", "v_proj")
    init: str = "kaiming"

    def __post_init__(self):
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init)
        check_target_modules(self.target_modules)


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every target of `config` in a LoRALinear (in place) and freeze everything else; returns `model`.

    All new layers are built (and so checked) before any is put in, so a bad rank for one layer leaves the
    model untouched.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.lora.LoraConfig, got {type(config).__name__}")
    wrap_modules(model, find_target_modules(model, config.target_modules),
                 lambda base: LoRALinear(base, r=config.r, lora_alpha=config.lora_alpha,
                                         lora_dropout=config.lora_dropout, init=config.init))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{full name: LoRALinear} for every LoRA bypass in the model (AdaLoRA's SVDLinear layers are not)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; named_parameters() yields a tied weight only once.

    A quantized base (the protocol above) keeps its 4-bit codes in buffers, not parameters; it is counted as
    the in_features x out_features weight it stands for, which is also what peft reports for bitsandbytes'
    4-bit layers (it doubles the numel of their packed uint8 storage).
    """
    trainable = total = 0
    for _, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    for module in model.modules():
        quantized = is_linear_like(module) and not isinstance(module, nn.Linear)
        if quantized and not isinstance(getattr(module, "weight", None), nn.Parameter):
            total += module.in_features * module.out_features
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """The line peft's print_trainable_parameters() prints, e.g.
    "trainable params: 2,048 || all params: 100,672 || trainable%: 2.0343"."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
