"""Chapter 7, the memory model: how many bytes does fine-tuning a Llama-shaped model need, before we buy a GPU?

    total = base_weights + quant_constants + lora_params + gradients + optimizer_state
            + importance_scores + activations

Parameter counts are exact, read off the architecture; every other term is bytes per counted thing. This file
prices QLoRA's recipe (bf16 weights and adapters on all seven block linears, NF4 with double quantization,
paged AdamW, bf16 activations with a memory-efficient attention kernel, LoRA dropout 0). minilora/memory.py
builds the real model on it (every option, the activations counted tensor by tensor); tests/test_core.py
proves the two equal for this recipe.

Read first: `estimate`, then the counts it adds up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16 = 2  # bytes of a weight, an adapter parameter, a gradient and an activation in this recipe


@dataclass(frozen=True)
class Architecture:
    """The integers of a Llama-style decoder that decide its size (names as in transformers' LlamaConfig)."""

    hidden_size: int  # h
    intermediate_size: int  # i, the MLP's width
    num_hidden_layers: int  # L
    num_attention_heads: int
    num_key_value_heads: int  # fewer than the heads with grouped-query attention
    vocab_size: int  # V
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def architecture(config) -> Architecture:
    """An Architecture from a dict or a transformers config with LlamaConfig's field names."""
    if isinstance(config, Architecture):
        return config
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    return Architecture(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"),
                        get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads"),
                        get("vocab_size"), bool(get("tie_word_embeddings", False)), get("head_dim"))


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven linear layers of one decoder block."""
    a = architecture(config)
    h, i, q, kv = a.hidden_size, a.intermediate_size, a.num_attention_heads * a.d_head, a.num_key_value_heads * a.d_head
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def parameter_counts(config) -> dict[str, int]:
    """Exact parameters: L blocks of seven linears and two RMSNorms (h each), the embedding (V·h), the final
    norm (h) and lm_head (V·h, none when tied to the embedding). Llama has no biases."""
    a = architecture(config)
    linear = a.num_hidden_layers * sum(d_out * d_in for d_out, d_in in linear_shapes(a).values())
    embedding = a.vocab_size * a.hidden_size
    lm_head = 0 if a.tie_word_embeddings else embedding
    norm = (2 * a.num_hidden_layers + 1) * a.hidden_size
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "norm": norm,
            "total": linear + embedding + lm_head + norm}


def lora_parameter_count(config, r: int, target="all-linear", method: str = "lora") -> int:
    """Σ over the adapted (d_out, d_in) linears of r·(d_in + d_out) (A is r x d_in, B is d_out x r); AdaLoRA's
    Λ adds r per module."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1 (the rank of the update), got r={r!r}")
    names = LINEAR_NAMES if target == "all-linear" else target
    extra = r if method == "adalora" else 0
    shapes = linear_shapes(config)
    return architecture(config).num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) + extra for n in names)


def quant_constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> int:
    """The absmax bytes of one 4-bit tensor: 4 per block; with double quantization 1 per block, 4 per
    dq_blocksize blocks (absmax2) and 4 for the offset (QLoRA §3: 0.5 bit per parameter → 0.127)."""
    blocks = math.ceil(numel / blocksize)
    return blocks + 4 * math.ceil(blocks / dq_blocksize) + 4 if double_quant else 4 * blocks


def optimizer_state_bytes(num_params: int, num_tensors: int, optimizer: str = "adamw", param_bytes: int = 4,
                          master_weights: bool = False) -> int:
    """What an optimizer keeps for num_params trained parameters in num_tensors tensors.

    "adamw" (torch's): m and v in the parameters' dtype and a 4-byte step tensor per tensor; "paged_adamw"
    (bitsandbytes' 32-bit): m and v in fp32, 8·N; "sgd": nothing. master_weights (mixed-precision full
    fine-tuning): an fp32 copy of the weights, 4·N, and fp32 moments: 4N + 8N = 12N, ZeRO's "K = 12".
    """
    master = 4 * num_params if master_weights else 0
    if optimizer == "sgd":
        return master
    if optimizer == "paged_adamw":
        return master + 8 * num_params
    if optimizer == "adamw":
        return master + 2 * (4 if master_weights else param_bytes) * num_params + 4 * num_tensors
    raise ValueError(f"optimizer must be one of ('adamw', 'paged_adamw', 'sgd'), got optimizer={optimizer!r}")


def activation_bytes(config, method: str, r: int, tokens: int, seq_len: int, gradient_checkpointing: bool) -> int:
    """The tensors autograd keeps for backward, T = tokens, in bf16 (chapter 7, section 5). Per block:

      2 RMSNorms   x in fp32 and 1/rms: 2·(4Th + 4T)  (+ the 16-bit normalised x each, 2·2Th, when they train)
      attention    q, k, v, output (2 bytes each) and the fp32 log-sum-exp per head: 2T(2q + 2kv) + 4T·heads
      MLP          gate output, SiLU output, up output: 3·2Ti
      inputs       of q/k/v (shared), gate/up (shared), down: 2T(2h + i) (o_proj's is the attention output)
      adapters     lora_B's input, A x: 2T·r per adapted linear (7)
    Checkpointing keeps only each block's input (2Th) and recomputes one block at a time. Around the blocks:
    the final norm (4Th + 4T), fp32 log-probabilities (4TV), int64 labels (8T) and the loss's 4 bytes; full
    fine-tuning also saves the norm's and lm_head's inputs (2·2Th) and the token ids (8T); RoPE's cos and sin.
    """
    a, T, full = architecture(config), tokens, method == "full"
    h = a.hidden_size
    q, kv = a.num_attention_heads * a.d_head, a.num_key_value_heads * a.d_head
    norms = 2 * (4 * T * h + 4 * T + (BF16 * T * h if full else 0))
    attention = BF16 * T * (2 * q + 2 * kv) + 4 * T * a.num_attention_heads
    per_layer = (norms + attention + 3 * BF16 * T * a.intermediate_size + BF16 * T * (2 * h + a.intermediate_size)
                 + (0 if full else BF16 * T * r * len(LINEAR_NAMES)))
    head = 4 * T * h + 4 * T + 4 * T * a.vocab_size + 8 * T + 4 + (2 * BF16 * T * h + 8 * T if full else 0)
    rope = 2 * seq_len * a.d_head * BF16
    if gradient_checkpointing:
        return a.num_hidden_layers * BF16 * T * h + per_layer + head + rope
    return a.num_hidden_layers * per_layer + head + rope


def estimate(config, method: str = "qlora", r: int = 64, batch_size: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = True) -> dict[str, int]:
    """{component: bytes} of fine-tuning `config` with method "full", "lora", "qlora" or "adalora" (N all
    parameters, n adapter parameters): full trains N bf16 weights with fp32 master weights and moments,
    2 + 2 + 12 = 16 bytes each; the adapter methods freeze the base (qlora: block linears in NF4 + DQ) and
    train n bf16 adapter parameters with fp32 paged-AdamW moments; AdaLoRA's allocator (peft's) keeps three
    bf16 tensors per adapter parameter (the latest sensitivity I, Ī and Ū)."""
    a = architecture(config)
    counts = parameter_counts(a)
    N = counts["total"]
    n = N if method == "full" else lora_parameter_count(a, r, "all-linear", method)
    weights, constants = BF16 * N, 0
    if method == "qlora":
        for d_out, d_in in linear_shapes(a).values():
            weights -= a.num_hidden_layers * (BF16 * d_out * d_in - (d_out * d_in + 1) // 2)  # 4 bits each
            constants += a.num_hidden_layers * quant_constant_bytes(d_out * d_in)
    return dict(base_weights=weights, quant_constants=constants, lora_params=0 if method == "full" else BF16 * n,
                gradients=BF16 * n, optimizer_state=optimizer_state_bytes(n, 0, "paged_adamw", BF16, method == "full"),
                importance_scores=3 * BF16 * n if method == "adalora" else 0,
                activations=activation_bytes(a, method, r, batch_size * seq_len, seq_len, gradient_checkpointing))
