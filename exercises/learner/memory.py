"""Exercise 7: the counting half of the memory model (Chapter 7, chapters/07-scaling.md).

This is minilora/core/memory.py with the bodies of the counts taken out. Fill in every body that raises
NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_07_memory.py            # against this file

until everything passes. The book's solution is minilora/core/memory.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: `linear_shapes`, `parameter_counts`, `lora_parameter_count` (exact parameter counts of a Llama),
`quant_constant_bytes` (the absmax bytes of one NF4 tensor) and `optimizer_state_bytes` (what AdamW keeps).
Given (imported from the core, not part of the exercise): `architecture(config)` turns a dict or a transformers
LlamaConfig into an `Architecture` with fields hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings, head_dim and the property d_head;
LINEAR_NAMES are the seven block linears; `activation_bytes` and `estimate` (which add up your counts in the
book's version). Llama has no biases: ignore them.
"""

from __future__ import annotations

import math  # noqa: F401  (math.ceil)

from minilora.core.memory import (  # noqa: F401  (given)
    BF16,
    LINEAR_NAMES,
    Architecture,
    activation_bytes,
    architecture,
    estimate,
)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven linear layers of one decoder block, keyed by module name."""
    raise NotImplementedError(
        "hint: four attention projections (k and v may be narrower with grouped-query attention) and "
        "three MLP projections; nn.Linear stores (out, in).")


def parameter_counts(config) -> dict[str, int]:
    """Exact parameter count: {"linear", "embedding", "lm_head", "norm", "total"}."""
    raise NotImplementedError(
        "hint: the block linears of every layer, the embedding, lm_head (unless tied), the RMSNorm "
        "weights. Check: LLaMA-7B has 6,738,415,616.")


def lora_parameter_count(config, r: int, target="all-linear", method: str = "lora") -> int:
    """Trainable adapter parameters for rank r on the targeted block linears of every layer."""
    raise NotImplementedError(
        "hint: r·(in + out) per targeted linear per layer ('all-linear' or a list of names); AdaLoRA also "
        "trains r singular values per module. Reject r < 1.")


def quant_constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> int:
    """Bytes of the absmax constants of one NF4 tensor with numel entries."""
    raise NotImplementedError(
        "hint: one constant per block (the last may be partial); with double quantization the constants "
        "are 8-bit, plus an fp32 scale per dq_blocksize constants and one fp32 offset.")


def optimizer_state_bytes(num_params: int, num_tensors: int, optimizer: str = "adamw", param_bytes: int = 4,
                          master_weights: bool = False) -> int:
    """Bytes an optimizer keeps for num_params trained parameters held in num_tensors tensors."""
    raise NotImplementedError(
        "hint: what does each optimizer keep per parameter, and per parameter TENSOR? Compare with "
        "torch.optim.AdamW's state_dict; the docstring of minilora.core.memory.optimizer_state_bytes lists "
        "the rules only after you have tried.")
