"""LoRA for real: the layer and `add_lora` of minilora/core/lora.py, with every peft option (chapter 1).

The idea, h = W0 x + (α/r) · B A x, is minilora/core/lora.py: read that first. This file is what the package
uses, built on it:

    LoRALinear   core.LoRALinear, plus minilora.bypass.LowRankLinear (the frozen base's faster backward, an
                 off switch, checked merging), several adapters per layer (chapter 1 §12) and rsLoRA's scale
    add_lora     core's add_lora with peft's rules: which layers (minilora.targets), rank_pattern,
                 modules_to_save, bias, adapters beside adapters; everything checked before anything changes

Read first: `add_lora`. `count_parameters` and `trainable_summary` give peft's parameter-count line.
tests/test_core.py proves LoRALinear and add_lora equal to the core's; tests/test_lora.py checks them against
peft 0.21 number for number.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilora.bypass import (  # names callers import from here since chapter 1 (they live in minilora.bypass)
    ALL_LINEAR,
    LowRankLinear,
    ModulesToSave,
    check_base,
    check_target_modules,
    find_target_modules,
    is_linear_like,
    mark_biases_trainable,
    mark_only_lora_trainable,
    merge_lora,
    replace_module,
    selected_modules,
    warn_oversized_ranks,
    wrap_modules,
)
from minilora.checks import check_bypass_options
from minilora.core import lora as core
from minilora.lora_config import BIAS_OPTIONS, INITS, LoraConfig, check_hyperparameters
from minilora.peft_layer import check_placement_options
from minilora.targets import modules_to_save_names

__all__ = ["ALL_LINEAR", "BIAS_OPTIONS", "INITS", "LowRankLinear", "LoRALinear", "LoraConfig", "ModulesToSave",
           "adapter_names", "add_lora", "check_base", "rslora_scaling",
           "check_hyperparameters", "check_target_modules", "count_parameters", "find_target_modules",
           "is_linear_like", "lora_layers", "mark_only_lora_trainable", "merge_lora", "modules_to_save_names",
           "replace_module", "selected_modules", "trainable_summary", "wrap_modules"]


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


def rslora_scaling(lora_alpha: float, r: int) -> float:
    """γ_r = α / √r, the scale that keeps a LoRA layer's learning stable as r grows (rsLoRA, Theorem 3.2;
    peft's use_rslora=True).

    The paper shows that the adapter's outputs and their gradients keep the same order of magnitude as r grows
    only if γ_r ∝ 1/√r. With α / r they shrink as r grows ("gradient collapse"): at one learning rate a larger
    rank learns slower, and its extra capacity goes unused. With α / √r a larger rank can actually help.
    """
    check_bypass_options(r, lora_alpha, 0.0)
    return lora_alpha / math.sqrt(r)


class LoRALinear(LowRankLinear, core.LoRALinear):
    """minilora.core.lora.LoRALinear (h = base(x) + (α/r) · B A dropout(x)) with what the package needs besides.

    From minilora.bypass.LowRankLinear: the base's forward through `frozen_linear` (the same numbers, a faster
    backward on some CPUs), `disabled` (the bypass off), merge(safe_merge) refused for a 4-bit base. Here: the
    checks of the arguments (once: the core layer takes them as given), use_rslora (α/√r), and several adapters
    (chapter 1 §12): the *active* one is in lora_A, lora_B, scaling, r, lora_alpha and lora_dropout, named
    `adapter_name`; the others wait in `parked`, one small module each. Switching moves the tensors of two
    adapters (no copy), so forward reads exactly as it does with one adapter.

    The base may be an nn.Linear or anything that follows the base-layer protocol of minilora.bypass (the
    4-bit minilora.qlora.Linear4bit does).
    """

    ADAPTER_TENSORS = ("lora_A", "lora_B")   # one adapter's parameters (DoRA adds its magnitudes)
    ADAPTER_SETTINGS = ("r", "lora_alpha", "scaling", "lora_dropout")
    USES_DORA = False

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        self.take_placement_options(base, autocast_adapter_dtype, low_cpu_mem_usage)
        check_hyperparameters(r, lora_alpha, lora_dropout, init)
        super().__init__(base, r, lora_alpha, lora_dropout, init)
        self.parked = nn.ModuleDict().train(self.training)
        self.name_adapter(adapter_name, use_rslora)

    def new_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init: str,
                    use_rslora: bool, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """Fresh A and B (and settings) in the active slot; the caller has parked what was there."""
        self.autocast_adapter_dtype, self.low_cpu_mem_usage = autocast_adapter_dtype, low_cpu_mem_usage
        self.create_adapter(r, lora_alpha, lora_dropout, init)
        self.lora_dropout.train(self.training)   # a new module starts in training mode; follow the layer's
        self.name_adapter(adapter_name, use_rslora)

    def name_adapter(self, adapter_name: str, use_rslora: bool) -> None:
        """Name the active adapter; with use_rslora, scale it by rsLoRA's α/√r (`rslora_scaling`) instead of α/r."""
        self.adapter_name = adapter_name
        if use_rslora:
            self.scaling = rslora_scaling(self.lora_alpha, self.r)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """The core's (α/r) · B A x, with the scale applied where it costs least without changing a bit.

        Where α/r is a power of two (1 for peft's default α = r, 2 for α = 2r, 1/4 for QLoRA's α = 16 at r = 64)
        multiplying by it is exact, so it can scale the r numbers of x Aᵀ per token instead of the out_features
        numbers of the result (or, at 1, nothing): the same bits, forward and backward, and one elementwise pass
        over the layer's output fewer, each way. Exact unless a number is small enough to be subnormal: never
        in practice in float32 (below 1e-38), often in fp16 (below 6e-5), so 16-bit adapters (peft's
        autocast_adapter_dtype=False) keep the core's order, as does any other scale. tests/test_core.py proves
        the bits equal.
        """
        if self.lora_A.dtype not in (torch.float32, torch.float64):
            return super().bypass(x)
        if self.scaling == 1.0:
            return (x @ self.lora_A.T) @ self.lora_B.T
        if math.frexp(self.scaling)[0] == 0.5:  # a power of two: mantissa exactly 1/2
            return ((x @ self.lora_A.T) * self.scaling) @ self.lora_B.T
        return super().bypass(x)

    # -- several adapters: park the active one, bring another out ------------------------------------

    def adapter_names(self) -> list[str]:
        return [self.adapter_name, *self.parked]

    def adapter(self, adapter_name: str) -> nn.Module:
        """What holds adapter `adapter_name`'s tensors and settings: this layer if it is active, else its slot."""
        if adapter_name == self.adapter_name:
            return self
        if adapter_name not in self.parked:
            raise KeyError(f"this layer has no adapter {adapter_name!r} (it has {self.adapter_names()})")
        return self.parked[adapter_name]

    def park(self) -> None:
        """Move the active adapter's tensors and settings into `parked` (frozen: only the active one trains)."""
        slot = nn.Module()
        for key in self.ADAPTER_TENSORS:
            slot.register_parameter(key, getattr(self, key).requires_grad_(False))
            delattr(self, key)
        for key in self.ADAPTER_SETTINGS:
            setattr(slot, key, getattr(self, key))
        self.parked[self.adapter_name] = slot

    def switch_to(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter of this layer: park the active one, unpark this one."""
        if adapter_name == self.adapter_name:
            return
        if self.merged:
            raise RuntimeError(f"switch_to({adapter_name!r}): the layer is merged with {self.adapter_name!r}; "
                               f"unmerge() first")
        slot = self.parked.pop(adapter_name)
        self.park()
        for key in self.ADAPTER_TENSORS:
            setattr(self, key, getattr(slot, key))
        for key in self.ADAPTER_SETTINGS:
            setattr(self, key, getattr(slot, key))
        self.adapter_name = adapter_name

    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False, autocast_adapter_dtype: bool = True,
                    low_cpu_mem_usage: bool = False) -> None:
        """A second (third, ...) adapter beside the active one, parked; the active one stays active."""
        if adapter_name in self.adapter_names():
            raise ValueError(f"adapter_name={adapter_name!r} already exists on this layer "
                             f"(adapters: {self.adapter_names()})")
        check_hyperparameters(r, lora_alpha, lora_dropout, init)
        check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage)
        active = self.adapter_name
        self.park()
        self.new_adapter(adapter_name, r, lora_alpha, lora_dropout, init, use_rslora, autocast_adapter_dtype,
                         low_cpu_mem_usage)
        self.switch_to(active)

    def extra_repr(self) -> str:
        named = "" if self.adapter_names() == ["default"] else \
            f", adapter_name={self.adapter_name!r}, parked={list(self.parked)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}{named}")


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default", layer_class: type | None = None,
             autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> nn.Module:
    """Give every target of `config` a LoRA bypass (in place) and freeze everything else; returns `model`.

    The first adapter becomes active. On a model that has adapters already, the new one is added beside them
    under `adapter_name` and waits, inactive (peft's add_adapter); `minilora.switching.set_adapter` switches.
    Everything is checked before anything changes, so an error leaves the model as it was. A rank larger
    than a layer's weight allows gets one warning for the model (peft accepts it, and so do we).

    peft's two options of get_peft_model, under its names (`minilora.peft_layer.adapter_dtype`): with
    autocast_adapter_dtype=False the adapters keep a 16-bit base's dtype instead of float32; with
    low_cpu_mem_usage=True they are made on the meta device, allocating nothing, for
    minilora.adapters.load_adapter to fill from a file (the model cannot run before that).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.lora.LoraConfig, got {type(config).__name__}")
    check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage)
    layer_class = layer_class or LoRALinear
    if config.use_dora and not layer_class.USES_DORA:
        raise ValueError("use_dora=True: DoRA layers are added by minilora.family.add_dora(model, config)")
    check_adapter_name(adapter_name)
    existing = lora_layers(model)
    if existing:
        check_second_adapter(model, config, adapter_name, existing, layer_class)
    names = find_target_modules(model, config.target_modules, **config.rules())
    ranks = {name: config.rank_and_alpha(name) for name in names}
    to_save = modules_to_save_names(model, config.modules_to_save)
    check_modules_to_save(model, config.modules_to_save, to_save)
    warn_oversized_ranks(model, {name: r for name, (r, _) in ranks.items()})

    def make(name, base):
        r, alpha = ranks[name]
        return layer_class(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, init=config.init,
                           use_rslora=config.use_rslora, adapter_name=adapter_name,
                           autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)

    wrap_modules(model, [name for name in names if name not in existing], make)
    for name in names:
        layer = model.get_submodule(name)
        if name in existing:
            layer.add_adapter(adapter_name, *ranks[name], config.lora_dropout, config.init, config.use_rslora,
                              autocast_adapter_dtype, low_cpu_mem_usage)
        elif existing:   # a layer only the new adapter has: off until that adapter is made active
            layer.disabled = True
    for name in to_save:
        replace_module(model, name, ModulesToSave(model.get_submodule(name), adapter_name))
    mark_only_lora_trainable(model)
    mark_biases_trainable(model, config.bias)
    return model


def check_adapter_name(adapter_name) -> None:
    """A name can key `LoRALinear.parked` (an nn.ModuleDict): no ".", and not one of its own attributes."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name \
            or hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name must be a non-empty string without '.' that is not an attribute of "
                         f"nn.ModuleDict (such as 'keys' or 'training'), got adapter_name={adapter_name!r}")


def check_second_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, existing: dict, layer_class) -> None:
    """A second adapter can go beside the first unless it would be ambiguous what trains or what is saved:
    biases and modules trained in full belong to one adapter only (peft refuses several adapters with
    bias too), and one layer holds one kind of adapter (LoRA or DoRA)."""
    taken = adapter_names(model)
    if adapter_name in taken:
        raise ValueError(f"adapter_name={adapter_name!r} already exists on {type(model).__name__} "
                         f"(adapters: {taken}); choose another name, or delete_adapter it first")
    holds_extra = any(isinstance(m, ModulesToSave) for m in model.modules())
    if config.bias != "none" or config.modules_to_save or holds_extra:
        raise ValueError(f"adapter {adapter_name!r} cannot go beside {taken}: with several adapters, bias must "
                         f"be 'none' and modules_to_save empty for all (got bias={config.bias!r}, "
                         f"modules_to_save={config.modules_to_save!r}, model has modules_to_save: {holds_extra})")
    merged = [name for name, layer in existing.items() if layer.merged]
    if merged:
        raise ValueError(f"adapter {adapter_name!r}: layers {merged[:3]} are merged; unmerge them first")
    kinds = {type(layer) for layer in existing.values()}
    if kinds != {layer_class}:
        raise ValueError(f"adapter {adapter_name!r} would put {layer_class.__name__} adapters beside "
                         f"{sorted(k.__name__ for k in kinds)} ones; a model holds one kind of LoRA adapter")


def check_modules_to_save(model: nn.Module, modules_to_save, names: list[str]) -> None:
    """Entries matching nothing are allowed as long as one matches (peft's classification configs list both
    "classifier" and "score"). A module whose weights are tied to another one is refused: its trained copy
    would silently untie them."""
    if modules_to_save and not names:
        raise ValueError(f"modules_to_save={modules_to_save!r} matched no module of {type(model).__name__}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (LowRankLinear, ModulesToSave)):
            raise ValueError(f"modules_to_save: module {name!r} is already a {type(module).__name__}")
        own = {id(p) for p in module.parameters()}
        for other, param in model.named_parameters(remove_duplicate=False):
            if id(param) in own and not other.startswith(name + "."):
                raise ValueError(f"modules_to_save: {name!r} shares its weights with {other!r} (tied); training "
                                 f"a copy of it would untie them")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{full name: LoRALinear} for every LoRA bypass in the model (AdaLoRA's SVDLinear layers are not)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name the model's LoRA layers hold, sorted (chapter 1 §12)."""
    return sorted({name for layer in lora_layers(model).values() for name in layer.adapter_names()})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; named_parameters() yields a tied weight only once.

    A quantized base (the base-layer protocol of minilora.bypass) keeps its 4-bit codes in buffers, not
    parameters; it is counted as the in_features x out_features weight it stands for, which is also what peft
    reports for bitsandbytes' 4-bit layers (it doubles the numel of their packed uint8 storage).
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
