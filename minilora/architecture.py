"""A Llama's shapes and exact parameter counts: the integers every memory estimate starts from.

A Llama-style decoder is a handful of integers (`Architecture`): hidden size h, MLP width i, layers L, heads,
key/value heads, vocabulary V. From them this module counts, exactly:

* the (out, in) shape of each of a block's seven linears (`linear_shapes`);
* the model's parameters, split into the parts the memory model treats differently (`parameter_counts`:
  block linears, embedding, lm_head, norms) - equal to `sum(p.numel() for p in
  LlamaForCausalLM(config).parameters())` to the last parameter;
* the trainable adapter parameters of LoRA and AdaLoRA at rank r (`lora_parameter_count`).

Chapter 7 derives these counts; `minilora.memory` turns them into bytes. The Llama-only counts (no biases, the
seven linears, QLoRA's targets) are minilora/core/memory.py's; this file adds the presets, biases, other
targets and the checks, and tests/test_core.py proves the two equal where both apply.

Read first: `parameter_counts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minilora.core import memory as core

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS
METHODS = ("full", "lora", "qlora", "adalora")  # what the book trains, and the memory model knows
ADAPTER_METHODS = ("lora", "qlora", "adalora")

# ------------------------------------------------------------------------------------------------------------
# 1. The architecture: a handful of integers
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture(core.Architecture):
    """The integers of a Llama-style decoder that decide its size (names as in transformers' LlamaConfig):
    minilora.core.memory.Architecture's, plus whether the block linears have biases (Llama's have none)."""

    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        """Width of the query (and of o_proj's input): heads x head_dim."""
        return self.num_attention_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        """Width of k and v: with grouped-query attention (GQA) fewer key/value heads than query heads."""
        return self.num_key_value_heads * self.d_head


# The published shapes. LLaMA-1 "33B" is the model its paper calls 30B (32.5 B parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    # The book's running example: minilora.data.tiny_llama_config() (77k parameters, 20-token vocabulary).
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=20),
}


def architecture(model: Any) -> Architecture:
    """Turn a preset name, a dict, a transformers config or an `Architecture` into an `Architecture`."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"model={model!r} is not a preset; allowed: {sorted(PRESETS)} "
                             "(or pass a config / dict)")
        return Architecture(**PRESETS[model])
    if isinstance(model, dict):
        get = model.get
    elif hasattr(model, "hidden_size"):  # a transformers PretrainedConfig, read by duck typing
        def get(key, default=None):
            return getattr(model, key, default)
    else:
        raise TypeError(f"model must be a preset name, dict, config or Architecture, "
                        f"got {type(model).__name__}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise ValueError(f"model config is missing {missing}; a Llama-style config needs {list(required)}")
    heads = int(get("num_attention_heads"))
    return Architecture(
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_hidden_layers=int(get("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("num_key_value_heads") or heads),
        vocab_size=int(get("vocab_size")),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        head_dim=None if get("head_dim") is None else int(get("head_dim")),
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
    )


# ------------------------------------------------------------------------------------------------------------
# 2. Exact parameter counts
# ------------------------------------------------------------------------------------------------------------

def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven linear layers in one decoder block (the core's)."""
    return core.linear_shapes(architecture(config))


def _bias_count(a: Architecture) -> dict[str, int]:
    """Bias entries of each block linear (all zero for Llama, which has no biases)."""
    attn, mlp = a.attention_bias, a.mlp_bias
    return {"q_proj": a.q_dim * attn, "k_proj": a.kv_dim * attn, "v_proj": a.kv_dim * attn,
            "o_proj": a.hidden_size * attn, "gate_proj": a.intermediate_size * mlp,
            "up_proj": a.intermediate_size * mlp, "down_proj": a.hidden_size * mlp}


def parameter_counts(config: Any) -> dict[str, int]:
    """Exact parameter count of a Llama-style causal LM, split into the parts the memory model treats
    differently: minilora.core.memory.parameter_counts, plus the block linears' biases if the config has them.

    Per block: the seven linears (d_out x d_in each, plus biases) and two RMSNorm weights (h each). Around the
    blocks: the token embedding (V x h), the final norm (h) and lm_head (V x h, absent when tied to the
    embedding - tied weights are one tensor and counted once, as `model.parameters()` does).

    Returns {"linear": ..., "embedding": ..., "lm_head": ..., "norm": ..., "total": ...}.
    """
    a = architecture(config)
    counts = core.parameter_counts(a)
    biases = a.num_hidden_layers * sum(_bias_count(a).values())
    return {**counts, "linear": counts["linear"] + biases, "total": counts["total"] + biases}


def count_parameter_tensors(config: Any) -> int:
    """How many parameter tensors the model has (torch's AdamW keeps one 4-byte `step` tensor per tensor)."""
    a = architecture(config)
    per_block = 7 + 2 + sum(1 for n in _bias_count(a).values() if n)
    return a.num_hidden_layers * per_block + 1 + (0 if a.tie_word_embeddings else 1) + 1


def resolve_targets(target: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Which block linears get adapters: "all-linear" -> all seven (never lm_head, as in the QLoRA recipe),
    "attention" -> q, k, v, o, or a list of their names."""
    if target == "all-linear":
        return LINEAR_NAMES
    if target == "attention":
        return ATTENTION_LINEARS
    if isinstance(target, str):
        target = [target]
    unknown = [t for t in target if t not in LINEAR_NAMES]
    if unknown or not target:
        raise ValueError(f"target={target!r}: allowed 'all-linear', 'attention' or names from "
                         f"{list(LINEAR_NAMES)}")
    return tuple(t for t in LINEAR_NAMES if t in target)


def lora_parameter_count(config: Any, r: int, target: Any = "all-linear", method: str = "lora") -> int:
    """Trainable adapter parameters: Σ over adapted (d_out x d_in) linears of r·(d_in + d_out)  (A is r x
    d_in, B is d_out x r); AdaLoRA's P Λ Q adds the r singular values Λ: r·(d_in + d_out) + r, counted at
    init_r. minilora.core.memory.lora_parameter_count, for any `resolve_targets` target."""
    if method not in ADAPTER_METHODS:
        raise ValueError(f"method={method!r}: adapters exist for 'lora', 'qlora' and 'adalora'")
    return core.lora_parameter_count(architecture(config), r, resolve_targets(target), method)
