"""Several adapters on one model: switch between them, turn them off, delete one, combine some into a new one.

LoRA's promise for deployment is that one frozen base serves many tasks, and switching tasks swaps only the
small A and B matrices. peft keeps every adapter of a layer in dictionaries and loops over the active ones in
forward. minilora keeps forward as it is for one adapter:

    a LoRALinear holds the *active* adapter in lora_A, lora_B, scaling, r, lora_alpha, lora_dropout;
    the others wait in its `parked` ModuleDict, one small module each, frozen;
    set_adapter moves the tensors of two adapters (the same Parameter objects, no copy, so an optimizer's
    state for them survives a round trip); `disabled` turns a layer's bypass off.

That is the smallest design that reads well: the one-adapter path has no dictionary lookup, no loop and no
name in it, and everything about "which adapter" sits in the few functions of this file. What it gives up
against peft: one active adapter at a time (peft can sum several in one forward pass).

    add_lora(model, config, adapter_name)      a new adapter beside the others, inactive (minilora.lora)
    load_adapter(model, path, adapter_name)    the same from a file (minilora.adapters)
    set_adapter(model, name)                   make `name` active (and the only one that trains)
    with disable_adapter(model): ...           the base model alone, restored on exit
    delete_adapter(model, name)                drop one; a layer that held only it becomes its base again
    add_weighted_adapter(model, names, weights, new_name, combination_type)   combine, as peft does

Each is checked against peft 0.21's methods of the same names in tests/test_switching.py.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from minilora.lora import (
    LoraConfig,
    LowRankLinear,
    ModulesToSave,
    adapter_names,  # exported from here too: the names every function below checks against
    add_lora,
    lora_layers,
    mark_only_lora_trainable,
    replace_module,
)

COMBINATIONS = ("cat", "linear", "svd")


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model computes with, or None when adapters are disabled."""
    names = {layer.adapter_name for layer in lora_layers(model).values() if not layer.disabled}
    if len(names) > 1:   # cannot happen through this file's functions; say so if a layer was set by hand
        raise RuntimeError(f"layers of {type(model).__name__} are active with different adapters: {sorted(names)}")
    return names.pop() if names else None


def check_adapter(model: nn.Module, name: str, what: str) -> None:
    names = adapter_names(model)
    if name not in names:   # "does not exist": peft's words, where a user would search for them
        raise ValueError(f"{what}: adapter {name!r} does not exist: {type(model).__name__} has no adapter "
                         f"{name!r} (it has {names or 'none'}; add one with add_lora or load_adapter)")


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` the active one on every layer that has it; layers without it compute only their
    base. Only `name` trains afterwards (peft's set_adapter). Returns `model`.

    peft also takes a list and then sums several adapters in one forward pass; here one adapter is active at
    a time, so a list must name one (add_weighted_adapter(..., "cat") builds the sum as one adapter)."""
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"set_adapter({list(name)!r}): minilora keeps one adapter active at a time (peft can "
                             f"activate several and sums their bypasses); to compute that sum, combine them "
                             f"into one: add_weighted_adapter(model, {list(name)!r}, [1.0] * {len(name)}, "
                             f"'sum', 'cat'), then set_adapter(model, 'sum')")
        name = name[0]
    check_adapter(model, name, "set_adapter")
    merged = [path for path, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"set_adapter: layers {merged[:3]} are merged; unmerge them first")
    for layer in lora_layers(model).values():
        if name in layer.adapter_names():
            layer.switch_to(name)
        layer.disabled = name not in layer.adapter_names()
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.disabled = module.adapter_name != name
    mark_only_lora_trainable(model)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """`with disable_adapter(model):` the pretrained model: every bypass and trained module copy off, and a
    merged layer unmerged for the duration (its ΔW sits in W0; peft unmerges it too). On exit (also after
    an error) each layer is as it was: switched back, merged again. What peft's `disable_adapter()` context
    does, e.g. for the reference model of DPO without a second copy of the weights.

    Unmerging subtracts ΔW from W0 + ΔW, so the weights are W0 up to one rounding per entry, and merging
    again adds it back, up to one more (chapter 1 §6); an unmerged model gives W0 exactly."""
    switches = [m for m in model.modules() if isinstance(m, (LowRankLinear, ModulesToSave))]
    if not switches:
        raise ValueError(f"disable_adapter: {type(model).__name__} has no adapter layers")
    before = [m.disabled for m in switches]
    merged = [m for m in switches if getattr(m, "merged", False)]
    try:
        for layer in merged:
            layer.unmerge()
        for module in switches:
            module.disabled = True
        yield model
    finally:
        for module, flag in zip(switches, before):
            module.disabled = flag
        for layer in merged:
            if not layer.merged:   # an error in unmerge() itself leaves the later layers merged still
                layer.merge()


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` from every layer (peft's delete_adapter). A layer left without adapters is
    replaced by its base again (so deleting the only adapter gives the base model back). Refused, before any
    layer changes, when `name` is the active adapter while others exist (set another one first, so that what the
    model computes never changes silently) or merged into some layer (unmerge it first: its ΔW sits in W0).
    Returns `model`."""
    check_adapter(model, name, "delete_adapter")
    if active_adapter(model) == name and len(adapter_names(model)) > 1:
        raise ValueError(f"delete_adapter: {name!r} is the active adapter; set_adapter to one of "
                         f"{[n for n in adapter_names(model) if n != name]} first")
    layers = lora_layers(model)
    merged = [path for path, layer in layers.items() if layer.merged and layer.adapter_name == name]
    if merged:   # peft's words too: "Cannot delete adapter(s) [...] while they are merged"
        raise ValueError(f"delete_adapter: cannot delete adapter(s) [{name!r}] while they are merged: layers "
                         f"{merged[:3]}{' ...' if len(merged) > 3 else ''} hold its ΔW in their weight. Please "
                         f"unmerge them first; nothing was deleted")
    for path, layer in layers.items():
        if name not in layer.adapter_names():
            continue
        if layer.adapter_names() == [name]:
            replace_module(model, path, layer.base)
            continue
        if layer.adapter_name == name:   # active in this layer, not in the model: any other may take its place
            layer.switch_to(next(other for other in layer.parked if other != name))
        del layer.parked[name]
    return model


# ----------------------------------------------------------------------------------------------------
# Combining adapters: peft's add_weighted_adapter
# ----------------------------------------------------------------------------------------------------


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """A new adapter from a weighted combination of existing ones, added inactive, as peft computes it.

    With ΔW_i = s_i B_i A_i the update of adapter i, the aim is ΔW = Σ w_i ΔW_i. The three combinations:

      "cat"     exact: stack the factors, A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]; rank Σ r_i.
      "svd"     exact sum, then its best rank-k approximation (k = svd_rank, or the largest r_i):
                Σ w_i ΔW_i = U S Vᵀ,  B = U_k S_k,  A = V_kᵀ.
      "linear"  peft's: A = Σ ±√|w_i s_i| A_i and B = Σ √|w_i s_i| B_i (the sign on A), all r_i equal.
                Note: B A then also holds the cross terms √(w_i s_i w_j s_j) B_i A_j for i ≠ j, so it is
                Σ w_i ΔW_i only when the adapters' subspaces do not interact (chapter 1, §12;
                tests/test_switching.py measures the gap). Prefer "cat" or "svd" when you mean the sum.

    The new adapter's scale is 1 (lora_alpha = r), and it covers every layer any of `adapters` covers.
    Returns `model`.
    """
    layers = check_weighted(model, adapters, weights, adapter_name, combination_type)
    parts = {path: [(layer.adapter(a), w) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
             for path, layer in layers.items()}
    # One rank for the new adapter, as peft: Σ r_i for "cat", else svd_rank or the largest r_i; a layer that
    # reaches less (it misses some adapters) gets zero rows in A and zero columns in B, which add nothing.
    ranks = {a: max(layer.adapter(a).r for layer in layers.values() if a in layer.adapter_names()) for a in adapters}
    r = sum(ranks.values()) if combination_type == "cat" else svd_rank or max(ranks.values())
    factors = {path: combine(found, combination_type, r) for path, found in parts.items()}
    factors = {path: (pad(B, 1, r), pad(A, 0, r)) for path, (B, A) in factors.items()}
    dropout = getattr(next(iter(parts.values()))[0][0].lora_dropout, "p", 0.0)   # the first adapter's, as peft
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, target_modules=sorted(layers))
    add_lora(model, config, adapter_name)
    with torch.no_grad():
        for path, (B, A) in factors.items():
            slot = model.get_submodule(path).adapter(adapter_name)
            slot.lora_B.copy_(B)
            slot.lora_A.copy_(A)
    return model


def pad(factor: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """`factor` with zeros appended along `dim` up to size r (a rank-r adapter that uses fewer directions)."""
    if factor.shape[dim] > r:
        raise ValueError(f"add_weighted_adapter: a layer's combined rank {factor.shape[dim]} exceeds r={r}")
    shape = list(factor.shape)
    shape[dim] = r - factor.shape[dim]
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)


def combine(found: list, combination_type: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one layer's combined adapter from [(adapter slot, weight), ...], by `combination_type`
    (r: the rank an "svd" keeps)."""
    if combination_type == "cat":
        return (torch.cat([slot.lora_B for slot, _ in found], dim=1),
                torch.cat([w * slot.scaling * slot.lora_A for slot, w in found], dim=0))
    if combination_type == "linear":
        roots = [(math.copysign(math.sqrt(abs(w * slot.scaling)), w * slot.scaling),
                  math.sqrt(abs(w * slot.scaling))) for slot, w in found]
        return (sum(root_b * slot.lora_B for (slot, _), (_, root_b) in zip(found, roots)),
                sum(root_a * slot.lora_A for (slot, _), (root_a, _) in zip(found, roots)))
    delta = sum(w * slot.scaling * (slot.lora_B @ slot.lora_A) for slot, w in found)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def check_weighted(model, adapters, weights, adapter_name, combination_type) -> dict:
    """The layers holding any of `adapters`, after checking every argument of add_weighted_adapter."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got combination_type={combination_type!r}")
    if not isinstance(adapters, (list, tuple)) or not adapters or \
            not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"adapters and weights must be lists of the same, non-zero length, got "
                         f"adapters={adapters!r}, weights={weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got weights={weights!r}")
    for name in adapters:
        check_adapter(model, name, "add_weighted_adapter")
    layers = {path: layer for path, layer in lora_layers(model).items()
              if any(a in layer.adapter_names() for a in adapters)}
    if any(layer.USES_DORA for layer in layers.values()):
        raise ValueError("add_weighted_adapter: DoRA adapters are not combined here: their magnitudes rescale "
                         "whole rows, so a weighted sum of two DoRA updates is not a DoRA update")
    ranks = {layer.adapter(a).r for layer in layers.values() for a in adapters if a in layer.adapter_names()}
    if combination_type == "linear" and len(ranks) != 1:
        raise ValueError(f"add_weighted_adapter: combination_type='linear' needs all adapters at one rank, "
                         f"got ranks {sorted(ranks)}; use 'cat' or 'svd'")
    return layers
