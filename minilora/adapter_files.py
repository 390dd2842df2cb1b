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

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

try:   # the regex parser Python's re uses (checked below before a file's regex is matched)
    from re import _parser as sre_parse  # Python >= 3.11
except ImportError:   # pragma: no cover - Python 3.10
    import sre_parse

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


def adapter_config_file(folder: Path) -> Path:
    """folder/adapter_config.json; FileNotFoundError naming what is missing."""
    config_file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing (an adapter folder needs {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    return config_file


def check_adapter_config(config_json, config_file: Path) -> dict:
    """`config_json` (adapter_config.json, parsed) if it is a peft config whose regular expressions are cheap
    to match (`check_pattern`); ValueError naming the file otherwise."""
    if not isinstance(config_json, dict) or "peft_type" not in config_json:
        raise ValueError(f"{config_file}: no 'peft_type' field; is this a peft adapter config?")
    for label in ("target_modules", "exclude_modules"):   # a string is a regex on the whole name
        if isinstance(config_json.get(label), str):
            check_pattern(label, config_json[label], config_file)
    for label in ("rank_pattern", "alpha_pattern"):       # every key is a regex on the end of the name
        pattern = config_json.get(label)
        for key in pattern if isinstance(pattern, dict) else ():
            check_pattern(f"{label} key", key, config_file)
    for label in ("modules_to_save", "layers_pattern"):   # names that peft puts into a regex
        value = config_json.get(label)
        for name in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
            if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]{1,200}", name):
                raise ValueError(f"{config_file}: {label} entries must be module names (letters, digits, '_', "
                                 f"'.', '-'), got {repr(name)[:80]}")
    return config_json


def target_modules_from_json(config_json: dict, config_file: Path) -> str | tuple[str, ...]:
    """target_modules as a config takes it: a string (a regex, or "all-linear") or a tuple of names."""
    targets = config_json["target_modules"]
    if isinstance(targets, str):
        return targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{config_file}: target_modules must be a list of module names or a regex string, "
                         f"got {repr(targets)[:80]}")
    return tuple(targets)


# A regex from a file is matched against every module name, and Python's re backtracks: "(.*)*X" takes 2^n
# steps on a name of n characters (peft, which matches the same way, hangs on it too), and k repeats in a
# row take up to n^k. So a file's regex may repeat only single characters (".*", "[0-9]+", never a group),
# at most MAX_REPEATS times, without backreferences, in at most MAX_PATTERN characters: matching stays
# polynomial and small (4 repeats: about 0.05 s for the 224 linear layers of a 7B Llama, measured).
MAX_PATTERN, MAX_REPEATS = 200, 4
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}
_ONE_CHARACTER = {sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.ANY, sre_parse.IN}


def check_pattern(label: str, pattern: str, config_file: Path) -> None:
    """ValueError unless `pattern` is a regex within the bounds above."""
    where = f"{config_file}: {label} {pattern[:MAX_PATTERN]!r}{'...' if len(pattern) > MAX_PATTERN else ''}"
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"{where}: a regex from a file may have at most {MAX_PATTERN} characters")
    try:
        repeats = _count_repeats(sre_parse.parse(pattern), where)
    except re.error as err:
        raise ValueError(f"{where} is not a valid regular expression: {err}") from None
    if repeats > MAX_REPEATS:
        raise ValueError(f"{where}: a regex from a file may repeat at most {MAX_REPEATS} times (it has "
                         f"{repeats}): matching it could take n^{repeats} steps per module name")


def _count_repeats(parsed, where: str) -> int:
    """The repeats (*, +, {m,n} with n > 1) in a parsed regex; ValueError for a repeated group (nested
    repeats backtrack exponentially) or a backreference."""
    count = 0
    for op, value in parsed:
        if op in _REPEATS:
            low, high, body = value
            if high > 1 and not (len(body) == 1 and body[0][0] in _ONE_CHARACTER):
                raise ValueError(f"{where}: a regex from a file may repeat only single characters (like .* "
                                 f"or [0-9]+), not a group: a repeated group can take 2^n steps to match")
            count += 1 if high > 1 else _count_repeats(body, where)
        elif op in (sre_parse.GROUPREF, sre_parse.GROUPREF_EXISTS):
            raise ValueError(f"{where}: a regex from a file may not use backreferences")
        elif op == sre_parse.SUBPATTERN:
            count += _count_repeats(value[-1], where)
        elif op == sre_parse.BRANCH:
            count += sum(_count_repeats(branch, where) for branch in value[1])
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            count += _count_repeats(value[1], where)
        elif op == getattr(sre_parse, "ATOMIC_GROUP", None):
            count += _count_repeats(value, where)
    return count


PICKLED_WEIGHTS_NAME = "adapter_model.bin"   # what peft wrote before safetensors (and still does if asked)


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of folder/adapter_model.safetensors. A folder holding only peft's pickled
    adapter_model.bin is refused unread: unpickling runs whatever code the file holds (peft reads it with
    torch.load)."""
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file() and (folder / PICKLED_WEIGHTS_NAME).is_file():
        raise ValueError(f"{folder / PICKLED_WEIGHTS_NAME} is a pickle (torch.save), and minilora never unpickles "
                         f"a file it is handed: unpickling runs whatever code the file holds (peft loads it with "
                         f"torch.load). Where you trust the file, convert it once: load it with peft and "
                         f"save_pretrained(folder, safe_serialization=True) writes {WEIGHTS_NAME}")
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing (an adapter folder holds its tensors in "
                                f"{WEIGHTS_NAME})")
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_file} could not be read (truncated or corrupt?): {err}") from err
