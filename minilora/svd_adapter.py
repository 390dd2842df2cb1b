"""AdaLoRA's adapter for real: the layer P Λ Q of minilora/core/adalora.py (`SVDLinear`), its config with every
check (`AdaLoraConfig`), putting it into a model (`add_adalora`) and the orthogonality penalty.

The idea is minilora/core/adalora.py: read that first. How the rank then moves (importance scores, the
budget schedule, `RankAllocator`) is minilora.adalora, chapter 2's module, which also exports every name of
this one. The two are apart so that the adapter files (minilora.adapters) can build AdaLoRA layers without
the allocator. Read first: `add_adalora`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minilora.bypass import (
    LowRankLinear,
    check_target_modules,
    find_target_modules,
    warn_oversized_ranks,
    wrap_modules,
)
from minilora.checks import check_bypass_options, check_int, check_number
from minilora.core import adalora as core
from minilora.peft_layer import check_placement_options

# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


class SVDLinear(LowRankLinear, core.SVDLinear):
    """minilora.core.adalora.SVDLinear (h = base(x) + α/(ranknum + 1e-5) · P Λ Q dropout(x)), with the checks
    of its arguments, minilora.bypass.LowRankLinear's fast base, off switch, checked merging and peft's two
    options (minilora.peft_layer), `keep_triplets` (prune for good) and `load_triplets` (a pruned adapter from
    a file).

    `lora_A` = Q (r, in_features), `lora_E` = Λ (r, 1), `lora_B` = P (out_features, r). It is not a LoRALinear
    of minilora.lora: a LoRA adapter file or `lora_layers()` never mistakes it for one.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        self.take_placement_options(base, autocast_adapter_dtype, low_cpu_mem_usage)
        check_bypass_options(r, lora_alpha, lora_dropout)
        super().__init__(base, r, lora_alpha, lora_dropout)
        if self.lora_A.is_meta:   # the buffers are no file's: make them for real
            device = self.base_device()
            self.ranknum = torch.tensor(float(r), dtype=self.lora_A.dtype, device=device)
            self.rank_mask = torch.ones(r, dtype=torch.bool, device=device)

    def keep_triplets(self, keep: torch.Tensor) -> None:
        """Drop the triplets where `keep` is False for good: slice P, Λ, Q to the survivors.

        `ranknum` stays at the initial r, so the output is unchanged when the dropped Λ_i were already zero
        (which the allocator ensures in its final phase). A module may end with r = 0 (its bypass then adds
        zeros). Build the optimizer afterwards: the parameters are new.
        """
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_E.device).view(-1)
        if keep.numel() != self.r:
            raise ValueError(f"keep must have one entry per triplet (r={self.r}), got {keep.numel()} entries")
        # boolean indexing copies: the survivors become new parameters, the old ones are freed
        self.load_triplets({"lora_A": self.lora_A.detach()[keep], "lora_E": self.lora_E.detach()[keep],
                            "lora_B": self.lora_B.detach()[:, keep]})

    def load_triplets(self, tensors: dict[str, torch.Tensor]) -> None:
        """P, Λ, Q of a pruned adapter from a file ({"lora_A": Q (r', in), "lora_E": Λ (r', 1), "lora_B": P
        (out, r')}, the survivors only): they become the parameters, in the adapter's dtype on the base's
        device (no copy where the file's already are), r = r'. `ranknum` stays at the initial r. Works on a
        layer built on the meta device (low_cpu_mem_usage), whose tensors are never allocated at full rank."""
        trainable = self.lora_A.requires_grad
        placement = {"dtype": self.lora_E.dtype, "device": self.ranknum.device}   # ranknum is never meta
        for kind, tensor in tensors.items():
            setattr(self, kind, nn.Parameter(tensor.to(**placement), requires_grad=trainable))
        self.r = self.lora_E.shape[0]
        self.rank_mask = torch.ones(self.r, dtype=torch.bool, device=self.ranknum.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"ranknum={self.ranknum.item():g}, lora_alpha={self.lora_alpha}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class AdaLoraConfig(core.AdaLoraConfig):
    """AdaLoRA's hyper-parameters (minilora.core.adalora.AdaLoraConfig: names and defaults as peft's), each
    checked once, here.

    The schedule has three phases over `total_step` steps (see `budget_schedule`):
      warm-up   steps 0..tinit:                 every matrix keeps init_r triplets, scores accumulate;
      decay     tinit < step < total_step-tfinal: the budget falls (cubic) from init_r·n to target_r·n,
                                                 masking every `deltaT` steps;
      final     the last `tfinal` steps:        the pattern is fixed, the kept triplets fine-tune.
    `beta1`, `beta2`: EMA factors of sensitivity and uncertainty. `orth_reg_weight`: weight of the
    orthogonality penalty in the loss. `lora_alpha`, `lora_dropout`, `target_modules`: as in LoRA.
    """

    def __post_init__(self):
        # Each message also carries the words of peft's (where a user would search for them).
        check_int("total_step", self.total_step, 1, why=" (the budget schedule is laid out over the whole run; "
                  "AdaLoRA does not work when total_step is None, supply a value > 0)")
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"tinit + tfinal must be < total_step to leave steps for the budget to decay, got "
                f"tinit={self.tinit} + tfinal={self.tfinal} >= total_step={self.total_step}: the supplied "
                f"schedule values don't allow for a budgeting phase; decrease tfinal/tinit or increase "
                f"total_step")
        check_int("init_r", self.init_r, 1)
        check_int("target_r", self.target_r, 1)
        check_int("deltaT", self.deltaT, 1)
        # lora_alpha and lora_dropout follow LoRA's rules.
        check_bypass_options(self.init_r, self.lora_alpha, self.lora_dropout)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r must be <= init_r (the budget only shrinks), got "
                             f"target_r={self.target_r} > init_r={self.init_r}")
        check_number("beta1", self.beta1, 0, 1, high_open=True, why=" (an EMA factor)")
        check_number("beta2", self.beta2, 0, 1, high_open=True, why=" (an EMA factor)")
        check_number("orth_reg_weight", self.orth_reg_weight, 0,
                     why=" (it should be greater than or equal to 0: it weighs a penalty in the loss)")
        check_target_modules(self.target_modules)


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """{full name: SVDLinear} for every AdaLoRA layer in the model, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def add_adalora(model: nn.Module, config: AdaLoraConfig, autocast_adapter_dtype: bool = True,
                low_cpu_mem_usage: bool = False) -> nn.Module:
    """Wrap every target of `config` in an SVDLinear of rank init_r (in place), freeze everything else;
    returns `model`, as `add_lora` does, with the same two options of peft's get_peft_model.

    All new layers are built before any is put in, so a bad layer leaves the model untouched. An init_r
    above a layer's min(in_features, out_features) is accepted with one warning, as LoRA's r is (peft accepts
    both); chapter 2 says what it costs AdaLoRA. Training also needs the allocator:
    `RankAllocator(model, config)`, called once per optimizer step.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config must be a minilora.adalora.AdaLoraConfig, got {type(config).__name__}")
    check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage)
    names = find_target_modules(model, config.target_modules)
    warn_oversized_ranks(model, {name: config.init_r for name in names})
    wrap_modules(model, names, lambda name, base: SVDLinear(
        base, r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage))
    return model


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """minilora.core.adalora.orthogonal_penalty (the mean of ||Q Qᵀ − I||_F and ||Pᵀ P − I||_F over all
    layers), for a model that has SVDLinear layers."""
    if not svd_layers(model):
        raise ValueError(f"orthogonal_penalty: {type(model).__name__} has no SVDLinear layers "
                         f"(did you call add_adalora?)")
    return core.orthogonal_penalty(model)
