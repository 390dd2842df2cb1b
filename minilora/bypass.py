"""What every production bypass layer adds to its core layer, and the whole-model operations they share.

The layers themselves are the core's (minilora/core/lora.py's LoRALinear, minilora/core/adalora.py's
SVDLinear). The package's LoRA (minilora.lora) and AdaLoRA (minilora.svd_adapter) layers mix `LowRankLinear` in
front of them: the frozen base's faster backward, an off switch, checked merging. Around the layers, for a
whole model: which modules get a bypass (`selected_modules`, `find_target_modules`: peft's rules of
minilora.targets applied to a model), putting them in all or nothing (`wrap_modules`), modules trained in full
beside them (`ModulesToSave`), and folding every bypass back into a plain nn.Linear (`merge_lora`).

Read first: `LowRankLinear`, then `find_target_modules`, `wrap_modules` and `merge_lora`.

The base-layer protocol
-----------------------
A bypass wraps an `nn.Linear`, or any module that behaves like one and offers:

    in_features, out_features: int       the weight it stands for has shape (out_features, in_features)
    bias: Tensor | None                  added by its own forward
    dequantized_weight(dtype) -> Tensor  that full (out_features, in_features) weight, decoded into `dtype`

That is how the 4-bit `minilora.qlora.Linear4bit` (QLoRA chapter) gets a LoRA bypass without this file
importing it (imports in minilora only go downward). Such a base stores no float weight we could add ΔW to, so
`merge()` refuses it; `merge_lora` instead builds a fresh `nn.Linear` from `dequantized_weight + ΔW` (in the
dtype of the model's embeddings unless told otherwise).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from minilora.core import lora as core_lora
from minilora.frozen_linear import frozen_linear
from minilora.peft_layer import PeftLayerAPI, check_enabled, check_placement_options
from minilora.targets import (  # peft's rules for which modules, by name
    ALL_LINEAR,
    check_target_modules,
    is_excluded,
    layer_index,
    matches,
    output_head_name,
)

# ----------------------------------------------------------------------------------------------------
# Checking inputs
# ----------------------------------------------------------------------------------------------------


def is_linear_like(module: nn.Module) -> bool:
    """True for an nn.Linear or a module that follows the base-layer protocol in this file's docstring."""
    if isinstance(module, nn.Linear):
        return True
    return (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and hasattr(module, "bias")
        and callable(getattr(module, "dequantized_weight", None))
    )


def check_base(base: nn.Module) -> None:
    """Raise TypeError unless `base` can carry a bypass (an nn.Linear with a float weight, or the protocol)."""
    if not is_linear_like(base):
        raise TypeError(f"base must be an nn.Linear (or follow the base-layer protocol of minilora.bypass: "
                        f"in_features, out_features, bias, dequantized_weight(dtype)), "
                        f"got {type(base).__name__}")
    if isinstance(base, nn.Linear) and not base.weight.is_floating_point():
        raise TypeError(f"base weight must be a float tensor to add a LoRA update to it, "
                        f"got dtype={base.weight.dtype}")


def check_rank_bound(base: nn.Module, r: int, what: str, name: str = "") -> None:
    """ValueError if rank r (read from a file or the command line: `what` says where) exceeds max(in_features,
    out_features) of `base` (the layer `name`): then each factor alone, A (r x in) or B (out x r), holds more
    numbers than the weight it adapts, so the rank is a typo (or a hostile file), and it is refused before
    anything of its size is built. Ranks between min(in, out) and max(in, out) are allowed, with
    `warn_oversized_ranks`' warning."""
    bound = max(base.in_features, base.out_features)
    if r > bound:
        layer = f" of {name}" if name else ""
        raise ValueError(f"{what}={r} is larger than max(in_features, out_features) = max({base.in_features}, "
                         f"{base.out_features}){layer}: each factor of the update would hold more numbers than "
                         f"the weight it adapts (ranks above min(in, out) = "
                         f"{min(base.in_features, base.out_features)} already add nothing)")


def warn_oversized_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """One warning per model for the layers whose rank r exceeds min(in_features, out_features).

    peft accepts such a rank for LoRA and AdaLoRA, so we do too (a config that works in peft must work here),
    but say what it costs: B A (or P Λ Q) can never have rank above min(in, out), so the extra r only adds
    parameters and compute.
    """
    oversized = {name: (r, model.get_submodule(name)) for name, r in ranks.items()
                 if r > min(model.get_submodule(name).in_features, model.get_submodule(name).out_features)}
    if oversized:
        some = [f"{name} (r={r} > min({m.in_features}, {m.out_features}))" for name, (r, m) in oversized.items()]
        warnings.warn(f"{len(oversized)} layer(s) get a rank larger than their weight allows: {', '.join(some[:4])}"
                      f"{' ...' if len(some) > 4 else ''}; B A can never have rank above min(in_features, "
                      f"out_features), so the extra rank only adds parameters that buy nothing",
                      UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


class LowRankLinear(PeftLayerAPI, nn.Module):
    """What a production bypass layer adds to its core layer, mixed in first: `class LoRALinear(LowRankLinear,
    core.LoRALinear)`. The core layer computes; this changes four things around it:

    * the base's forward goes through `frozen_linear`: base(x), the same numbers, with the input gradient in
      the layout that is fast on this CPU (minilora/frozen_linear.py);
    * `disabled` turns the bypass off (disable_adapter(), or another adapter is active on the model);
    * merging refuses a 4-bit base (merge_lora handles that), and safe_merge=True (peft's option) refuses a
      merge that would write NaN or inf into the pretrained weight;
    * new adapter tensors follow peft's two options, and the layer answers to peft's layer-level names
      (minilora.peft_layer.PeftLayerAPI: `adapter_placement`, `load_tensor`, `enable_adapters`, ...).
    """

    disabled = False

    def take_placement_options(self, base: nn.Module, autocast_adapter_dtype: bool, low_cpu_mem_usage: bool):
        """A subclass's first step: check the base and peft's two options, and keep the options as plain flags
        before the core's __init__ creates the first adapter (adapter_placement reads them)."""
        check_base(base)
        check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage)
        self.autocast_adapter_dtype, self.low_cpu_mem_usage = autocast_adapter_dtype, low_cpu_mem_usage

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(self.base, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_forward(x)
        return super().forward(x)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """The core's W0 ← W0 + ΔW. safe_merge=True forms W0 + ΔW in a copy first and refuses it if any entry
        is NaN or infinite, so a diverged adapter cannot destroy the pretrained weight (one weight-sized copy).
        adapter_names: peft's argument; None or [the active adapter] (`check_merge_names`).
        """
        self.check_merge_names(adapter_names)
        weight = self._float_base_weight("merge")
        if safe_merge and not self.merged:
            check_merged_finite(weight + self.delta_weight().to(weight.dtype), "merge(safe_merge=True)")
        super().merge()

    def unmerge(self) -> None:
        self._float_base_weight("unmerge")
        super().unmerge()

    def _float_base_weight(self, what: str) -> torch.Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TypeError(
                f"{what}() needs an nn.Linear base with a float weight, but the base is a "
                f"{type(self.base).__name__} (a quantized layer): W0 + ΔW cannot be written back into 4-bit "
                f"codes without re-quantizing. Use merge_lora(model), which builds a new nn.Linear from "
                f"dequantized_weight() + delta_weight().")
        return self.base.weight


def check_merged_finite(weight: torch.Tensor, what: str) -> None:
    """Raise ValueError if a merged weight holds NaN or ±inf (the adapter has diverged)."""
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(f"{what}: the merged weight would have {bad} non-finite value(s) (NaN or inf) of "
                         f"{weight.numel()}: the adapter has diverged. Nothing was merged; the base is unchanged.")


# ----------------------------------------------------------------------------------------------------
# Which layers: peft's target_modules rules
# ----------------------------------------------------------------------------------------------------


def selected_modules(model: nn.Module, target_modules, exclude_modules=None, layers_to_transform=None,
                     layers_pattern=None, modules_to_save=None) -> list[str]:
    """Full names of the modules a config selects, in model order, by peft's rules; a bypass layer counts as
    the Linear it wraps, and the modules inside it are never selected.

    target_modules picks (a list: names or name endings; a str: a regex on the whole name; "all-linear");
    exclude_modules and modules_to_save take away; layers_to_transform (an int or a list of block indices)
    keeps only the modules in those blocks (`layer_index`; LoraConfig allows it only with a list of names).
    """
    check_target_modules(target_modules)
    adapters = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    inside = tuple(f"{name}." for name in adapters)
    names = [name for name, _ in model.named_modules() if name and not name.startswith(inside)]
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        head = output_head_name(model)
        names = [name for name in names if name != head
                 and (name in adapters or is_linear_like(model.get_submodule(name)))]
    else:
        names = [name for name in names if matches(name, target_modules)]
    names = [name for name in names if not is_excluded(name, exclude_modules, modules_to_save)]
    if layers_to_transform not in (None, []):
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        names = [name for name in names if layer_index(name, layers_pattern) in wanted]
    return names


def find_target_modules(model: nn.Module, target_modules, **rules) -> list[str]:
    """The modules a bypass goes into: `selected_modules` (with the same `rules`), each checked.

    Raises ValueError when nothing is selected, or when an entry of a list matches no module at all (a typo
    such as "v_prj" must not silently train only q_proj), listing some names that do exist; TypeError when a
    selected module is not a Linear layer or already carries a bypass.
    """
    names = selected_modules(model, target_modules, **rules)
    matched = selected_modules(model, target_modules)
    unmatched = [] if isinstance(target_modules, str) else \
        [t for t in target_modules if not any(matches(name, [t]) for name in matched)]
    if not names or unmatched:
        short_names = {n.rsplit(".", 1)[-1]: is_linear_like(m) for n, m in model.named_modules() if n}
        some = sorted(n for n, linear in short_names.items() if linear) or sorted(short_names)
        what = f"entries {unmatched} of target_modules={target_modules!r}" if unmatched else \
            f"target_modules={target_modules!r}"
        rules_said = {key: value for key, value in rules.items() if value not in (None, [], {})}
        also = f" with {rules_said}" if rules_said and not unmatched else ""
        raise ValueError(f"{what}{also} matched no module of {type(model).__name__}; "
                         f"Linear layers it does have are named e.g. {some[:10]}")
    for name in names:
        module = model.get_submodule(name)
        if not is_linear_like(module) and not isinstance(module, LowRankLinear):
            raise TypeError(f"target_modules={target_modules!r} matched {name!r}, a {type(module).__name__}; "
                            f"LoRA here wraps only nn.Linear layers (or 4-bit Linear bases)")
    return names


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """The core's replace_module, once `name` is known to exist (setattr would silently add a new attribute)."""
    parent_name, _, child_name = name.rpartition(".")
    if not hasattr(model.get_submodule(parent_name), child_name):
        raise ValueError(f"replace_module: {type(model).__name__} has no submodule named {name!r}")
    core_lora.replace_module(model, name, new_module)


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapter (peft's modules_to_save, e.g. a classification head).

    `modules_to_save` is the trainable copy and `original_module` the frozen original (peft's names), so that
    `disable_adapter()`, or another adapter made active, gets the pretrained module back. That costs a second
    copy of the module, which is why peft does it too: a head is small.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)
        self.adapter_name = adapter_name
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.modules_to_save)(*args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's switch (its AuxiliaryTrainingWrapper's): the trained copy on and trainable, or the original."""
        check_enabled(enabled)
        self.disabled = not enabled
        self.modules_to_save.requires_grad_(enabled)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for the active adapter: the "lora_" parameters of every bypass that is on
    (not those of parked adapters, nor of a disabled layer) and the copies in ModulesToSave; the rest frozen."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LowRankLinear) and not module.disabled:
            for name, param in module.named_parameters(recurse=False):   # the layer's own: lora_A, lora_B, ...
                param.requires_grad_("lora_" in name)
        if isinstance(module, ModulesToSave) and not module.disabled:
            module.modules_to_save.requires_grad_(True)


def mark_biases_trainable(model: nn.Module, bias: str) -> None:
    """peft's bias option: "all" trains every bias of the model, "lora_only" the biases of the adapted layers."""
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)
    elif bias == "lora_only":
        for layer in model.modules():
            if isinstance(layer, LowRankLinear) and getattr(layer.base, "bias", None) is not None:
                layer.base.bias.requires_grad_(True)


def wrap_modules(model: nn.Module, names: list[str], make) -> None:
    """Put `make(name, module)` in place of every module in `names`, then train only the lora_ parameters.

    Every new layer is built (and so checked) before any goes in, and a layer that fails undoes the freezing
    its predecessors did, so an error leaves the model exactly as it was.
    """
    trainable = {p: p.requires_grad for p in model.parameters()}
    new_layers = {}
    for name in names:
        try:
            module = model.get_submodule(name)
            if isinstance(module, LowRankLinear):
                raise TypeError(f"it already has a bypass ({type(module).__name__}); a second LoRA adapter goes "
                                f"beside the first with add_lora(model, config, adapter_name=...)")
            new_layers[name] = make(name, module)
        except (ValueError, TypeError) as err:
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            raise type(err)(f"module {name!r}: {err}") from err
    for name, layer in new_layers.items():
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)


# ----------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None, safe_merge: bool = False) -> nn.Module:
    """Fold every bypass (LoRA or AdaLoRA) into its weight and put a plain nn.Linear back (peft's
    merge_and_unload). With several adapters, the active one is folded in and the parked ones are dropped;
    a module trained in full (ModulesToSave) leaves its trained copy in place.

    For an nn.Linear base: W0 += ΔW and the base itself goes back. For a quantized (protocol) base: a new
    nn.Linear in `dtype` holding dequantized_weight + ΔW. Its default is the dtype of the model's input
    embeddings, the dtype the hidden states arrive in, so the merged model takes the inputs it took before
    (a Linear4bit casts its input itself; a plain Linear does not). One warning says that the merged weights
    inherit the 4-bit rounding of W0 (and take 16 or 32 bits per weight again). safe_merge=True checks every
    merged weight for NaN and inf first, before any layer changes (see LowRankLinear.merge).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not layers:
        raise ValueError(f"merge_lora: {type(model).__name__} has no LoRA or AdaLoRA layers to merge")
    if safe_merge:
        for name, layer in layers.items():
            if not layer.disabled and not layer.merged:
                check_merged_finite(_float_weight(layer.base) + layer.delta_weight().float(),
                             f"merge_lora(safe_merge=True), layer {name!r}")
    dtype = dtype or _hidden_dtype(model)
    quantized = [name for name, layer in layers.items() if not isinstance(layer.base, nn.Linear)]
    if quantized:
        warnings.warn(f"merge_lora: {len(quantized)} layer(s) have a quantized base "
                      f"({type(layers[quantized[0]].base).__name__}); their merged {dtype} weights are "
                      f"dequantize(W0) + ΔW and keep W0's 4-bit rounding error", UserWarning, stacklevel=2)
    for name, layer in layers.items():
        if layer.disabled:   # the active adapter is not on this layer (or adapters are off): nothing to fold
            replace_module(model, name, layer.base)
        elif isinstance(layer.base, nn.Linear):
            if not layer.merged:
                layer.merge()
            replace_module(model, name, layer.base)
        else:
            replace_module(model, name, _merged_linear_from_quantized(layer, dtype))
    for name, module in list(model.named_modules()):   # a module trained in full: keep the trained copy
        if isinstance(module, ModulesToSave):
            replace_module(model, name, module.original_module if module.disabled else module.modules_to_save)
    return model


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def _float_weight(base: nn.Module) -> torch.Tensor:
    return base.weight.float() if isinstance(base, nn.Linear) else base.dequantized_weight(torch.float32)


def _merged_linear_from_quantized(layer: LowRankLinear, dtype: torch.dtype) -> nn.Linear:
    base = layer.base
    with torch.no_grad():
        weight = base.dequantized_weight(torch.float32) + layer.delta_weight().float()
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=dtype)
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged
