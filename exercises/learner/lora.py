"""Exercise 1: build LoRA yourself (Chapter 1, chapters/01-lora.md).

This is minilora/core/lora.py with the bodies taken out. Fill in every body that raises NotImplementedError,
then run

    .venv/bin/python -m pytest exercises/test_01_lora.py            # against this file

until everything passes. The book's solution is minilora/core/lora.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: LoRALinear (every method) and add_lora.
Given (imported from the core, not part of the exercise): LoraConfig and the module-finding helpers.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want math.sqrt)

import torch
from torch import nn

from minilora.core.lora import (  # noqa: F401  (given)
    LoraConfig,
    find_target_modules,
    is_target,
    mark_only_lora_trainable,
    replace_module,
)


class LoRALinear(nn.Module):
    """h = base(x) + (lora_alpha / r) · B A dropout(x), with `base` frozen and only A, B trainable."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        raise NotImplementedError(
            "hint: freeze base and keep it, store in_features, out_features and merged = False, then call "
            "create_adapter(...) and follow base.training. Longer hint: exercises/ANSWERS.md")

    def create_adapter(self, r: int, lora_alpha: float, lora_dropout: float, init: str = "kaiming") -> None:
        raise NotImplementedError(
            "hint: check r (an integer >= 1, else ValueError); store r, lora_alpha, scaling = lora_alpha / r and "
            "lora_dropout; create nn.Parameters lora_A (r, in) and lora_B (out, r), float32 on the base's "
            "device (adapter_placement() gives both), then call reset_lora_parameters(init).")

    def adapter_placement(self) -> dict:
        """Where new adapter tensors live: float32 (see create_adapter), on the base's device. (The package can
        also keep them in the base's 16-bit dtype, or build them on the meta device for a file to fill.)"""
        device = [*self.base.parameters(), *self.base.buffers()][0].device  # a 4-bit W0 is a buffer (ch. 6)
        return {"device": device, "dtype": torch.float32}

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        raise NotImplementedError(
            "hint: A random ('kaiming' like an nn.Linear, 'gaussian' with std 1/r), B zero. "
            "Why must A not be zero too?")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("hint: the frozen layer alone, one line.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "hint: base_forward(x) plus the bypass of the dropped-out input; dropout on the bypass input only; "
            "compute the bypass in the adapter's dtype and return the base output's dtype.")

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("hint: the scaled bypass through A then B, two thin matmuls (never form B A).")

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("hint: ΔW has shape (out_features, in_features)")

    def merge(self) -> None:
        raise NotImplementedError(
            "hint: fold ΔW into the base weight in place. What must happen if it is already merged?")

    def unmerge(self) -> None:
        raise NotImplementedError("hint: the inverse of merge()")


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    raise NotImplementedError(
        "hint: find the target names, wrap each in a LoRALinear built from the config, put it back, "
        "then freeze everything but the adapters (the helpers are imported above).")
