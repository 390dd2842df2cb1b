"""What every low-rank bypass shares — LoRA's (α/r) B A (minilora.lora) and AdaLoRA's P Λ Q
(minilora.svd_adapter) — and which layers get one.

    h = base(x) + ΔW · dropout(x),      base frozen, ΔW low-rank and trainable

`LowRankLinear` holds the frozen base, the dropout and merging (W0 ← W0 + ΔW); a subclass says what ΔW is.
`find_target_modules` applies peft's target_modules rules, `wrap_modules` puts the new layers in (all or
none), `merge_lora` folds every bypass back into a plain nn.Linear. minilora.lora exports all of these under
the names chapter 1 teaches.

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

import re
import warnings

import torch
from torch import nn

from minilora.checks import check_int, check_number

ALL_LINEAR = "all-linear"

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


def check_bypass_options(r, lora_alpha, lora_dropout) -> None:
    """Raise ValueError naming the argument and value for a rank, α or dropout no bypass can use."""
    check_int("r", r, 1, why=" (the rank of the update)")
    check_number("lora_alpha", lora_alpha, 0, low_open=True, why=" (it scales the bypass)")
    check_number("lora_dropout", lora_dropout, 0, 1, high_open=True, why=" (a probability)")


def check_base(base: nn.Module, r: int) -> None:
    """Raise TypeError unless `base` can carry a bypass, ValueError if rank r cannot fit its weight."""
    if not is_linear_like(base):
        raise TypeError(f"base must be an nn.Linear (or follow the base-layer protocol of minilora.lora: "
                        f"in_features, out_features, bias, dequantized_weight(dtype)), "
                        f"got {type(base).__name__}")
    if isinstance(base, nn.Linear) and not base.weight.is_floating_point():
        raise TypeError(f"base weight must be a float tensor to add a LoRA update to it, "
                        f"got dtype={base.weight.dtype}")
    in_features, out_features = base.in_features, base.out_features
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} is larger than min(in_features, out_features) = min({in_features}, {out_features}); "
            f"B A can never have rank above {min(in_features, out_features)}, so a larger r only adds "
            f"parameters that buy nothing. Choose 1 <= r <= {min(in_features, out_features)}.")


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """What every bypass layer shares: a frozen `base`, dropout on the bypass input, and merging.

    A subclass creates its trainable matrices (`new_matrix`) and says what they add to the weight
    (`delta_weight`): LoRA's (α/r) B A below, AdaLoRA's P Λ Q in minilora.adalora. Merging then works the
    same for both: W0 ← W0 + ΔW.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        check_base(base, r)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    def new_matrix(self, *shape: int) -> nn.Parameter:
        """A trainable fp32 matrix on the base layer's device, whatever the base's dtype: the adapter is
        small, and an optimizer updating bf16 numbers loses small steps to rounding (peft does the same)."""
        return nn.Parameter(torch.zeros(*shape, device=_device_of(self.base), dtype=torch.float32))

    def delta_weight(self) -> torch.Tensor:
        """ΔW, the (out, in) matrix the bypass adds to W0; each layer defines its own (LoRA: s·B A)."""
        raise TypeError(f"{type(self).__name__} has no delta_weight(): LowRankLinear is the part LoRALinear and "
                        f"SVDLinear share, not a layer of its own")

    def merge(self) -> None:
        """W0 ← W0 + ΔW in place: afterwards forward is one plain matmul (zero extra latency)."""
        if self.merged:
            raise RuntimeError("merge(): this layer is already merged; call unmerge() first")
        weight = self._float_base_weight("merge")
        with torch.no_grad():
            weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W0 ← W0 − ΔW: back to separate base and bypass (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge(): this layer is not merged")
        weight = self._float_base_weight("unmerge")
        with torch.no_grad():
            weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def _float_base_weight(self, what: str) -> torch.Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TypeError(
                f"{what}() needs an nn.Linear base with a float weight, but the base is a "
                f"{type(self.base).__name__} (a quantized layer): W0 + ΔW cannot be written back into 4-bit "
                f"codes without re-quantizing. Use merge_lora(model), which builds a new nn.Linear from "
                f"dequantized_weight() + delta_weight().")
        return self.base.weight


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# Which layers: peft's target_modules rules
# ----------------------------------------------------------------------------------------------------


def check_target_modules(target_modules) -> None:
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: "
                             f"{err}") from err
        return
    if (not isinstance(target_modules, (list, tuple, set, frozenset)) or len(target_modules) == 0
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise ValueError(f"target_modules must be a non-empty list/tuple of module names, a regex string or "
                         f"'all-linear', got target_modules={target_modules!r}")


def output_head_name(model: nn.Module) -> str | None:
    """The name of the output head ("lm_head" in causal LMs), which "all-linear" leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
        if head is None and (name == "lm_head" or name.endswith(".lm_head")):
            return name
    return None


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def selected_modules(model: nn.Module, target_modules) -> list[str]:
    """Full names of the modules `target_modules` selects, in model order (peft's matching rules); a bypass
    layer counts as the Linear it wraps, and the modules inside it are never selected."""
    check_target_modules(target_modules)
    adapters = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    inside = tuple(f"{name}." for name in adapters)
    names = [name for name, _ in model.named_modules() if name and not name.startswith(inside)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        return [name for name in names if name != head
                and (name in adapters or is_linear_like(model.get_submodule(name)))]
    return [name for name in names if _matches(name, target_modules)]


def find_target_modules(model: nn.Module, target_modules) -> list[str]:
    """The modules a bypass goes into: `selected_modules`, each checked.

    Raises ValueError when nothing matches, or when an entry of a list matches nothing (a typo such as
    "v_prj" must not silently train only q_proj), listing some names that do exist; TypeError when a
    matched module is not a Linear layer or already carries a bypass.
    """
    names = selected_modules(model, target_modules)
    unmatched = [] if isinstance(target_modules, str) else \
        [t for t in target_modules if not any(_matches(name, [t]) for name in names)]
    if not names or unmatched:
        short_names = {n.rsplit(".", 1)[-1]: is_linear_like(m) for n, m in model.named_modules() if n}
        some = sorted(n for n, linear in short_names.items() if linear) or sorted(short_names)
        what = f"entries {unmatched} of target_modules={target_modules!r}" if names and unmatched else \
            f"target_modules={target_modules!r}"
        raise ValueError(f"{what} matched no module of {type(model).__name__}; "
                         f"Linear layers it does have are named e.g. {some[:10]}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            raise TypeError(f"module {name!r} already has a LoRA bypass ({type(module).__name__}); "
                            f"was add_lora called twice?")
        if not is_linear_like(module):
            raise TypeError(f"target_modules={target_modules!r} matched {name!r}, a {type(module).__name__}; "
                            f"LoRA here wraps only nn.Linear layers (or 4-bit Linear bases)")
    return names


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put `new_module` where the submodule called `name` ("model.layers.0.self_attn.q_proj") was."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child_name):
        raise ValueError(f"replace_module: {type(model).__name__} has no submodule named {name!r}")
    setattr(parent, child_name, new_module)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for parameters whose name contains "lora_"; everything else frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def wrap_modules(model: nn.Module, names: list[str], make) -> None:
    """Put `make(module)` in place of every module in `names`, then train only the lora_ parameters.

    Every new layer is built (and so checked) before any goes in, and a layer that fails undoes the freezing
    its predecessors did, so an error leaves the model exactly as it was.
    """
    trainable = {p: p.requires_grad for p in model.parameters()}
    new_layers = {}
    for name in names:
        try:
            new_layers[name] = make(model.get_submodule(name))
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


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every bypass (LoRA or AdaLoRA) into its weight and put a plain nn.Linear back (peft's
    merge_and_unload).

    For an nn.Linear base: W0 += ΔW and the base itself goes back. For a quantized (protocol) base: a new
    nn.Linear in `dtype` holding dequantized_weight + ΔW. Its default is the dtype of the model's input
    embeddings, the dtype the hidden states arrive in, so the merged model takes the inputs it took before
    (a Linear4bit casts its input itself; a plain Linear does not). One warning says that the merged weights
    inherit the 4-bit rounding of W0 (and take 16 or 32 bits per weight again).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not layers:
        raise ValueError(f"merge_lora: {type(model).__name__} has no LoRA or AdaLoRA layers to merge")
    dtype = dtype or _hidden_dtype(model)
    quantized = [name for name, layer in layers.items() if not isinstance(layer.base, nn.Linear)]
    if quantized:
        warnings.warn(f"merge_lora: {len(quantized)} layer(s) have a quantized base "
                      f"({type(layers[quantized[0]].base).__name__}); their merged {dtype} weights are "
                      f"dequantize(W0) + ΔW and keep W0's 4-bit rounding error", UserWarning, stacklevel=2)
    for name, layer in layers.items():
        if isinstance(layer.base, nn.Linear):
            if not layer.merged:
                layer.merge()
            replace_module(model, name, layer.base)
        else:
            replace_module(model, name, _merged_linear_from_quantized(layer, dtype))
    return model


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


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
