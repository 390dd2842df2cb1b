"""Exercise 7: the counting half of the memory model (Chapter 7, chapters/07-scaling.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_07_memory.py            # against this file

until everything passes. The book's solution is minilora/memory.py; try without it first.

You write: `linear_shapes`, `parameter_counts`, `lora_parameter_count` (exact parameter counts of a Llama),
`optimizer_state_bytes` (what AdamW keeps) and `quant_constant_bytes` (the absmax bytes of one NF4 tensor).
Given (imported from minilora.memory, not part of the exercise): `architecture(config)` turns a preset
name, a dict or a transformers LlamaConfig into an `Architecture` with fields hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings and the
properties d_head, q_dim (= heads · head_dim) and kv_dim (= kv_heads · head_dim); `resolve_targets(target)`
turns "all-linear" or a list of names into a tuple of block-linear names. Llama has no biases: ignore them.
"""

import math  # noqa: F401  (math.ceil)

from minilora.memory import architecture, resolve_targets  # noqa: F401


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven linear layers of one decoder block, keyed by module name."""
    raise NotImplementedError(
        "hint: a = architecture(config). Attention: q_proj maps h -> q_dim, k_proj and v_proj map "
        "h -> kv_dim (fewer key/value heads with grouped-query attention), o_proj maps q_dim -> h. "
        "MLP: gate_proj and up_proj map h -> intermediate_size, down_proj maps it back to h. "
        "nn.Linear stores (out, in).")


def parameter_counts(config) -> dict[str, int]:
    """Exact parameter count: {"linear", "embedding", "lm_head", "norm", "total"}."""
    raise NotImplementedError(
        "hint: linear = layers · Σ out·in over linear_shapes; embedding = V·h; lm_head = V·h unless "
        "tie_word_embeddings (then it IS the embedding tensor and counts 0); norm = (2 RMSNorms per block · "
        "layers + 1 final) · h. total adds the four. Check: LLaMA-7B has 6,738,415,616.")


def lora_parameter_count(config, r: int, target="all-linear", method: str = "lora") -> int:
    """Trainable adapter parameters for rank r on the targeted block linears of every layer."""
    raise NotImplementedError(
        "hint: reject r < 1 with a ValueError. For each targeted (out, in) linear A is r x in and B is "
        "out x r: r·(in + out). AdaLoRA (method='adalora') also trains Λ, r singular values per "
        "module: + r. Multiply by the number of layers.")


def optimizer_state_bytes(num_params: int, num_tensors: int, optimizer: str = "adamw", param_bytes: int = 4,
                          master_weights: bool = False) -> int:
    """Bytes an optimizer keeps for num_params trained parameters held in num_tensors tensors."""
    raise NotImplementedError(
        "hint: torch's 'adamw' keeps exp_avg and exp_avg_sq shaped and typed like each parameter "
        "(2·param_bytes·N) plus a 0-dim float32 'step' tensor per parameter tensor (4 bytes each). "
        "'paged_adamw' (bitsandbytes 32-bit) keeps fp32 moments whatever the parameter dtype (8·N) and "
        "its step as a Python int. 'sgd' keeps nothing. master_weights=True adds an fp32 copy of the "
        "parameters (4·N) and then the moments are fp32 too. Any other optimizer name -> ValueError.")


def quant_constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                         dq_blocksize: int = 256) -> int:
    """Bytes of the absmax constants of one NF4 tensor with numel entries."""
    raise NotImplementedError(
        "hint: blocks = ceil(numel / blocksize), the last block may be partial. Without double quantization "
        "each block keeps an fp32 absmax: 4 bytes. With it each absmax is an 8-bit code (1 byte), every "
        "dq_blocksize codes share one fp32 absmax2 (4 bytes, ceil again), and the tensor keeps one fp32 "
        "offset (the mean it subtracted first).")
