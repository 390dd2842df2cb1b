"""Building a causal LM without ever holding it whole in 16 bits: a skeleton first, then one layer at a time.

This is the one way the package builds a transformers model, whatever its weights (a checkpoint folder, random
draws for a preset, the running example's pretrained tensors) and whatever it becomes (QLoRA's 4-bit layers,
LoRA's frozen 16-bit base, full fine-tuning in fp32):

1. The *skeleton*: the model built on the meta device (`skeleton`), every parameter a shape and a dtype
   with no memory behind it. A checkpoint is checked against it (minilora.checkpoint_files) before a single
   weight is read, so a missing shard or a wrong shape fails in a second, not after minutes of loading.
2. *Materialize* (`materialize`): first what lies outside the decoder layers (embeddings, final norm, head:
   the largest single tensors), then each decoder layer: its tensors are read (or drawn) on the target device
   in the target dtype and handed to `prepare_layer` (QLoRA: quantize the layer's linears) before the next
   layer is touched.

Host memory at the peak is therefore the finished layers (4-bit for QLoRA) + one layer in 16 bits + the
embeddings and head, never the 16-bit model: 7B in bf16 is 13.5 GB, its 4-bit layers 3.9 GB, one bf16 layer
0.4 GB.

Random weights (`random_weights`) follow transformers' initialisation for Llama (linear and embedding weights
from N(0, initializer_range²), norms 1, biases 0, the padding row 0), each tensor from its own generator seeded
by (seed, tensor name): the same seed gives the same model whatever order the tensors are drawn in.

Llama-style models only (embeddings, `layers`, norm, rotary table, head: Llama, Mistral, Qwen2, ...); anything
the loop leaves on the meta device is an error that names it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from minilora.architecture import PRESETS
from minilora.checkpoint_files import Checkpoint

# (names, dtype, device) -> {name: tensor}: where a model's weights come from (a checkpoint, random draws, ...).
Weights = Callable[[list, torch.dtype, torch.device], dict]


def preset_config(name: str, **overrides):
    """A transformers LlamaConfig for a preset architecture of minilora.architecture.PRESETS (LLaMA-1's
    rms_norm_eps 1e-6 and 2048 positions; no KV cache, since the book trains)."""
    from transformers import LlamaConfig  # here: floors below and `--help` need no model library

    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    settings = dict(PRESETS[name], max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    use_cache=False)
    return LlamaConfig(**{**settings, **overrides})


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` on the meta device: its modules, shapes and dtypes, no memory. Raises
    ValueError for a model without Llama-style decoder layers (`decoder_layers`), before anything is built."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    decoder_layers(model)
    return model


def tensor_names(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({name: shape} of every tensor the weights must provide, {tied name: the name it is tied to}).

    The names are the state dict's; a tensor tied to an earlier one (a head tied to the embeddings) is the same
    Parameter under a second name, so it is not needed twice: it is tied again after loading.
    """
    first_name: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    needed = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items() if name not in tied}
    return needed, tied


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the model's repeated decoder layers: "model.layers" in a Llama."""
    name = f"{getattr(model, 'base_model_prefix', 'model')}.layers"
    try:
        layers = model.get_submodule(name)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at {name!r}; the model builder knows "
                         f"Llama-style models (embeddings, layers, norm, rotary table, head)")
    return name, layers


def materialize(model: nn.Module, weights: Weights, dtype: torch.dtype, device: torch.device,
                prepare_layer: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Give a skeleton its weights in place, outside the decoder layers first, then layer by layer; returns it.

    Every decoder layer goes through `prepare_layer(layer)` (which returns the layer to keep, e.g. with its
    linears quantized) as soon as it is real, before the next layer's weights exist. Tied weights are tied
    again and computed tables (the rotary frequencies) computed on `device` at the end. The model is returned
    in eval mode, as `from_pretrained` returns one.
    """
    prefix, layers = decoder_layers(model)
    needed, tied = tensor_names(model)
    _assign(model, weights([n for n in needed if not n.startswith(prefix + ".")], dtype, device))
    for index in range(len(layers)):
        _assign(model, weights([n for n in needed if n.startswith(f"{prefix}.{index}.")], dtype, device))
        if prepare_layer is not None:
            layers[index] = prepare_layer(layers[index])
    for name, source in tied.items():
        _assign(model, {name: model.get_parameter(source)})
    _compute_tables(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__}: {len(left)} tensor(s) are still on the meta device after "
                         f"loading ({left[:3]}); the model builder knows Llama-style models only")
    return model.eval()  # as from_pretrained returns it; training calls .train()


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each tensor where its name says, as a Parameter where there was one (keeping requires_grad)."""
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        if isinstance(old, nn.Parameter) and not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        setattr(owner, attr, tensor)


def _compute_tables(model: nn.Module, device: torch.device) -> None:
    """Rebuild on `device` the modules whose only tensors are computed tables (the rotary embedding's inverse
    frequencies: a non-persistent buffer, in no checkpoint), with the model's config."""
    for name, module in list(model.named_modules()):
        buffers = list(module.buffers(recurse=False))
        if buffers and any(b.is_meta for b in buffers) and not list(module.parameters(recurse=False)) \
                and type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(device):
                fresh = type(module)(config=model.config)
            owner_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_name), attr, fresh)


# ----------------------------------------------------------------------------------------------------
# Where the weights come from
# ----------------------------------------------------------------------------------------------------


def random_weights(model: nn.Module, seed: int) -> Weights:
    """Random weights for `model`'s tensors as transformers initialises a Llama, each tensor from a generator
    seeded by (seed, its name) on the target device (so a seed gives the same model on one kind of device)."""
    std = getattr(model.config, "initializer_range", 0.02)

    def draw(names, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = torch.empty(getattr(owner, attr).shape, dtype=dtype, device=device)
            if "Norm" in type(owner).__name__:
                tensor.fill_(1.0)
            elif attr == "bias":
                tensor.zero_()
            else:
                # CPU generators keep 32 bits of a seed: one 32-bit hash of both the seed and the name
                generator = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                tensor.normal_(0.0, std, generator=generator)
                if isinstance(owner, nn.Embedding) and owner.padding_idx is not None:
                    tensor[owner.padding_idx] = 0
            tensors[name] = tensor
        return tensors

    return draw


def state_weights(state: dict[str, torch.Tensor]) -> Weights:
    """Weights from tensors already in memory (a state dict), copied and cast to the target dtype."""
    return lambda names, dtype, device: {n: state[n].to(device=device, dtype=dtype, copy=True) for n in names}


@dataclass
class ModelPlan:
    """A model before its weights: the skeleton (meta device) and where its weights come from, both already
    checked. `build` materializes it once."""

    skeleton: nn.Module
    weights: Weights
    dtype: torch.dtype

    def build(self, device: torch.device, prepare_layer=None) -> nn.Module:
        if not any(p.is_meta for p in self.skeleton.parameters()):
            raise RuntimeError("ModelPlan.build: this plan was built already (plan the model again)")
        return materialize(self.skeleton, self.weights, self.dtype, device, prepare_layer)


def plan_random(config, dtype: torch.dtype, seed: int) -> ModelPlan:
    """The model of a transformers config with random weights (`random_weights`)."""
    model = skeleton(config, dtype)
    return ModelPlan(model, random_weights(model, seed), dtype)


def plan_checkpoint(folder, dtype: torch.dtype) -> ModelPlan:
    """The model of a local checkpoint folder (config.json and safetensors files), checked from the files'
    headers against the model config.json describes; its weights are cast to `dtype` when read."""
    from transformers import AutoConfig

    folder = Path(folder)
    model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    checkpoint = Checkpoint(folder)
    needed, tied = tensor_names(model)
    checkpoint.check(needed, ignored=(*tied, ".rotary_emb.inv_freq"))
    return ModelPlan(model, checkpoint.read, dtype)
