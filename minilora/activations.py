"""Activations: the bytes autograd saves between forward and backward, counted tensor by tensor.

For a Llama block in 16-bit compute with a memory-efficient attention kernel (`layer_activation_bytes`), for
the whole model with or without gradient checkpointing (`activation_bytes`), and split into the parts callers
compose (`activation_breakdown`). `minilora.measure.measure_saved_bytes` counts the same thing on a real model,
and the tests compare the two byte for byte. Chapter 7, section 5, derives every term; for QLoRA's recipe the
same count is the closed form of minilora/core/memory.py (`activation_bytes`), proven equal by tests/test_core.py.

Read first: `layer_activation_bytes`.
"""

from __future__ import annotations

from typing import Any

from minilora.architecture import METHODS, architecture, linear_shapes, resolve_targets


def layer_activation_bytes(config: Any, tokens: int, method: str = "qlora", target: Any = "all-linear",
                           r: int = 64, lora_dropout: float = 0.0, compute_bytes: int = 2,
                           dropout_mask_bytes: int = 1, adapter_bytes: int | None = None) -> int:
    """Bytes saved for backward by ONE Llama decoder block over `tokens` = batch x seq tokens (T below).

    Counted tensor by tensor (c = compute_bytes, 2 for bf16; h hidden, i intermediate, q = heads·head_dim,
    kv = kv_heads·head_dim, n_h = heads):

    * each RMSNorm (2 per block) upcasts to fp32 and saves x in fp32 (4Th) and rsqrt of the variance (4T);
      full fine-tuning also saves the normalized 16-bit x for the norm weight's gradient (cTh).
    * a linear layer saves its input X for the weight gradient (full) or for lora_A's gradient (LoRA, dropout
      0); q, k, v share one input tensor, gate and up share another, so each shared input is stored once. A
      frozen linear without adapter saves only its weight (not an activation).
    * ... unless each adapter needs its own copy of X: with LoRA dropout p > 0 (a dropped copy per adapted
      linear, plus the dropout mask: `dropout_mask_bytes` per entry - 1 on CUDA, where torch's fused dropout
      keeps a bool mask; the dropped tensor's dtype size on CPU, where dropout multiplies by a mask), or with
      adapters stored in another dtype than the compute (e.g. fp32 adapters on a bf16 base cast X to fp32 per
      module). Then each adapted linear keeps adapter_bytes·T·d_in (+ mask).
    * LoRA: lora_B saves lora_A's output, adapter_bytes·T·r per adapted linear.
    * attention with a memory-efficient kernel (flash / SDPA, no T x T score matrix): q, k, v, output (c each)
      and the fp32 log-sum-exp per head (4T·n_h). o_proj's input is the attention output, already saved.
    * the gated MLP saves the gate output (SiLU input), SiLU output and up output: 3cTi; down_proj's input
      (their product, cTi) is saved when down_proj is trained or adapted.

    Full fine-tuning, dropout 0, q = h:  (20h + 4kv + 8i + 4n_h + 8)·T bytes in bf16.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout}: must be in [0, 1)")
    a = architecture(config)
    T, c, h, i = tokens, compute_bytes, a.hidden_size, a.intermediate_size
    full = method == "full"
    adapted = set() if full else set(resolve_targets(target))
    shapes = linear_shapes(a)
    adapter_bytes = c if adapter_bytes is None else adapter_bytes
    own_copy = lora_dropout > 0 or adapter_bytes != c  # does each adapter keep its own copy of X?
    per_copy = adapter_bytes + (dropout_mask_bytes if lora_dropout > 0 else 0)

    norms = 2 * (4 * T * h + 4 * T + (c * T * h if full else 0))
    attention = c * T * (2 * a.q_dim + 2 * a.kv_dim) + 4 * T * a.num_attention_heads
    mlp = 3 * c * T * i

    inputs = 0
    # (modules sharing one input tensor, is that tensor saved anyway by someone else?)
    groups = [(("q_proj", "k_proj", "v_proj"), False), (("o_proj",), True), (("gate_proj", "up_proj"), False),
              (("down_proj",), False)]
    for names, already_saved in groups:
        d_in = shapes[names[0]][1]
        if own_copy:
            inputs += sum(per_copy * T * d_in for n in names if n in adapted)
            needs_shared = full
        else:
            needs_shared = full or any(n in adapted for n in names)
        if needs_shared and not already_saved:
            inputs += c * T * d_in
    lora = adapter_bytes * T * r * len(adapted)
    return norms + attention + mlp + inputs + lora


def activation_breakdown(config: Any, batch_size: int = 1, seq_len: int = 512, method: str = "qlora",
                         target: Any = "all-linear", r: int = 64, lora_dropout: float = 0.0,
                         compute_bytes: int = 2, dropout_mask_bytes: int = 1,
                         adapter_bytes: int | None = None) -> dict[str, int]:
    """The activation terms of the whole model (bytes), so callers can compose them:

    * "per_layer": one block (`layer_activation_bytes`);
    * "layer_input": a block's input hidden state, cTh - all that gradient checkpointing keeps per block;
    * "head": outside the blocks - the final RMSNorm (4Th + 4T, + cTh when trained), lm_head's input when
      lm_head is trained (cTh), the fp32 log-probabilities of the loss (4TV), the int64 shifted labels (8T)
      plus the loss's 4-byte weight total, and the int64 token ids when the embedding is trained (8T);
    * "rope": the cos and sin tables, (seq_len x head_dim) each in compute dtype, shared by all blocks.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1")
    a = architecture(config)
    T, c, h = batch_size * seq_len, compute_bytes, a.hidden_size
    full = method == "full"
    head = 4 * T * h + 4 * T + 4 * T * a.vocab_size + 8 * T + 4
    if full:
        head += c * T * h + c * T * h + 8 * T  # normalized x for the norm weight, lm_head input, token ids
    return {
        "per_layer": layer_activation_bytes(a, T, method, target, r, lora_dropout, compute_bytes,
                                            dropout_mask_bytes, adapter_bytes),
        "layer_input": c * T * h,
        "head": head,
        "rope": 2 * seq_len * a.d_head * c,
    }


def activation_bytes(config: Any, batch_size: int = 1, seq_len: int = 512, method: str = "qlora",
                     target: Any = "all-linear", r: int = 64, lora_dropout: float = 0.0,
                     gradient_checkpointing: bool = True, compute_bytes: int = 2,
                     dropout_mask_bytes: int = 1, adapter_bytes: int | None = None) -> int:
    """Peak saved-activation bytes.

    Without checkpointing every block keeps its tensors until backward:  L·per_layer + head + rope.
    With checkpointing each block keeps only its input, and during backward one block at a time is recomputed:
    L·layer_input + per_layer + head + rope.
    """
    parts = activation_breakdown(config, batch_size, seq_len, method, target, r, lora_dropout, compute_bytes,
                                 dropout_mask_bytes, adapter_bytes)
    L = architecture(config).num_hidden_layers
    if gradient_checkpointing:
        return L * parts["layer_input"] + parts["per_layer"] + parts["head"] + parts["rope"]
    return L * parts["per_layer"] + parts["head"] + parts["rope"]
