"""LoRA: a frozen weight plus a trainable low-rank bypass (Hu et al., 2021).

A pretrained Linear layer computes h = W0 x with W0 of shape (d_out, d_in). Fine-tuning changes W0 by some ΔW;
LoRA bets that ΔW has low rank and writes it as a product of two thin matrices:

    h = W0 x + (α / r) · B A x,        A: (r, d_in),  B: (d_out, r),  r << min(d_in, d_out)      (LoRA eq. 3)

W0 stays frozen; only A and B train, r · (d_in + d_out) numbers per layer instead of d_in · d_out. B starts at
zero, so the wrapped model computes exactly what the pretrained one did until the first optimizer step.

Reading order: `LoRALinear` (one layer; what every bypass shares, the frozen base, the dropout and merging, is
minilora.bypass.LowRankLinear; a layer can hold several adapters, chapter 1 §12), then `add_lora` and
`trainable_summary` for a whole model. What a config may ask for (which layers, which rank, what else
trains: peft's options, §13) is `LoraConfig` in minilora.lora_config, exported here under the same name.
The target-matching helpers (`find_target_modules`, `replace_module`, `mark_only_lora_trainable`) and
`merge_lora` live in minilora.bypass, shared with AdaLoRA, and are exported here under the same names;
peft's name rules themselves are minilora.targets.

A base layer may be an `nn.Linear` or anything that follows the base-layer protocol of minilora.bypass (the
4-bit `minilora.qlora.Linear4bit` does).

Everything here mirrors peft 0.21 (initialisation, scaling, which modules a target pattern picks, the
parameter-count line), and tests/test_lora.py checks it against peft number for number.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilora.bypass import (  # shared with AdaLoRA; exported from here too, as chapter 1 teaches them
    ALL_LINEAR,
    LowRankLinear,
    ModulesToSave,
    check_base,
    check_bypass_options,
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
from minilora.checks import check_choice
from minilora.frozen_linear import frozen_linear
from minilora.lora_config import BIAS_OPTIONS, INITS, LoraConfig, check_hyperparameters  # exported from here too
from minilora.targets import modules_to_save_names

__all__ = ["ALL_LINEAR", "BIAS_OPTIONS", "INITS", "LowRankLinear", "LoRALinear", "LoraConfig", "ModulesToSave",
           "adapter_names", "add_lora", "check_base", "rslora_scaling",
           "check_hyperparameters", "check_target_modules", "count_parameters", "find_target_modules",
           "is_linear_like", "lora_layers", "mark_only_lora_trainable", "merge_lora", "replace_module",
           "selected_modules", "trainable_summary", "wrap_modules"]



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


class LoRALinear(LowRankLinear):
    """h = base(x) + (α/r) · B A dropout(x), with `base` frozen and only A, B trainable (LoRA eq. 3).

    `lora_A` is (r, in_features), `lora_B` is (out_features, r), `scaling` = lora_alpha / r (α/√r with
    use_rslora). The adapter matrices live in float32 on the base layer's device, whatever the base's dtype.
    The bypass runs in lora_A's dtype and the sum is cast back to the base output's dtype, so bf16 inputs work.

    Several adapters (chapter 1, "Several adapters on one model"): the *active* adapter is the one in
    lora_A, lora_B, scaling, r, lora_alpha and lora_dropout, named `adapter_name`; the others wait in
    `parked`, one small module each. Switching moves the tensors of two adapters (no copy), so forward
    reads exactly as it does with one adapter. `disabled` turns the bypass off.
    """

    ADAPTER_TENSORS = ("lora_A", "lora_B")   # one adapter's parameters (DoRA adds its magnitudes)
    ADAPTER_SETTINGS = ("r", "lora_alpha", "scaling", "lora_dropout")
    USES_DORA = False

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, adapter_name: str = "default"):
        check_hyperparameters(r, lora_alpha, lora_dropout, init)
        super().__init__(base, r, lora_alpha, lora_dropout)   # checks the base, freezes it
        self.parked = nn.ModuleDict()
        self.new_adapter(adapter_name, r, lora_alpha, lora_dropout, init, use_rslora)
        self.train(base.training)   # a new module starts in training mode; follow the model it joins instead

    def new_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init: str,
                    use_rslora: bool) -> None:
        """Fresh A and B (and settings) in the active slot; the caller has parked what was there."""
        check_hyperparameters(r, lora_alpha, lora_dropout, init)
        self.adapter_name, self.r, self.lora_alpha = adapter_name, r, lora_alpha
        self.scaling = rslora_scaling(lora_alpha, r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout.train(self.training)   # a new module starts in training mode; follow the layer's
        self.lora_A = self.new_matrix(r, self.in_features)
        self.lora_B = self.new_matrix(self.out_features, r)
        self.reset_lora_parameters(init)

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
        result = frozen_linear(self.base, x)  # = self.base(x); see minilora/frozen_linear.py
        if self.merged or self.disabled:  # ΔW already sits inside the base weight, or the bypass is off
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        # Two thin matmuls, (x A^T) B^T: the (out, in) matrix B A is never formed.
        update = (x_lora @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A, shape (out_features, in_features), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

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
                    init: str = "kaiming", use_rslora: bool = False) -> None:
        """A second (third, ...) adapter beside the active one, parked; the active one stays active."""
        if adapter_name in self.adapter_names():
            raise ValueError(f"adapter_name={adapter_name!r} already exists on this layer "
                             f"(adapters: {self.adapter_names()})")
        active = self.adapter_name
        self.park()
        self.new_adapter(adapter_name, r, lora_alpha, lora_dropout, init, use_rslora)
        self.switch_to(active)

    def extra_repr(self) -> str:
        named = "" if self.adapter_names() == ["default"] else \
            f", adapter_name={self.adapter_name!r}, parked={list(self.parked)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}{named}")


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
             layer_class: type | None = None) -> nn.Module:
    """Give every target of `config` a LoRA bypass (in place) and freeze everything else; returns `model`.

    The first adapter becomes active. On a model that has adapters already, the new one is added beside them
    under `adapter_name` and waits, inactive (peft's add_adapter); `minilora.switching.set_adapter` switches.
    Everything is checked before anything changes, so an error leaves the model as it was. A rank larger
    than a layer's weight allows gets one warning for the model (peft accepts it, and so do we).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.lora.LoraConfig, got {type(config).__name__}")
    layer_class = layer_class or LoRALinear
    if config.use_dora and not layer_class.USES_DORA:
        raise ValueError("use_dora=True: DoRA layers are added by minilora.family.add_dora(model, config)")
    check_adapter_name(adapter_name)
    existing = lora_layers(model)
    if existing:
        check_beside(model, config, adapter_name, existing, layer_class)
    names = find_target_modules(model, config.target_modules, **config.rules())
    ranks = {name: config.rank_and_alpha(name) for name in names}
    to_save = modules_to_save_names(model, config.modules_to_save)
    check_modules_to_save(model, config.modules_to_save, to_save)
    warn_oversized_ranks(model, {name: r for name, (r, _) in ranks.items()})

    def make(name, base):
        r, alpha = ranks[name]
        return layer_class(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, init=config.init,
                           use_rslora=config.use_rslora, adapter_name=adapter_name)

    wrap_modules(model, [name for name in names if name not in existing], make)
    for name in names:
        layer = model.get_submodule(name)
        if name in existing:
            layer.add_adapter(adapter_name, *ranks[name], config.lora_dropout, config.init, config.use_rslora)
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


def check_beside(model: nn.Module, config: LoraConfig, adapter_name: str, existing: dict, layer_class) -> None:
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
