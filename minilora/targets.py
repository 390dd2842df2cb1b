"""Which modules of a model get an adapter, and with which rank: peft's selection rules, by name only.

A config names modules in a few ways, and peft gives each a precise rule; minilora follows them exactly, so
that a config (or an adapter file) selects the same layers here as in peft:

    target_modules       a list: a module matches if its full name equals an entry or ends with "." + entry
                         ("q_proj" matches "model.layers.0.self_attn.q_proj"); a str: a regular expression
                         that must match the whole name; "all-linear": every Linear but the output head
    exclude_modules      the same two forms, taking modules away
    modules_to_save      modules trained in full are never adapted themselves
    layers_to_transform  only the repeated blocks with these indices (`layer_index`), for list targets
    rank_pattern,        another r / lora_alpha for some modules: the first key (a regex) that matches the
    alpha_pattern        end of the name at a "." boundary

Everything here works on names and plain modules; minilora.bypass applies it to a model's layers
(`selected_modules`, `find_target_modules`), minilora.lora_config checks a LoraConfig's fields with
`check_names`. The rule for a list of names is minilora.core.lora's `is_target`. Read first: `matches`.
"""

from __future__ import annotations

import re

from torch import nn

from minilora.core.lora import is_target

ALL_LINEAR = "all-linear"


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


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head, as a transformers model names it (get_output_embeddings), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def output_head_name(model: nn.Module) -> str | None:
    """The name of the output head ("lm_head" in causal LMs), which "all-linear" leaves alone."""
    head = output_head(model)
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
        if head is None and (name == "lm_head" or name.endswith(".lm_head")):
            return name
    return None


def matches(name: str, target_modules) -> bool:
    """peft's rule: a str is a regex the whole name must match, a list names modules by `is_target`."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return is_target(name, target_modules)


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The index of the repeated block a module sits in, by peft's rule ("model.layers.3.mlp.up_proj" → 3).

    The first "<component>.<digits>." in the name, where the component is any name unless `layers_pattern`
    (a name or a list of names, e.g. "layers" or ["h"]) says which. As in peft, without a pattern the index
    must follow at least one other component: a top-level "layers.3.q" has no index.
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        matches = (re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name) for pattern in patterns)
        match = next((m for m in matches if m is not None), None)
    return int(match.group(1)) if match else None


def is_excluded(name: str, exclude_modules=None, modules_to_save=None) -> bool:
    """peft's exclusions: `exclude_modules` (a regex matching the whole name, or names matched like
    target_modules), and every module trained in full (`modules_to_save`) or inside one."""
    if isinstance(exclude_modules, str):
        if re.fullmatch(exclude_modules, name):
            return True
    elif exclude_modules and matches(name, exclude_modules):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def pattern_value(pattern: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the value of the first key (a regex) that matches the end
    of the module name at a "." boundary ("v_proj" and "layers.0.self_attn.v_proj" both match
    "model.layers.0.self_attn.v_proj"), else `default`. First in the dict's order, as in peft."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_names(label: str, value, regex: bool) -> None:
    """None, a non-empty list of non-empty names, or (if `regex`) one regular expression."""
    if value is None:
        return
    if isinstance(value, str) and regex:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{label}={value!r} is not a valid regular expression: {err}") from err
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        allowed = "None, a regex string or a non-empty list of module names" if regex else \
            "None or a non-empty list of module names"
        raise ValueError(f"{label} must be {allowed}, got {label}={value!r}")


def modules_to_save_names(model: nn.Module, modules_to_save) -> list[str]:
    """The modules `modules_to_save` names, by peft's rule: the full name ends with an entry (note: no "."
    boundary, so "head" also names "lm_head", as in peft); none inside another one."""
    names = [name for name, _ in model.named_modules() if name and any(name.endswith(m) for m in modules_to_save or ())]
    return [name for name in names if not any(name.startswith(other + ".") for other in names)]
