"""Chapter 1, LoRA: a frozen weight plus a trainable low-rank bypass (Hu et al., 2021).

A pretrained Linear layer computes h = W0 x with W0 of shape (d_out, d_in). Fine-tuning changes W0 by some ΔW;
LoRA bets that ΔW has low rank and writes it as a product of two thin matrices:

    h = W0 x + (α / r) · B A x,        A: (r, d_in),  B: (d_out, r),  r << min(d_in, d_out)      (LoRA eq. 3)

W0 stays frozen; only A and B train, r · (d_in + d_out) numbers per layer instead of d_in · d_out.

Read first: `LoRALinear` (one layer: forward, delta_weight, merge), then `add_lora` (a whole model). The real
package, minilora/lora.py, builds on this file (peft's options, several adapters, a faster base matmul), and
tests/test_core.py proves the two equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoraConfig:
    """What add_lora needs; the names and defaults of peft's LoraConfig (minilora.lora's adds peft's options)."""

    r: int = 8  # the rank of B A
    lora_alpha: float = 8  # the bypass is scaled by α / r
    lora_dropout: float = 0.0  # dropout on the bypass input only
    target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj")  # names, or endings of names
    init: str = "kaiming"  # how A starts: "kaiming" or "gaussian"


class LoRALinear(nn.Module):
    """h = base(x) + (α/r) · B A dropout(x), with `base` frozen and only A and B trained (LoRA eq. 3).

    `lora_A` is (r, in_features), `lora_B` is (out_features, r), `scaling` = α/r. The bypass runs in the
    adapter's dtype (float32) and the sum is cast back to the base output's dtype, so bf16 inputs work.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        self.base = base.requires_grad_(False)  # W0 and its bias never train
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False  # True while ΔW sits inside W0 (merge)
        self.create_adapter(r, lora_alpha, lora_dropout, init)
        self.train(base.training)  # a new module starts in training mode; follow the model it joins

    def create_adapter(self, r: int, lora_alpha: float, lora_dropout: float, init: str = "kaiming") -> None:
        """The trainable part (LoRA §4.1): A and B, the scale α/r, and the dropout on the bypass input.

        A and B are float32 whatever the base's dtype: the adapter is small, and an optimizer updating bf16
        numbers loses small steps to rounding.
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1 (the rank of the update), got r={r!r}")
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **self.adapter_placement()))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **self.adapter_placement()))
        self.reset_lora_parameters(init)

    def adapter_placement(self) -> dict:
        """Where new adapter tensors live: float32 (see create_adapter), on the base's device. (The package can
        also keep them in the base's 16-bit dtype, or build them on the meta device for a file to fill.)"""
        device = [*self.base.parameters(), *self.base.buffers()][0].device  # a 4-bit W0 is a buffer (ch. 6)
        return {"device": device, "dtype": torch.float32}

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A random, B = 0: then B A = 0 and the model starts exactly where the pretrained one was (LoRA §4.1).

        "kaiming": A ~ U(-1/√d_in, 1/√d_in), an nn.Linear's own init; "gaussian": A ~ N(0, σ²) with σ = 1/r.
        A must not be zero too: with A = B = 0 both gradients vanish and nothing ever trains.
        """
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / self.r)
            self.lora_B.zero_()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b, the frozen layer (minilora.lora gives it a faster backward with the same numbers)."""
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:  # ΔW already sits inside W0
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)  # dropout on the bypass input only
        return (result + self.bypass(x_lora)).to(result.dtype)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) · B A x, eq. 3's second term, as two thin matmuls (x Aᵀ) Bᵀ: B A (d_out, d_in) is never formed."""
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A (LoRA eq. 3), the (out_features, in_features) matrix the bypass adds to W0."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self) -> None:
        """W0 ← W0 + ΔW in place: forward is then one plain matmul, no extra latency (LoRA §4.1)."""
        if self.merged:
            raise RuntimeError("merge(): this layer is already merged; call unmerge() first")
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W0 ← W0 − ΔW: base and bypass apart again (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge(): this layer is not merged")
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


def is_target(name: str, target_modules) -> bool:
    """peft's rule for a list of names: the full name equals an entry or ends with "." + entry
    ("q_proj" picks "model.layers.0.self_attn.q_proj", and not "model.layers.0.self_attn.kq_proj")."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules) -> list[str]:
    """The full names of the nn.Linear layers that `is_target`, in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and is_target(name, target_modules)]


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put `new_module` where the submodule called `name` ("model.layers.0.self_attn.q_proj") was."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new_module)  # get_submodule("") is the model


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for the adapters' "lora_" parameters, False for every other one: W0 is frozen (§4.1)."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Give every target of `config` a LoRALinear (in place) and freeze everything else; returns `model`. (The
    paper adapts W_q and W_v, LoRA §4.2; peft's default targets do the same.)"""
    for name in find_target_modules(model, config.target_modules):
        layer = LoRALinear(model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout,
                           config.init)
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)
    return model
