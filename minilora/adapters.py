"""Adapter files in peft's on-disk format, so that peft and minilora can load each other's adapters.

An adapter is only the small trained part of a model: the LoRA matrices and the settings needed to rebuild the
bypasses. peft stores it as a folder with two files:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in_features)
                                base_model.model.<module path>.lora_B.weight   (out_features, r)

("base_model.model." is the path from peft's PeftModel wrapper down to the original model.) `save_adapter`
writes that folder, `load_adapter` reads it back into a plain transformers model, adding the LoRA layers first
if the model has none.

Unlike peft we are strict: a missing key, an unexpected key, a wrong shape or a config setting we do not
implement is an error that names the file and the key. (peft only warns about missing keys and silently drops
unknown ones, so an adapter saved under a wrong prefix "loads" and then does nothing.)

One adapter type per peft_type. Each type supplies three small functions: its tensors and config as they go
into the files (`lora_state`), the settings read back from the JSON (`lora_config_from_json`), and the loader
(`load_lora_state`). `save_adapter` and `load_adapter` only dispatch on the config class / "peft_type" and
handle the files; AdaLoRA (Chapter 2) adds its own three functions and one branch in each.

AdaLoRA files (peft_type "ADALORA") differ in three ways: the keys have no ".weight"
(`...q_proj.lora_A`, `.lora_E`, `.lora_B`), only the surviving triplets are stored (a module pruned to rank 0
stores empty tensors), and adapter_config.json carries `rank_pattern`, {"<module path>.lora_E": [kept?] *
init_r}, so the loader knows which of the init_r triplets each stored row is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.files import write_atomically
from minilora.lora import LoraConfig, add_lora, find_target_modules, lora_layers, selected_modules
from minilora.svd_adapter import AdaLoraConfig, add_adalora, svd_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the original model)


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike, config, task_type: str | None = "infer") -> Path:
    """Write the adapter of `model` (trained with `config`) into folder `path` in peft's format; returns path.

    `config` must describe the model's adapter layers exactly (the same modules, r and lora_alpha), or the
    file would load as a different adapter. `task_type` tells peft which wrapper to build: "infer" (the
    default) writes "CAUSAL_LM" for a model that can generate (it has `prepare_inputs_for_generation`) and
    leaves it unset otherwise (an encoder such as BertModel then loads as a plain PeftModel); or give it.

    Each file is written under a temporary name in the same folder, then renamed over the old one, so a crash
    never leaves a half-written file under the real name.
    """
    if isinstance(config, LoraConfig):
        tensors, config_json = lora_state(model, config)
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


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter in folder `path` (saved by minilora or by peft) into `model`, in place; returns it.

    A model without LoRA layers gets them first, built from the adapter's config; a model that already has
    them must match the file exactly (same modules, same shapes).
    """
    folder = Path(path)
    config_json = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    peft_type = config_json["peft_type"]
    if peft_type == "LORA":
        return load_lora_state(model, config_json, tensors, folder)
    if peft_type == "ADALORA":
        return load_adalora_state(model, config_json, tensors, folder)
    raise ValueError(f"{folder / CONFIG_NAME}: peft_type={peft_type!r} is not supported "
                     f"(supported: 'LORA', 'ADALORA')")


def check_config_matches(model: nn.Module, target_modules, layers: dict, kind: str) -> None:
    """The config's target_modules must select exactly the modules that carry the layers (else peft would
    rebuild the bypasses in other places than the saved weights come from)."""
    selected = set(selected_modules(model, target_modules))
    if selected != set(layers):
        odd = sorted(selected ^ set(layers))
        raise ValueError(f"save_adapter: target_modules={target_modules!r} does not select the model's {kind} "
                         f"layers (they differ in {odd[:3]}); pass the config the layers were made with")


# ----------------------------------------------------------------------------------------------------
# LoRA: what goes into the files, and back
# ----------------------------------------------------------------------------------------------------

# peft settings that change what the adapter computes, with the plain-LoRA value minilora implements.
# We write them into every config (peft then reads our file as plain LoRA) and refuse files that differ.
LORA_PLAIN_SETTINGS = {
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    "layers_pattern": None, "exclude_modules": None,
}
# Newer peft options that also change the forward pass or the set of adapted modules; must be absent or empty.
LORA_MUST_BE_EMPTY = ("target_parameters", "layer_replication", "trainable_token_indices", "use_qalora",
                      "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
                      "monteclora_config", "velora_config")


def lora_state(model: nn.Module, config: LoraConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with peft's key names, config dict for adapter_config.json) of every LoRALinear in `model`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRALinear layers "
                         f"(call add_lora first; AdaLoRA layers need an AdaLoraConfig)")
    check_config_matches(model, config.target_modules, layers, "LoRA")
    tensors = {}
    for name, layer in layers.items():
        if layer.r != config.r or layer.lora_alpha != config.lora_alpha:
            raise ValueError(f"save_adapter: layer {name!r} has r={layer.r}, lora_alpha={layer.lora_alpha}, "
                             f"but config says r={config.r}, lora_alpha={config.lora_alpha}")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().to("cpu").contiguous()
    targets = config.target_modules
    config_json = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **LORA_PLAIN_SETTINGS,
    }
    return tensors, config_json


def check_plain(config_json: dict, config_file: Path, required: tuple, kind: str, own: tuple = ()) -> None:
    """The required fields are there, and every setting that would change the forward pass is plain
    (`own`: settings the adapter type reads itself)."""
    for key in required:
        if key not in config_json:
            raise ValueError(f"{config_file}: required field {key!r} is missing")
    plain_settings = {**LORA_PLAIN_SETTINGS, **{key: None for key in LORA_MUST_BE_EMPTY}}
    for key, plain in plain_settings.items():
        value = config_json.get(key, plain)
        if key not in own and value != plain and not (not value and not plain):  # None, False, {}, [] = off
            raise ValueError(f"{config_file}: {key}={value!r} is not supported by minilora "
                             f"(plain {kind} needs {plain!r})")


def lora_config_from_json(config_json: dict, config_file: Path) -> LoraConfig:
    """A LoraConfig from adapter_config.json, refusing settings that would change the forward pass."""
    check_plain(config_json, config_file, ("r", "lora_alpha", "target_modules"), "LoRA")
    init = config_json.get("init_lora_weights", True)
    targets = config_json["target_modules"]
    try:
        return LoraConfig(r=config_json["r"], lora_alpha=config_json["lora_alpha"],
                          lora_dropout=config_json.get("lora_dropout", 0.0),
                          target_modules=targets if isinstance(targets, str) else tuple(targets),
                          init="gaussian" if init == "gaussian" else "kaiming")
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err


def load_lora_state(model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor],
                    folder: Path) -> nn.Module:
    """Check every key and shape against the model first, then add LoRA layers if needed, then copy."""
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = lora_config_from_json(config_json, config_file)
    layers = lora_layers(model)
    if layers:   # already adapted: the layers must be exactly those of the file
        for name, layer in layers.items():
            if layer.merged:
                raise ValueError(f"load_adapter: layer {name!r} is merged; unmerge() it before loading "
                                 f"new weights")
        expected = {name: (layer.r, layer.in_features, layer.out_features) for name, layer in layers.items()}
    else:        # plain model: the config says where the layers go
        try:
            names = find_target_modules(model, config.target_modules)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{config_file}: target_modules={config.target_modules!r} do not fit "
                            f"{type(model).__name__}: {err}") from err
        expected = {name: (config.r, model.get_submodule(name).in_features,
                           model.get_submodule(name).out_features) for name in names}

    shapes = {}
    for name, (r, d_in, d_out) in expected.items():
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, d_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (d_out, r)
    check_tensors(tensors, shapes, weights_file)

    if not layers:
        _add_layers(add_lora, model, config, config_file)
        layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
    return model


# ----------------------------------------------------------------------------------------------------
# AdaLoRA: what goes into the files, and back
# ----------------------------------------------------------------------------------------------------

ADALORA_SCHEDULE_FIELDS = ("target_r", "tinit", "tfinal", "deltaT", "total_step", "beta1", "beta2",
                           "orth_reg_weight")


def adalora_state(model: nn.Module, config: AdaLoraConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of the surviving triplets, config dict with rank_pattern) of every SVDLinear in `model`.

    A layer's survivors are those its `rank_mask` keeps (the allocator's latest verdict, as peft saves its
    config.rank_pattern). A layer already shrunk by `keep_triplets` has r < init_r; its pattern marks its
    r rows kept and pads with dropped ones (which of the init_r slots they sit in does not change ΔW).
    """
    layers = svd_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no SVDLinear layers "
                         f"(call add_adalora first)")
    check_config_matches(model, config.target_modules, layers, "AdaLoRA")
    tensors, rank_pattern = {}, {}
    for name, layer in layers.items():
        if layer.ranknum.item() != config.init_r or layer.lora_alpha != config.lora_alpha:
            raise ValueError(f"save_adapter: layer {name!r} has init_r={layer.ranknum.item():g}, "
                             f"lora_alpha={layer.lora_alpha}, but config says init_r={config.init_r}, "
                             f"lora_alpha={config.lora_alpha}")
        keep = layer.rank_mask
        tensors[f"{PREFIX}{name}.lora_A"] = layer.lora_A.detach()[keep].to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_E"] = layer.lora_E.detach()[keep].to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B"] = layer.lora_B.detach()[:, keep].to("cpu").contiguous()
        rank_pattern[f"{name}.lora_E"] = keep.tolist() + [False] * (config.init_r - layer.r)
    targets = config.target_modules
    config_json = {
        "peft_type": "ADALORA",
        "init_r": config.init_r,
        **{key: getattr(config, key) for key in ADALORA_SCHEDULE_FIELDS},
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **LORA_PLAIN_SETTINGS,
        "rank_pattern": rank_pattern,
    }
    return tensors, config_json


def adalora_config_from_json(config_json: dict, config_file: Path) -> tuple[AdaLoraConfig, dict | None]:
    """(AdaLoraConfig, rank_pattern or None) from adapter_config.json; refuses what we do not implement."""
    check_plain(config_json, config_file, ("init_r", "lora_alpha", "target_modules", "total_step"), "AdaLoRA",
                own=("rank_pattern",))   # AdaLoRA's own rank_pattern is read below
    targets = config_json["target_modules"]
    schedule = {key: config_json[key] for key in ADALORA_SCHEDULE_FIELDS if key in config_json}
    try:
        config = AdaLoraConfig(init_r=config_json["init_r"], lora_alpha=config_json["lora_alpha"],
                               lora_dropout=config_json.get("lora_dropout", 0.0),
                               target_modules=targets if isinstance(targets, str) else tuple(targets),
                               **schedule)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    return config, config_json.get("rank_pattern") or None


def load_adalora_state(model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor],
                       folder: Path) -> nn.Module:
    """Check the rank pattern, every key and shape first; then add SVDLinear layers if needed, drop the
    triplets the pattern drops (`SVDLinear.keep_triplets`, ranknum stays init_r) and copy the survivors."""
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config, rank_pattern = adalora_config_from_json(config_json, config_file)
    if lora_layers(model) and not svd_layers(model):
        raise ValueError(f"{config_file}: an ADALORA adapter cannot load into a model with LoRA layers")
    layers = svd_layers(model)
    if layers:   # already adapted: same modules, full rank init_r, not merged
        for name, layer in layers.items():
            if layer.merged or layer.r != config.init_r or layer.ranknum.item() != config.init_r:
                raise ValueError(f"load_adapter: layer {name!r} (r={layer.r}, merged={layer.merged}) "
                                 f"does not fit {config_file} (init_r={config.init_r}); load into an unmerged"
                                 f" model fresh from add_adalora, or into the plain base model")
        names = list(layers)
    else:
        try:
            names = find_target_modules(model, config.target_modules)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{config_file}: target_modules={config.target_modules!r} do not fit "
                            f"{type(model).__name__}: {err}") from err

    keep = {name: [True] * config.init_r for name in names}
    if rank_pattern is not None:
        pattern_keys = {f"{name}.lora_E": name for name in names}
        if set(rank_pattern) != set(pattern_keys):
            odd = sorted(set(rank_pattern) ^ set(pattern_keys))
            raise ValueError(f"{config_file}: rank_pattern must have one entry '<module>.lora_E' per adapted "
                             f"module; these differ: {odd[:3]}")
        for key, name in pattern_keys.items():
            pattern = rank_pattern[key]
            if (not isinstance(pattern, list) or len(pattern) != config.init_r
                    or not all(isinstance(kept, bool) for kept in pattern)):
                raise ValueError(f"{config_file}: rank_pattern[{key!r}] must be a list of {config.init_r} "
                                 f"booleans, got {pattern!r}")
            keep[name] = pattern

    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        r = sum(keep[name])
        shapes[f"{PREFIX}{name}.lora_A"] = (r, module.in_features)
        shapes[f"{PREFIX}{name}.lora_E"] = (r, 1)
        shapes[f"{PREFIX}{name}.lora_B"] = (module.out_features, r)
    check_tensors(tensors, shapes, weights_file)

    if not layers:
        _add_layers(add_adalora, model, config, config_file)
        layers = svd_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.keep_triplets(torch.tensor(keep[name]))
            for kind in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, kind).copy_(tensors[f"{PREFIX}{name}.{kind}"])
    return model


def _add_layers(add, model: nn.Module, config, config_file: Path) -> None:
    try:   # add_lora / add_adalora check every layer before changing any: a failure leaves the model as it was
        add(model, config)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{config_file}: target_modules={config.target_modules!r} do not fit "
                        f"{type(model).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Files: strict reading, atomic writing (shared by every adapter type)
# ----------------------------------------------------------------------------------------------------


def check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  weights_file: Path) -> None:
    """The file must hold exactly the keys in `shapes`, each a float tensor of that shape."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing:
        raise ValueError(f"{weights_file}: {len(missing)} key(s) missing, e.g. {missing[:3]} "
                         f"(the model expects {len(shapes)} keys)")
    if unexpected:
        raise ValueError(f"{weights_file}: {len(unexpected)} unexpected key(s) that match no LoRA layer of "
                         f"the model, e.g. {unexpected[:3]}")
    for key, shape in shapes.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{weights_file}: key {key!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_file}: key {key!r} has dtype {tensor.dtype}, expected a float dtype")


def read_adapter_config(folder: Path) -> dict:
    config_file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing (an adapter folder needs {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    try:
        config_json = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(config_json, dict) or "peft_type" not in config_json:
        raise ValueError(f"{config_file}: no 'peft_type' field; is this a peft adapter config?")
    return config_json


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing (an adapter folder needs {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_file} could not be read (truncated or corrupt?): {err}") from err
