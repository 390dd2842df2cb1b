"""Exercise 1: build LoRA yourself (Chapter 1, chapters/01-lora.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_01_lora.py            # against this file

until everything passes. The book's solution is minilora/lora.py; try without it first.

You write: LoRALinear (init, forward, delta_weight, merge, unmerge) and add_lora.
Given (imported from minilora, not part of the exercise): LoraConfig and the module-finding helpers.
"""

import math  # noqa: F401  (you will want math.sqrt)

import torch  # noqa: F401
from torch import nn

from minilora.lora import LoraConfig, find_target_modules, mark_only_lora_trainable, replace_module  # noqa: F401


class LoRALinear(nn.Module):
    """h = base(x) + (lora_alpha / r) · B A dropout(x), with `base` frozen and only A, B trainable."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        raise NotImplementedError(
            "hint: reject r < 1 or r > min(base.in_features, base.out_features) with a ValueError (a rank "
            "above min(d, k) buys nothing). Keep `base` and freeze its parameters (requires_grad_(False)). "
            "Store r, lora_alpha, scaling = lora_alpha / r, in_features, out_features, merged = False, and "
            "self.lora_dropout = nn.Dropout(lora_dropout). Create nn.Parameters lora_A of shape "
            "(r, in_features) and lora_B of shape (out_features, r) in float32, then call "
            "self.reset_lora_parameters(init).")

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        raise NotImplementedError(
            "hint: 'kaiming' -> nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5)); 'gaussian' -> "
            "nn.init.normal_(self.lora_A, std=1 / self.r). In both cases B starts at zero, so B A = 0 and "
            "the model is unchanged. Do it under torch.no_grad(). Why must A NOT be zero as well?")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "hint: result = self.base(x); if merged, return it. Otherwise add the bypass "
            "(dropout(x) @ A.T) @ B.T * scaling, computed in lora_A's dtype (x.to(self.lora_A.dtype)), and "
            "cast the sum back to result.dtype. Dropout goes on the bypass input only, never on base(x).")

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("hint: ΔW = (B @ A) * scaling, shape (out_features, in_features)")

    def merge(self) -> None:
        raise NotImplementedError(
            "hint: add delta_weight() into self.base.weight in place (under torch.no_grad()) and set "
            "merged = True. Merging twice would add ΔW twice: raise RuntimeError if already merged.")

    def unmerge(self) -> None:
        raise NotImplementedError("hint: the inverse of merge(): subtract ΔW again and set merged = False")


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    raise NotImplementedError(
        "hint: names = find_target_modules(model, config.target_modules); for each name wrap "
        "model.get_submodule(name) in a LoRALinear built from config.r, lora_alpha, lora_dropout, init and "
        "put it back with replace_module(model, name, layer). Finally mark_only_lora_trainable(model) and "
        "return the model.")
