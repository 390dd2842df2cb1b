"""What peft's tuner layers offer besides the computation: its two options for where a new adapter lives,
and its layer-level names. minilora's bypass layers (minilora.bypass.LowRankLinear: LoRA, DoRA, AdaLoRA) mix
`PeftLayerAPI` in.

peft's options of get_peft_model / PeftModel.from_pretrained, under peft's names:

    autocast_adapter_dtype   True (the default): adapters in float32 on a 16- or 8-bit base; False: in the
                             base's own dtype (`adapter_dtype`; chapter 1 §3 has the numerics)
    low_cpu_mem_usage        True: adapter tensors on the meta device, nothing allocated, for a file to fill
                             (`PeftLayerAPI.load_tensor`): a loaded adapter is in memory once, not twice

peft's layer-level names, for code written against peft's tuner layers. Several popular training scripts
walk a peft model and switch its layers one by one:

    for module in model.modules():
        if hasattr(module, "enable_adapters"):
            module.enable_adapters(False)          # e.g. a reference model for DPO, without a second copy

and read `module.merged`, `module.merged_adapters` or `module.active_adapters` (peft's BaseTunerLayer,
peft/tuners/tuners_utils.py). minilora's own names stay the ones the book teaches; each peft name is a view
of one of them:

    peft's name on a layer              minilora's
    disable_adapters (read-only)        `disabled`
    enable_adapters(enabled)            `disabled = not enabled`, plus the adapter's requires_grad, as peft
    active_adapter, active_adapters     `adapter_name`, [adapter_name] (one adapter is active at a time here)
    merged, merged_adapters             `merged`, [adapter_name] while merged, else []
    get_base_layer()                    `base`
    merge(safe_merge, adapter_names)    merge(safe_merge) of the active adapter (other names are refused)

Read first: `adapter_dtype`, then `PeftLayerAPI.enable_adapters`. tests/test_peft_parity.py runs the same
calls on peft's layers side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.core import lora as core_lora

META = torch.device("meta")


def autocast_dtype(dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """peft's `cast_adapter_dtype` rule: with autocast_adapter_dtype=True, its default, the 16- and 8-bit
    floats (float16, bfloat16, float8) become float32; float32 and float64 stay as they are either way.

    float32 adapters on a 16-bit base are the safe default: an optimizer updating 16-bit numbers loses small
    steps to rounding. False keeps them in the base's 16 bits: half the memory for the adapter, its gradient
    and (torch's AdamW) its moments (chapter 1 §3 explains the numerics, chapter 7 counts the bytes).
    """
    return torch.float32 if autocast_adapter_dtype and dtype.itemsize < 4 else dtype


def adapter_dtype(base: nn.Module, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of a new adapter on `base`, as peft picks it: the base's dtype (a 4-bit base's
    `compute_dtype`; peft's `_move_adapter_to_device_of_base_layer`), then `autocast_dtype`."""
    dtype = getattr(base, "compute_dtype", None) or getattr(getattr(base, "weight", None), "dtype", torch.float32)
    if not dtype.is_floating_point:   # a protocol base without compute_dtype (its weight is codes)
        dtype = torch.float32
    return autocast_dtype(dtype, autocast_adapter_dtype)


def check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage) -> None:
    """ValueError unless both of peft's options are True or False."""
    for label, value in (("autocast_adapter_dtype", autocast_adapter_dtype), ("low_cpu_mem_usage", low_cpu_mem_usage)):
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be True or False, got {label}={value!r}")


def check_enabled(enabled) -> None:
    """TypeError unless peft's switch `enabled` is True or False."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got enabled={enabled!r}")


class PeftLayerAPI:
    """Mixed into minilora.bypass.LowRankLinear, in front of a core layer (minilora.core.lora.LoRALinear or
    a subclass), which provides `base`, `disabled`, `merged`, `unmerge()` and the "lora_" parameters."""

    adapter_name = "default"        # AdaLoRA layers hold one adapter; a LoRALinear names its own
    autocast_adapter_dtype = True   # peft's options for the next adapter created: set them before the core's
    low_cpu_mem_usage = False       # __init__, which creates the first one

    # -- where a new adapter lives ---------------------------------------------------------------------

    def base_device(self) -> torch.device:
        """Where the base's tensors are (the core's placement rule), whatever low_cpu_mem_usage says."""
        return core_lora.LoRALinear.adapter_placement(self)["device"]

    def adapter_placement(self) -> dict:
        """The core's placement (the base's device) in `adapter_dtype`; the meta device while low_cpu_mem_usage."""
        device = META if self.low_cpu_mem_usage else self.base_device()
        return {"device": device, "dtype": adapter_dtype(self.base, self.autocast_adapter_dtype)}

    def load_tensor(self, owner: nn.Module, key: str, tensor: torch.Tensor) -> None:
        """Adapter tensor `key` ("lora_A", ...) of `owner` (this layer, or one of its parked slots) from a file.
        A real tensor is overwritten in place. A meta one (low_cpu_mem_usage) is replaced by the file's tensor
        itself, cast to the adapter's dtype and moved to the base's device: no second copy where the file's
        dtype and device are already those (peft's load_state_dict(assign=True))."""
        current = getattr(owner, key)
        if not current.is_meta:
            with torch.no_grad():
                current.copy_(tensor)
            return
        device = self.base_device()
        setattr(owner, key, nn.Parameter(tensor.to(device=device, dtype=current.dtype),
                                         requires_grad=current.requires_grad))

    # -- peft's layer-level names ----------------------------------------------------------------------

    @property
    def disable_adapters(self) -> bool:
        """peft's read-only flag: True while the bypass is off (minilora's `disabled`)."""
        return self.disabled

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (peft's is this name, or a list of names after its set_adapter)."""
        return self.adapter_name

    @property
    def active_adapters(self) -> list[str]:
        return [self.adapter_name]

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters whose ΔW sits in the base weight: the active one while merged (peft keeps a list)."""
        return [self.adapter_name] if self.merged else []

    def get_base_layer(self) -> nn.Module:
        return self.base

    def enable_adapters(self, enabled: bool) -> None:
        """peft's switch for one layer. enabled=False: the bypass off and the adapter frozen; a merged layer
        is unmerged first, so the layer computes W0 x as pretrained (peft unmerges it at its next forward, for
        good: enabling does not merge again, here neither). enabled=True: the bypass on and the active
        adapter trainable again (peft calls its set_adapter here, which does the same)."""
        check_enabled(enabled)
        if not enabled and self.merged:
            self.unmerge()
        self.disabled = not enabled
        for name, param in self.named_parameters(recurse=False):   # lora_A, lora_B, ... (not the parked ones)
            if "lora_" in name:
                param.requires_grad_(enabled)

    def check_merge_names(self, adapter_names) -> None:
        """merge(adapter_names=...) as peft takes it: None or a list naming the active adapter. peft can merge
        several adapters of a layer at once; here one adapter is active at a time, so only it can be."""
        if adapter_names is not None and list(adapter_names) != [self.adapter_name]:
            raise ValueError(f"merge(adapter_names={adapter_names!r}): this layer merges its active adapter only "
                             f"({self.adapter_name!r}); minilora keeps one adapter active at a time (peft can "
                             f"merge several). set_adapter to the one to merge first")
