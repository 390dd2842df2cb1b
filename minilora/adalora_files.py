"""AdaLoRA adapters in peft's files: what goes in, and back (chapter 2). minilora.adapters dispatches here.

AdaLoRA files (peft_type "ADALORA") differ in three ways: the keys have no ".weight"
(`...q_proj.lora_A`, `.lora_E`, `.lora_B`), only the surviving triplets are stored (a module pruned to rank 0
stores empty tensors), and adapter_config.json carries `rank_pattern`, {"<module path>.lora_E": [kept?] *
init_r}, so the loader knows which of the init_r triplets each stored row is.

Like every adapter type, AdaLoRA supplies three functions: its tensors and config as they go into the files
(`adalora_state`), the settings read back from the JSON (`adalora_config_from_json`) and the loader
(`load_adalora_state`). The folder layout and the strict checks are minilora.adapter_files'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minilora.adapter_files import (
    PREFIX,
    check_config_matches,
    check_plain,
    check_tensors,
    shared_config_json,
    target_modules_from_json,
)
from minilora.bypass import check_rank_bound
from minilora.lora import find_target_modules, lora_layers, selected_modules
from minilora.svd_adapter import AdaLoraConfig, add_adalora, svd_layers

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
    check_config_matches(model, selected_modules(model, config.target_modules), layers, "AdaLoRA")
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
    config_json = {
        "peft_type": "ADALORA",
        "init_r": config.init_r,
        **{key: getattr(config, key) for key in ADALORA_SCHEDULE_FIELDS},
        "init_lora_weights": True,
        **shared_config_json(config),
        "rank_pattern": rank_pattern,
    }
    return tensors, config_json


def adalora_config_from_json(config_json: dict, config_file: Path) -> tuple[AdaLoraConfig, dict | None]:
    """(AdaLoraConfig, rank_pattern or None) from adapter_config.json; refuses what we do not implement."""
    check_plain(config_json, config_file, ("init_r", "lora_alpha", "target_modules", "total_step"), "AdaLoRA",
                own=("rank_pattern",))   # AdaLoRA's own rank_pattern is read below
    schedule = {key: config_json[key] for key in ADALORA_SCHEDULE_FIELDS if key in config_json}
    targets = target_modules_from_json(config_json, config_file)
    try:
        config = AdaLoraConfig(init_r=config_json["init_r"], lora_alpha=config_json["lora_alpha"],
                               lora_dropout=config_json.get("lora_dropout", 0.0),
                               target_modules=targets,
                               **schedule)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    return config, config_json.get("rank_pattern") or None


def load_adalora_state(model: nn.Module, config: AdaLoraConfig, rank_pattern: dict | None,
                       tensors: dict[str, torch.Tensor], weights_file: Path, source, placement: dict) -> nn.Module:
    """Check the rank pattern, every key and shape first; then add SVDLinear layers if needed (with
    `placement`: peft's two options) and give each layer the file's surviving triplets
    (`SVDLinear.load_triplets`; ranknum stays init_r). `source` names the config in errors."""
    if lora_layers(model) and not svd_layers(model):
        raise ValueError(f"{source}: an ADALORA adapter cannot load into a model with LoRA layers")
    layers = svd_layers(model)
    if layers:   # already adapted: same modules, full rank init_r, not merged
        for name, layer in layers.items():
            if layer.merged or layer.r != config.init_r or layer.ranknum.item() != config.init_r:
                raise ValueError(f"load_adapter: layer {name!r} (r={layer.r}, merged={layer.merged}) "
                                 f"does not fit {source} (init_r={config.init_r}); load into an unmerged"
                                 f" model fresh from add_adalora, or into the plain base model")
        names = list(layers)
    else:
        try:
            names = find_target_modules(model, config.target_modules)
            for name in names:   # before anything of size init_r is built (init_r: 100000000 is 0.8 GB a list)
                check_rank_bound(model.get_submodule(name), config.init_r, "init_r", name)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{source}: target_modules={config.target_modules!r}, init_r={config.init_r} "
                            f"do not fit {type(model).__name__}: {err}") from err
    keep = kept_triplets(names, config.init_r, rank_pattern, source)
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        r = sum(keep[name])
        shapes[f"{PREFIX}{name}.lora_A"] = (r, module.in_features)
        shapes[f"{PREFIX}{name}.lora_E"] = (r, 1)
        shapes[f"{PREFIX}{name}.lora_B"] = (module.out_features, r)
    check_tensors(tensors, shapes, weights_file)

    if not layers:
        add_layers(add_adalora, model, config, source, placement)
        layers = svd_layers(model)
    for name, layer in layers.items():   # the file's tensors become the parameters, one layer at a time
        layer.load_triplets({kind: tensors.pop(f"{PREFIX}{name}.{kind}") for kind in ("lora_A", "lora_E", "lora_B")})
    return model


def kept_triplets(names: list[str], init_r: int, rank_pattern: dict | None, source) -> dict[str, list[bool]]:
    """{module: [kept?] * init_r} from the file's rank_pattern (all kept without one), each entry checked."""
    keep = {name: [True] * init_r for name in names}
    if rank_pattern is None:
        return keep
    pattern_keys = {f"{name}.lora_E": name for name in names}
    if set(rank_pattern) != set(pattern_keys):
        odd = sorted(set(rank_pattern) ^ set(pattern_keys))
        raise ValueError(f"{source}: rank_pattern must have one entry '<module>.lora_E' per adapted "
                         f"module; these differ: {odd[:3]}")
    for key, name in pattern_keys.items():
        pattern = rank_pattern[key]
        if (not isinstance(pattern, list) or len(pattern) != init_r
                or not all(isinstance(kept, bool) for kept in pattern)):
            raise ValueError(f"{source}: rank_pattern[{key!r}] must be a list of {init_r} "
                             f"booleans, got {pattern!r}")
        keep[name] = pattern
    return keep


def add_layers(add, model: nn.Module, config, source, placement: dict) -> None:
    try:   # add_lora / add_adalora check every layer before changing any: a failure leaves the model as it was
        add(model, config, **placement)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{source}: target_modules={config.target_modules!r} do not fit "
                        f"{type(model).__name__}: {err}") from err
