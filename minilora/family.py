"""LoRA's family: four small changes to the bypass of minilora.lora, each from its paper.

LoRA (chapter 1) writes the fine-tuned weight as W = W0 + s · B A with s = α / r, B = 0 and A random at the
start, and one learning rate for both. Each member of the family changes one of those choices:

    rsLoRA   the scale:   s = α / √r instead of α / r                      (Kalajdzievski 2023, arXiv 2312.03732)
    DoRA     the shape:   W = m · (W0 + s B A) / ‖W0 + s B A‖, per output row (Liu et al. 2024, arXiv 2402.09353)
    PiSSA    the start:   B A = the top-r singular part of W0, the rest stays frozen  (Meng et al. 2024, 2404.02948)
    LoRA+    the step:    B learns λ times faster than A                  (Hayou et al. 2024, arXiv 2402.12354)

Reading order: `rslora_scaling` and `apply_rslora`; `DoRALinear` (one layer), `add_dora`, and DoRA adapter files
(`save_dora`, `load_dora`) in peft's layout; `pissa_init_`; `loraplus_param_groups`. Each is checked against
peft 0.21 (`use_rslora`, `use_dora`, `init_lora_weights="pissa"`, `create_loraplus_optimizer`) in
tests/test_family.py, and scripts/family_demo.py shows what each does to the running example.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.files import write_atomically
from minilora.lora import (
    LoraConfig,
    LoRALinear,
    check_base,
    check_hyperparameters,
    find_target_modules,
    lora_layers,
    mark_only_lora_trainable,
    replace_module,
)

# ----------------------------------------------------------------------------------------------------
# rsLoRA: the rank-stabilised scale
# ----------------------------------------------------------------------------------------------------


def rslora_scaling(lora_alpha: float, r: int) -> float:
    """γ_r = α / √r, the scale that keeps a LoRA layer's learning stable as r grows (rsLoRA, Theorem 3.2).

    The paper shows that the adapter's outputs and their gradients keep the same order of magnitude as r grows
    only if γ_r ∝ 1/√r. With α / r they shrink as r grows ("gradient collapse"): at one learning rate a larger
    rank learns slower, and its extra capacity goes unused. With α / √r a larger rank can actually help.
    """
    check_hyperparameters(r, lora_alpha, 0.0, "kaiming")
    return lora_alpha / math.sqrt(r)


def apply_rslora(model: nn.Module) -> nn.Module:
    """Set `scaling` = α / √r on every LoRA layer of `model` (peft's `use_rslora=True`); returns `model`.

    Call it right after add_lora/add_dora, before training or PiSSA (PiSSA divides by the scale it finds).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"apply_rslora: {type(model).__name__} has no LoRA layers (call add_lora first)")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:   # unmerge() would subtract an update with the new scale from a weight merged with the old
        raise ValueError(f"apply_rslora: layers {merged[:3]} are merged; unmerge them first")
    for layer in layers.values():
        layer.scaling = rslora_scaling(layer.lora_alpha, layer.r)
    return model


# ----------------------------------------------------------------------------------------------------
# DoRA: magnitude and direction
# ----------------------------------------------------------------------------------------------------


class DoRALinear(LoRALinear):
    """h = m ⊙ (W0 + s B A) x / ‖W0 + s B A‖ + b, the norm taken per output row (DoRA eq. 5).

    (The paper's ‖·‖_c is a norm per column because it writes W as (d_in, d_out); with PyTorch's (out, in)
    weights, those columns are our rows: one length per output feature.)

    DoRA splits each row of the weight into a length and a direction, the way weight normalisation does:
    `lora_magnitude_vector` m (out_features,) holds the lengths and trains freely; the direction is the LoRA
    weight W0 + s B A divided by its row norms. At the start m = ‖W0‖ per row and B = 0, so the layer computes
    exactly W0 x + b. Fine-tuning can then change a row's length without turning it, or turn it without
    stretching it; the paper's Sec. 3 finds that full fine-tuning does this and plain LoRA, whose length and
    direction changes move together, cannot.

    Two conventions follow the paper and peft:
      - the norm ‖W0 + s B A‖ is treated as a constant in the backward pass (Sec. 4.3): no gradient flows
        through it, which saves the memory of differentiating a norm of an (out, in) matrix;
      - with dropout active, the whole adaptation (the magnitude's rescaling of W0 x too) sees the dropped
        input; without it (or in eval mode), the base output is reused, which saves one matmul.
    A 4-bit base (minilora.lora's base-layer protocol) works: the norm needs only its `dequantized_weight`.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__(base, r, lora_alpha, lora_dropout, init)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.merged_norm = None   # ‖W0 + s B A‖ at merge time, needed to undo the merge

    def base_weight(self) -> torch.Tensor:
        """W0 in float32, (out_features, in_features): the weight itself, or the 4-bit weight decoded."""
        if isinstance(self.base, nn.Linear):
            return self.base.weight.float()
        return self.base.dequantized_weight(torch.float32)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output row (the L2 norm over the inputs), with no gradient (DoRA Sec. 4.3)."""
        return torch.linalg.vector_norm(self.base_weight() + super().delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)            # W0 x + b
        if self.merged:
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        factor = self.lora_magnitude_vector / self.weight_norm()    # m / ‖W0 + s B A‖, one per output
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias
        else:
            base_out = x_lora @ self.base_weight().T                  # W0 dropout(x)
        lora_out = (x_lora @ self.lora_A.T) @ self.lora_B.T * self.scaling
        # m/‖·‖ ⊙ (W0 x + s B A x) + b, written as a correction added to the base output
        return (result + (factor - 1) * base_out + factor * lora_out).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 with W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖: what merging adds to the base weight."""
        if self.merged:
            raise RuntimeError("delta_weight(): this DoRALinear is merged; W0 is no longer stored apart")
        weight = self.base_weight() + super().delta_weight()
        factor = self.lora_magnitude_vector / self.weight_norm()
        return factor[:, None] * weight - self.base_weight()

    def merge(self) -> None:
        """W0 ← m ⊙ (W0 + s B A) / ‖W0 + s B A‖ in place (the merged layer is one plain matmul)."""
        weight = self._linear_weight("merge")
        norm = self.weight_norm()
        with torch.no_grad():
            weight += self.delta_weight().to(weight.dtype)
        self.merged_norm, self.merged = norm, True

    def unmerge(self) -> None:
        """W0 ← W' ‖W0 + s B A‖ / m − s B A, with the norm kept from merge() (W' alone cannot give it)."""
        weight = self._linear_weight("unmerge")
        with torch.no_grad():
            factor = (self.lora_magnitude_vector / self.merged_norm)[:, None]
            weight.copy_(weight.float() / factor - super().delta_weight())
        self.merged_norm, self.merged = None, False

    def _linear_weight(self, what: str) -> torch.Tensor:
        if what == "merge" and self.merged:
            raise RuntimeError("merge(): this DoRALinear is already merged; call unmerge() first")
        if what == "unmerge" and not self.merged:
            raise RuntimeError("unmerge(): this DoRALinear is not merged")
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"{what}() needs an nn.Linear base; this one is a {type(self.base).__name__} "
                            f"(4-bit codes cannot hold W'). Use minilora.lora.merge_lora(model), which "
                            f"builds a new nn.Linear from dequantized_weight() + delta_weight().")
        return self.base.weight


def add_dora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every target of `config` in a DoRALinear (peft's `use_dora=True`), freeze the rest; returns `model`.

    The same targets, checks and names as minilora.lora.add_lora; every target is checked before any is wrapped.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.lora.LoraConfig, got {type(config).__name__}")
    names = find_target_modules(model, config.target_modules)
    for name in names:
        try:
            check_base(model.get_submodule(name), config.r)
        except (ValueError, TypeError) as err:
            raise type(err)(f"module {name!r}: {err}") from err
    for name in names:
        replace_module(model, name, DoRALinear(model.get_submodule(name), config.r, config.lora_alpha,
                                               config.lora_dropout, config.init))
    mark_only_lora_trainable(model)
    return model


# ----------------------------------------------------------------------------------------------------
# DoRA adapter files, in peft's layout
# ----------------------------------------------------------------------------------------------------

PREFIX = "base_model.model."          # peft's path from PeftModel down to the wrapped model
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "exclude_modules")


def dora_shapes(r: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The three tensors peft stores per DoRA layer (after its module path) and their shapes."""
    return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r),
            "lora_magnitude_vector": (out_features,)}


def dora_tensors(layer: DoRALinear) -> dict[str, torch.Tensor]:
    """The layer's parameters under the names of `dora_shapes`."""
    return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B,
            "lora_magnitude_vector": layer.lora_magnitude_vector}


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """{full name: DoRALinear} for every DoRA layer of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def uses_rslora(layer: LoRALinear) -> bool:
    """True if the layer's scale is α/√r, False if α/r; anything else has no name in peft's config."""
    if math.isclose(layer.scaling, layer.lora_alpha / layer.r):
        return False
    if math.isclose(layer.scaling, rslora_scaling(layer.lora_alpha, layer.r)):
        return True
    raise ValueError(f"a layer has scaling={layer.scaling}, neither α/r nor α/√r for "
                     f"α={layer.lora_alpha}, r={layer.r}; peft's config cannot express it")


def save_dora(model: nn.Module, folder: str | os.PathLike, task_type: str = "CAUSAL_LM") -> Path:
    """Write the DoRA adapter of `model` as peft does: adapter_model.safetensors + adapter_config.json.

    The settings come from the layers themselves, which must all share them (peft's rank_pattern is not
    supported here); target_modules lists the adapted modules by full name, so peft and `load_dora` put the
    layers back exactly where they were.
    """
    layers = dora_layers(model)
    if not layers or len(layers) != len(lora_layers(model)):
        raise ValueError("save_dora: every LoRA layer of the model must be a DoRALinear (call add_dora)")
    settings = {(layer.r, layer.lora_alpha, getattr(layer.lora_dropout, "p", 0.0), uses_rslora(layer),
                 layer.merged) for layer in layers.values()}
    if len(settings) != 1 or next(iter(settings))[4]:
        raise ValueError(f"save_dora: the DoRA layers must be unmerged and share r, lora_alpha, lora_dropout "
                         f"and the scale; found (r, lora_alpha, lora_dropout, rslora, merged) = {settings}")
    r, lora_alpha, lora_dropout, rslora, _ = settings.pop()
    tensors = {f"{PREFIX}{name}.{key}": tensor.detach().cpu().contiguous()
               for name, layer in layers.items() for key, tensor in dora_tensors(layer).items()}
    config_json = {"peft_type": "LORA", "use_dora": True, "use_rslora": rslora, "r": r, "lora_alpha": lora_alpha,
                   "lora_dropout": lora_dropout, "target_modules": sorted(layers), "bias": "none",
                   "init_lora_weights": True, "task_type": task_type, "inference_mode": True}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    write_atomically(folder / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config_json)))
    return folder


def load_dora(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Add DoRA layers to a plain `model` and fill them from a peft DoRA adapter folder; strict on every key.

    Everything is checked (config settings, key set, shapes) before the model is touched.
    """
    folder = Path(folder)
    config_json = json.loads((folder / "adapter_config.json").read_text())
    if config_json.get("peft_type") != "LORA" or not config_json.get("use_dora"):
        raise ValueError(f"{folder}: not a DoRA adapter (needs peft_type 'LORA' and use_dora true)")
    for key in UNSUPPORTED:
        if config_json.get(key):
            raise ValueError(f"{folder}: {key}={config_json[key]!r} is not supported by load_dora")
    if config_json.get("bias", "none") != "none":
        raise ValueError(f"{folder}: bias={config_json['bias']!r} is not supported (only 'none')")
    targets = config_json["target_modules"]
    config = LoraConfig(r=config_json["r"], lora_alpha=config_json["lora_alpha"],
                        lora_dropout=config_json.get("lora_dropout", 0.0),
                        target_modules=targets if isinstance(targets, str) else tuple(targets))
    tensors = load_file(folder / "adapter_model.safetensors")
    shapes = {}
    for name in find_target_modules(model, config.target_modules):
        base = model.get_submodule(name)
        check_base(base, config.r)
        for key, shape in dora_shapes(config.r, base.in_features, base.out_features).items():
            shapes[f"{PREFIX}{name}.{key}"] = shape
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    wrong = sorted(k for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k])
    problems = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong}
    problems = [f"{what} {keys[:3]}" for what, keys in problems.items() if keys]
    if problems:   # peft would only warn, or drop keys: an adapter that silently does nothing
        raise ValueError(f"{folder}: the file does not fit the model's DoRA layers: {'; '.join(problems)}")
    add_dora(model, config)
    if config_json.get("use_rslora"):
        apply_rslora(model)
    with torch.no_grad():
        for name, layer in dora_layers(model).items():
            for key, tensor in dora_tensors(layer).items():
                tensor.copy_(tensors[f"{PREFIX}{name}.{key}"])
    return model


# ----------------------------------------------------------------------------------------------------
# PiSSA: start from the principal singular vectors
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> LoRALinear:
    """Move the top-r singular part of W0 into the adapter, leave the residual frozen (PiSSA eqs. 2-3).

    With W0 = U S Vᵀ (singular values in decreasing order) and our names (A is (r, in), B is (out, r)):

        A = sqrt(S_r / s) V_rᵀ,   B = U_r sqrt(S_r / s),   W_res = W0 − s B A = Σ_{i>r} u_i s_i v_iᵀ

    (the paper calls these B and A the other way round, and has s = 1; dividing by s makes s B A exactly the
    top-r part whatever the scale). The layer's output is unchanged at init, but training now moves the
    directions that matter most in W0 instead of a random subspace, and B A ≠ 0 gives both A and B a gradient
    from the first step. Needs the float W0: for a 4-bit model run it before quantizing and quantize the
    residual (the paper's QPiSSA).
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"pissa_init_ needs a LoRALinear, got {type(layer).__name__}")
    if layer.merged or not isinstance(layer.base, nn.Linear):
        raise ValueError(f"pissa_init_ needs an unmerged layer over an nn.Linear with a float weight, got "
                         f"merged={layer.merged}, base={type(layer.base).__name__}; for QLoRA, initialise "
                         f"the float model first and quantize the residual afterwards")
    weight = layer.base.weight
    W = weight.float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:layer.r] / layer.scaling)
    layer.lora_A.copy_(root[:, None] * Vh[:layer.r])
    layer.lora_B.copy_(U[:, :layer.r] * root)
    weight.copy_((W - layer.scaling * (layer.lora_B @ layer.lora_A)).to(weight.dtype))
    return layer


# ----------------------------------------------------------------------------------------------------
# LoRA+: a larger learning rate for B
# ----------------------------------------------------------------------------------------------------


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0) -> list[dict]:
    """Optimizer groups: lr for the A matrices, λ·lr for B (LoRA+, η_B = λ η_A; λ = 2⁴ is the paper's default).

    B starts at zero and must grow to produce a feature, while A only has to point somewhere useful; with one
    learning rate, the step that is stable for A is far too small for B when the width is large (the paper's
    Sec. 3 analysis of the infinite-width limit). Like peft, 1-D trainable parameters (DoRA's magnitudes,
    biases) go with B. Pass the result to any torch optimizer: `torch.optim.AdamW(groups)`.
    """
    for label, value in (("lr", lr), ("lr_ratio", lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{label} must be a number > 0, got {label}={value!r}")
    group_a, group_b = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (group_b if "lora_B" in name or param.ndim == 1 else group_a).append(param)
    if not group_a and not group_b:
        raise ValueError(f"loraplus_param_groups: {type(model).__name__} has no trainable parameters")
    return [{"params": group_a, "lr": lr}, {"params": group_b, "lr": lr * lr_ratio}]
