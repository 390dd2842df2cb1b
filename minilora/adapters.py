"""Adapter files in peft's on-disk format, so that peft and minilora can load each other's adapters.

An adapter is only the small trained part of a model: the LoRA matrices and the settings needed to rebuild the
bypasses. peft stores it as a folder with two files:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in_features)
                                base_model.model.<module path>.lora_B.weight   (out_features, r)

("base_model.model." is the path from peft's PeftModel wrapper down to the original model.) `save_adapter`
writes that folder, `load_adapter` reads it back into a plain transformers model, adding the LoRA layers first
if the model has none.

Unlike peft we are strict (minilora.adapter_files: the layout and the checks every adapter type shares):
a missing key, an unexpected key, a wrong shape or a config setting we do not implement is an error that
names the file and the key.

Every LoRA option of minilora.lora.LoraConfig goes into the files as peft writes it: rsLoRA and DoRA
(`use_rslora`, `use_dora`, plus one `lora_magnitude_vector` per layer), rank_pattern / alpha_pattern,
layers_to_transform, exclude_modules, the trained biases (`bias`, a base layer's bias under peft's name
"<module>.base_layer.bias") and modules_to_save (each parameter under the module's own path).

One adapter type per peft_type. Each type supplies three small functions: its tensors and config as they go
into the files (`lora_state`), the settings read back from the JSON (`lora_config_from_json`), and the loader
(`load_lora_state`). `save_adapter` and `load_adapter` only dispatch on the config class / "peft_type" and
handle the files; AdaLoRA (Chapter 2) has its own three functions and one branch in each.

AdaLoRA's three functions and its file differences are minilora.adalora_files (chapter 2).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minilora.adalora_files import adalora_config_from_json, adalora_state, load_adalora_state
from minilora.adapter_files import (  # the folder layout and the strict checks every adapter type shares
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_config_file,
    check_adapter_config,
    check_config_matches,
    check_plain,
    check_tensors,
    read_adapter_tensors,
    shared_config_json,
    target_modules_from_json,
)
from minilora.bypass import check_rank_bound
from minilora.family import add_dora
from minilora.files import read_json, write_atomically
from minilora.lora import (
    LoraConfig,
    ModulesToSave,
    adapter_names,
    add_lora,
    find_target_modules,
    lora_layers,
    modules_to_save_names,
    rslora_scaling,
    selected_modules,
)
from minilora.peft_layer import check_placement_options
from minilora.svd_adapter import AdaLoraConfig
from minilora.switching import active_adapter

# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike, config, task_type: str | None = "infer",
                 adapter_name: str | None = None) -> Path:
    """Write an adapter of `model` (trained with `config`) into folder `path` in peft's format; returns path.

    `config` must describe the adapter exactly (the same modules, ranks, scales and options), or the file
    would load as a different adapter. `adapter_name`: which adapter of a model that holds several (default:
    the active one). `task_type` tells peft which wrapper to build: "infer" (the default) writes
    "CAUSAL_LM" for a model that can generate (it has `prepare_inputs_for_generation`) and leaves it unset
    otherwise (an encoder such as BertModel then loads as a plain PeftModel); or give it.

    Each file is written under a temporary name in the same folder, then renamed over the old one, so a crash
    never leaves a half-written file under the real name.
    """
    if isinstance(config, LoraConfig):
        tensors, config_json = lora_state(model, config, adapter_name)
    elif isinstance(config, AdaLoraConfig):
        tensors, config_json = adalora_state(model, config)
    else:
        raise TypeError(f"config must be a minilora LoraConfig or AdaLoraConfig, got {type(config).__name__}")
    if task_type == "infer":
        task_type = "CAUSAL_LM" if callable(getattr(model, "prepare_inputs_for_generation", None)) else None
    config_json["task_type"] = task_type
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(folder / CONFIG_NAME,
                     lambda tmp: Path(tmp).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n"))
    return folder


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, config=None,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> nn.Module:
    """Load the adapter in folder `path` (saved by minilora or by peft) into `model`, in place; returns it.

    A model without LoRA layers gets them first, built from the adapter's config. With `adapter_name` new to
    the model, the adapter goes in beside the ones it has, inactive (peft's load_adapter; switch with
    minilora.switching.set_adapter). Otherwise the file fills the model's existing adapter (the active one,
    or `adapter_name`), which must match it exactly (same modules, same shapes).

    peft's options of PeftModel.from_pretrained, under its names:
      config                  a minilora LoraConfig or AdaLoraConfig to use instead of the folder's
                              adapter_config.json (the folder then needs only the weights file);
      autocast_adapter_dtype  False: new adapter layers keep a 16-bit base's dtype (minilora.peft_layer.adapter_dtype);
      low_cpu_mem_usage       True: new adapter layers are built on the meta device and the file's tensors
                              become their parameters, so the adapter is in memory once, not twice (a new
                              adapter's random init and then the file's copy). The file's tensors are cast to
                              the adapter's dtype where they differ, one tensor at a time.
    """
    check_placement_options(autocast_adapter_dtype, low_cpu_mem_usage)
    folder = Path(path)
    placement = dict(autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
    if config is None:
        config_file = adapter_config_file(folder)
        config_json = check_adapter_config(read_json(config_file), config_file)
        peft_type = config_json["peft_type"]
        if peft_type not in ("LORA", "ADALORA"):
            raise ValueError(f"{config_file}: peft_type={peft_type!r} is not supported "
                             f"(supported: 'LORA', 'ADALORA')")
        config, rank_pattern = (lora_config_from_json(config_json, config_file), None) if peft_type == "LORA" \
            else adalora_config_from_json(config_json, config_file)
        source = config_file
    elif isinstance(config, (LoraConfig, AdaLoraConfig)):
        rank_pattern, source = None, f"load_adapter(config={type(config).__name__}(...))"
    else:
        raise TypeError(f"config must be None (read {CONFIG_NAME}) or a minilora LoraConfig or AdaLoraConfig, "
                        f"got {type(config).__name__}")
    tensors = read_adapter_tensors(folder)
    if isinstance(config, LoraConfig):
        return load_lora_state(model, config, tensors, folder / WEIGHTS_NAME, adapter_name, source, placement)
    if adapter_name is not None:
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r}: AdaLoRA adapters come one per model "
                         f"(peft: AdaLoraModel supports only 1 trainable adapter)")
    return load_adalora_state(model, config, rank_pattern, tensors, folder / WEIGHTS_NAME, source, placement)


# ----------------------------------------------------------------------------------------------------
# LoRA: what goes into the files, and back
# ----------------------------------------------------------------------------------------------------

LORA_OPTIONS = ("bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layers_to_transform", "layers_pattern", "exclude_modules")
FILE_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",   # peft stores A and B as nn.Linear
             "lora_magnitude_vector": "lora_magnitude_vector"}     # DoRA's m as a plain parameter


def lora_layout(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{key in adapter_model.safetensors: shape} of the adapter `config` puts on `model` (adapted or not).

    Per adapted module: lora_A (r, in) and lora_B (out, r), with r from rank_pattern, and DoRA's magnitudes
    (out,); the trained biases (`bias`); every parameter of each module in `modules_to_save`. Keys use
    peft's names: a base layer is "base_layer" there, and a saved module's copy is stored under its own name.
    """
    layout = {}
    for name in find_target_modules(model, config.target_modules, **config.rules()):
        module = model.get_submodule(name)
        r, _ = config.rank_and_alpha(name)
        layout[f"{PREFIX}{name}.lora_A.weight"] = (r, module.in_features)
        layout[f"{PREFIX}{name}.lora_B.weight"] = (module.out_features, r)
        if config.use_dora:
            layout[f"{PREFIX}{name}.lora_magnitude_vector"] = (module.out_features,)
        bias = getattr(getattr(module, "base", module), "bias", None)   # a plain Linear, or the one wrapped
        if config.bias == "lora_only" and bias is not None:
            layout[f"{PREFIX}{name}.base_layer.bias"] = tuple(bias.shape)
    if config.bias == "all":
        for key, param in model.named_parameters():
            if "bias" in key and "lora_" not in key and ".parked." not in key:
                layout[PREFIX + key.replace(".base.bias", ".base_layer.bias")] = tuple(param.shape)
    for name in modules_to_save_names(model, config.modules_to_save):
        module = model.get_submodule(name)
        module = module.modules_to_save if isinstance(module, ModulesToSave) else module
        for key, param in module.named_parameters():
            layout[f"{PREFIX}{name}.{key}"] = tuple(param.shape)
    return layout


def adapter_slot(model: nn.Module, key: str) -> tuple[nn.Module, str] | None:
    """(layer, attribute) if file key `key` names an adapter tensor (lora_A, lora_B, DoRA's m), else None."""
    path = key[len(PREFIX):]
    for attribute, file_key in FILE_KEYS.items():
        if path.endswith("." + file_key):
            return model.get_submodule(path[:-len(file_key) - 1]), attribute
    return None


def lora_tensor(model: nn.Module, key: str, adapter_name: str) -> torch.Tensor:
    """The model's tensor behind file key `key` (a key of `lora_layout`) for adapter `adapter_name`."""
    slot = adapter_slot(model, key)
    if slot is not None:
        layer, attribute = slot
        return getattr(layer.adapter(adapter_name), attribute)
    path = key[len(PREFIX):]
    if path.endswith(".base_layer.bias"):
        return model.get_submodule(path[:-len(".base_layer.bias")]).base.bias
    for name, module in model.named_modules():   # a parameter of a module trained in full: its copy's
        if isinstance(module, ModulesToSave) and path.startswith(name + "."):
            return module.modules_to_save.get_parameter(path[len(name) + 1:])
    return model.get_parameter(path)


def lora_state(model: nn.Module, config: LoraConfig, adapter_name: str | None) -> tuple[dict, dict]:
    """(tensors with peft's key names, config dict for adapter_config.json) of one LoRA adapter of `model`."""
    everything = lora_layers(model)
    adapter_name = adapter_name or active_adapter(model) or "default"
    layers = {name: layer for name, layer in everything.items() if adapter_name in layer.adapter_names()}
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRA layers with adapter "
                         f"{adapter_name!r} (call add_lora first; AdaLoRA layers need an AdaLoraConfig)")
    check_config_matches(model, selected_modules(model, config.target_modules, **config.rules()), layers, "LoRA")
    for name, layer in layers.items():
        check_layer_fits(name, layer.adapter(adapter_name), config, layer.USES_DORA)
    tensors = {key: lora_tensor(model, key, adapter_name).detach().to("cpu").contiguous()
               for key in lora_layout(model, config)}
    config_json = {
        "peft_type": "LORA",
        "r": config.r,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        **shared_config_json(config),
        **{key: getattr(config, key) for key in LORA_OPTIONS},   # the options minilora implements
    }
    return tensors, config_json


def check_layer_fits(name: str, adapter, config: LoraConfig, uses_dora: bool, what: str = "save_adapter") -> None:
    """The adapter of layer `name` is what `config` says: its r, lora_alpha, scale (α/r or α/√r), kind."""
    r, alpha = config.rank_and_alpha(name)
    scaling = rslora_scaling(alpha, r) if config.use_rslora else alpha / r
    if (adapter.r, adapter.lora_alpha) != (r, alpha) or not math.isclose(adapter.scaling, scaling) \
            or uses_dora != config.use_dora:
        raise ValueError(f"{what}: layer {name!r} has r={adapter.r}, lora_alpha={adapter.lora_alpha}, "
                         f"scaling={adapter.scaling:g}, DoRA={uses_dora}, but the config says r={r}, "
                         f"lora_alpha={alpha}, scaling={scaling:g} (use_rslora={config.use_rslora}), "
                         f"DoRA={config.use_dora}: peft would load another model")


def lora_config_from_json(config_json: dict, config_file: Path) -> LoraConfig:
    """A LoraConfig from adapter_config.json, refusing settings that would change the forward pass."""
    check_plain(config_json, config_file, ("r", "lora_alpha", "target_modules"), "LoRA", own=LORA_OPTIONS)
    init = config_json.get("init_lora_weights", True)
    options = {key: config_json[key] for key in LORA_OPTIONS if config_json.get(key) is not None}
    targets = target_modules_from_json(config_json, config_file)
    try:
        return LoraConfig(r=config_json["r"], lora_alpha=config_json["lora_alpha"],
                          lora_dropout=config_json.get("lora_dropout", 0.0),
                          target_modules=targets,
                          init="gaussian" if init == "gaussian" else "kaiming", **options)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err


def load_lora_state(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], weights_file: Path,
                    adapter_name: str | None, source, placement: dict) -> nn.Module:
    """Check every key and shape against the model first, then add the adapter if it is new (with
    `placement`: peft's two options), then fill it. `source` names the config in errors."""
    layers = lora_layers(model)
    new = adapter_name not in adapter_names(model) if adapter_name is not None else not layers
    adapter_name = adapter_name or active_adapter(model) or "default"
    if not new and any(layer.merged for layer in layers.values()):
        raise ValueError("load_adapter: the model's layers are merged; unmerge() them before loading weights")
    try:
        layout = lora_layout(model, config)
        targets = find_target_modules(model, config.target_modules, **config.rules())
        for name in targets:
            check_rank_bound(model.get_submodule(name), config.rank_and_alpha(name)[0], "r", name)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{source}: the config does not fit {type(model).__name__}: {err}") from err
    check_tensors(tensors, layout, weights_file)
    if new:
        family = add_dora if config.use_dora else add_lora
        try:   # add_lora checks everything before it changes anything: a failure leaves the model as it was
            family(model, config, adapter_name, **placement)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{source}: the adapter does not fit {type(model).__name__}: {err}") from err
    else:   # into the model's adapter `adapter_name`: the same layers, the same settings
        carriers = {name: layer for name, layer in layers.items() if adapter_name in layer.adapter_names()}
        odd = sorted(set(carriers) ^ set(targets))
        if odd:
            raise ValueError(f"load_adapter: {source} adapts other layers than the model's adapter "
                             f"{adapter_name!r} (they differ in {odd[:3]}); load into the plain model, or "
                             f"beside it under a new adapter_name")
        for name, layer in carriers.items():
            check_layer_fits(name, layer.adapter(adapter_name), config, layer.USES_DORA, "load_adapter")
    for key in list(tensors):
        tensor = tensors.pop(key)   # the file's copy goes as soon as its tensor is in place
        slot = adapter_slot(model, key)
        if slot is not None:   # copied in, or (a meta tensor, low_cpu_mem_usage) the file's tensor itself
            layer, attribute = slot
            layer.load_tensor(layer.adapter(adapter_name), attribute, tensor)
        else:
            with torch.no_grad():
                lora_tensor(model, key, adapter_name).copy_(tensor)
    return model
