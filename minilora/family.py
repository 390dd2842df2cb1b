"""LoRA's family: four small changes to the bypass of minilora.lora, each from its paper.

LoRA (chapter 1) writes the fine-tuned weight as W = W0 + s · B A with s = α / r, B = 0 and A random at the
start, and one learning rate for both. Each member of the family changes one of those choices:

    rsLoRA   the scale:   s = α / √r instead of α / r                      (Kalajdzievski 2023, arXiv 2312.03732)
    DoRA     the shape:   W = m · (W0 + s B A) / ‖W0 + s B A‖, per output row (Liu et al. 2024, arXiv 2402.09353)
    PiSSA    the start:   B A = the top-r singular part of W0, the rest stays frozen  (Meng et al. 2024, 2404.02948)
    LoRA+    the step:    B learns λ times faster than A                  (Hayou et al. 2024, arXiv 2402.12354)

Reading order: `rslora_scaling` (in minilora.lora, since LoraConfig(use_rslora=True) uses it) and `apply_rslora`;
`DoRALinear` (one layer) and `add_dora`; `pissa_init_`; `loraplus_param_groups`. Adapter files of all of them
(rsLoRA and DoRA included) are minilora.adapters' save_adapter / load_adapter, in peft's layout. Each is checked against
peft 0.21 (`use_rslora`, `use_dora`, `init_lora_weights="pissa"`, `create_loraplus_optimizer`) in
tests/test_family.py, and scripts/family_demo.py shows what each does to the running example.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from minilora.bypass import check_merged_finite
from minilora.lora import LoraConfig, LoRALinear, add_lora, lora_layers, rslora_scaling

__all__ = ["DoRALinear", "add_dora", "apply_rslora", "dora_layers", "loraplus_param_groups", "pissa_init_",
           "rslora_scaling"]

# ----------------------------------------------------------------------------------------------------
# rsLoRA: the rank-stabilised scale
# ----------------------------------------------------------------------------------------------------


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
    A 4-bit base (minilora.bypass's base-layer protocol) works: the norm needs only its `dequantized_weight`.
    """

    ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")   # one adapter: A, B and m
    USES_DORA = True

    def create_adapter(self, r: int, lora_alpha: float, lora_dropout: float, init: str = "kaiming") -> None:
        """LoRA's fresh A and B, then m = ‖W0‖ per row (B = 0), so the layer starts at W0 x + b; m in the
        adapter's dtype (on the meta device too while low_cpu_mem_usage: a file brings m)."""
        super().create_adapter(r, lora_alpha, lora_dropout, init)
        if self.lora_A.is_meta:
            magnitude = torch.empty(self.out_features, device=self.lora_A.device, dtype=self.lora_A.dtype)
        else:
            magnitude = self.weight_norm().to(self.lora_A.dtype)
        self.lora_magnitude_vector = nn.Parameter(magnitude)
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
        result = self.base_forward(x)  # W0 x + b
        if self.merged or self.disabled:
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        factor = self.lora_magnitude_vector / self.weight_norm()    # m / ‖W0 + s B A‖, one per output
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias
        else:
            base_out = x_lora @ self.base_weight().to(x_lora.dtype).T  # W0 dropout(x), in the adapter's dtype
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

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 ← m ⊙ (W0 + s B A) / ‖W0 + s B A‖ in place (the merged layer is one plain matmul); safe_merge
        refuses a result with NaN or inf, and adapter_names takes peft's values, as for LoRA."""
        self.check_merge_names(adapter_names)
        weight = self._linear_weight("merge")
        norm = self.weight_norm()
        delta = self.delta_weight().to(weight.dtype)
        if safe_merge:
            check_merged_finite(weight + delta, "merge(safe_merge=True)")
        with torch.no_grad():
            weight += delta
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


def add_dora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
             autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> nn.Module:
    """Give every target of `config` a DoRALinear (peft's `use_dora=True`), freeze the rest; returns `model`.

    minilora.lora.add_lora with DoRA layers: the same targets, options (peft's autocast_adapter_dtype and
    low_cpu_mem_usage too), checks and names. Adapter files go through minilora.adapters.save_adapter /
    load_adapter like any LoRA adapter (peft's layout, plus one `lora_magnitude_vector` per layer).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.lora.LoraConfig, got {type(config).__name__}")
    return add_lora(model, replace(config, use_dora=True), adapter_name, layer_class=DoRALinear,
                    autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """{full name: DoRALinear} for every DoRA layer of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


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
