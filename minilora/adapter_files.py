"""peft's adapter folder, read strictly: the names, the plain settings, the checks every adapter type shares.

A peft adapter is a folder with two files: adapter_config.json (the settings, with "peft_type") and
adapter_model.safetensors (the tensors, each under "base_model.model." + its module path, the path from
peft's PeftModel wrapper down to the original model). minilora.adapters writes and reads LoRA and AdaLoRA
adapters in that layout; this file holds what both need.

Unlike peft we are strict: a missing key, an unexpected key, a wrong shape or a config setting we do not
implement is an error that names the file and the key. (peft only warns about missing keys and silently drops
unknown ones, so an adapter saved under a wrong prefix "loads" and then does nothing.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the original model)


def check_config_matches(model: nn.Module, selected: list[str], layers: dict, kind: str) -> None:
    """The config must select exactly the modules that carry the layers (else peft would rebuild the
    bypasses in other places than the saved weights come from)."""
    if set(selected) != set(layers):
        odd = sorted(set(selected) ^ set(layers))
        raise ValueError(f"save_adapter: the config does not select the model's {kind} layers (they differ in "
                         f"{odd[:3]}); pass the config the layers were made with")



# peft settings that change what the adapter computes, with the plain-LoRA value; a LoRA file may set the
# options minilora implements (LORA_OPTIONS), an AdaLoRA file none of them, and every file must leave the
# rest plain. LoRA files we write carry all of them, so peft reads them as we mean them.
LORA_PLAIN_SETTINGS = {
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    "layers_pattern": None, "exclude_modules": None,
}

# Newer peft options that also change the forward pass or the set of adapted modules; must be absent or empty.
LORA_MUST_BE_EMPTY = ("target_parameters", "layer_replication", "trainable_token_indices", "use_qalora",
                      "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
                      "monteclora_config", "velora_config")

def shared_config_json(config) -> dict:
    """The adapter_config.json entries every adapter type writes alike, from a LoraConfig or AdaLoraConfig;
    with every setting minilora does not implement at its plain value, so peft reads the file as we mean it."""
    targets = config.target_modules
    return {
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **LORA_PLAIN_SETTINGS,
    }


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



def check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  weights_file: Path) -> None:
    """The file must hold exactly the keys in `shapes`, each a float tensor of that shape."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    problems = [f"{len(missing)} key(s) missing, e.g. {missing[:3]} (the model expects {len(shapes)} keys)"
                if missing else "",
                f"{len(unexpected)} unexpected key(s) that match no part of the adapter, e.g. {unexpected[:3]}"
                if unexpected else ""]
    if missing or unexpected:   # both at once: a key under a wrong prefix is missing *and* unexpected
        raise ValueError(f"{weights_file}: {'; '.join(p for p in problems if p)}")
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
