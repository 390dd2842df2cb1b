"""The memory model: how many bytes does fine-tuning a Llama-shaped model need, before we buy a GPU?

Chapter 7 derives every number here step by step. The model adds up six kinds of bytes:

    total = base_weights + quant_constants + lora_params + gradients + optimizer_state + activations

* Parameter counts are exact, read off the architecture (q, k, v, o with grouped-query attention, the gated
  MLP's gate, up, down, the embeddings, lm_head, the RMSNorm weights) - `count_parameters` equals
  `sum(p.numel() for p in LlamaForCausalLM(config).parameters())` to the last parameter.
* Optimizer state is the bookkeeping AdamW keeps: two moments per trained parameter (plus a 4-byte step tensor
  per parameter tensor in torch's AdamW), and for full fine-tuning in mixed precision an fp32 master copy.
* Activations are the tensors autograd saves between forward and backward, counted tensor by tensor for a
  Llama block in 16-bit compute (`layer_activation_bytes`); `measure_saved_bytes` counts the same thing on a
  real model.

What the model leaves out, on purpose: the CUDA context and kernels (~0.3-1 GB on a real GPU), allocator
caching and fragmentation, transient buffers that live inside one operation (e.g. the gradient of the logits),
and the tiny per-tensor code tables of the quantizer. Measured peaks on a GPU are therefore a little above
`total`.

Units: everything is in bytes. `GB` is 10**9 bytes and `GiB` is 2**30 bytes; GPU memory is sold in GiB
("a 48 GB card" holds 48 GiB), so capacity checks compare against GiB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GB = 10**9
GiB = 2**30
MB = 10**6
MiB = 2**20

METHODS = ("full", "lora", "qlora", "adalora")
OPTIMIZERS = ("adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS


# ------------------------------------------------------------------------------------------------------------
# 1. The architecture: a handful of integers
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """The integers of a Llama-style decoder that decide its size (names as in transformers' LlamaConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

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
    """(out_features, in_features) of the seven linear layers in one decoder block."""
    a = architecture(config)
    h, i = a.hidden_size, a.intermediate_size
    return {
        "q_proj": (a.q_dim, h), "k_proj": (a.kv_dim, h), "v_proj": (a.kv_dim, h), "o_proj": (h, a.q_dim),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }


def _bias_count(a: Architecture) -> dict[str, int]:
    """Bias entries of each block linear (all zero for Llama, which has no biases)."""
    attn, mlp = a.attention_bias, a.mlp_bias
    return {"q_proj": a.q_dim * attn, "k_proj": a.kv_dim * attn, "v_proj": a.kv_dim * attn,
            "o_proj": a.hidden_size * attn, "gate_proj": a.intermediate_size * mlp,
            "up_proj": a.intermediate_size * mlp, "down_proj": a.hidden_size * mlp}


def count_parameters(config: Any) -> dict[str, int]:
    """Exact parameter count of a Llama-style causal LM, split into the parts the memory model treats
    differently.

    Per block: the seven linears (d_out x d_in each, plus biases if the config has them) and two RMSNorm
    weights (h each). Around the blocks: the token embedding (V x h), the final norm (h) and lm_head (V x h,
    absent when tied to the embedding - tied weights are one tensor and counted once, as `model.parameters()`
    does).

    Returns {"linear": ..., "embedding": ..., "lm_head": ..., "norm": ..., "total": ...}.
    """
    a = architecture(config)
    per_block_linear = sum(o * k for o, k in linear_shapes(a).values()) + sum(_bias_count(a).values())
    linear = a.num_hidden_layers * per_block_linear
    embedding = a.vocab_size * a.hidden_size
    lm_head = 0 if a.tie_word_embeddings else a.vocab_size * a.hidden_size
    norm = (2 * a.num_hidden_layers + 1) * a.hidden_size
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "norm": norm,
            "total": linear + embedding + lm_head + norm}


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
    init_r."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}: the rank must be a positive integer")
    if method not in ("lora", "qlora", "adalora"):
        raise ValueError(f"method={method!r}: adapters exist for 'lora', 'qlora' and 'adalora'")
    a = architecture(config)
    shapes = linear_shapes(a)
    extra = r if method == "adalora" else 0
    per_block = sum(r * (d_in + d_out) + extra for name, (d_out, d_in) in shapes.items()
                    if name in resolve_targets(target))
    return a.num_hidden_layers * per_block


# ------------------------------------------------------------------------------------------------------------
# 3. Bytes of stored weights: 16-bit, or NF4 with its quantization constants
# ------------------------------------------------------------------------------------------------------------

def quant_constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                         dq_blocksize: int = 256) -> int:
    """Bytes of the absmax constants of one 4-bit tensor of `numel` entries.

    Without double quantization: one fp32 absmax per block of `blocksize` -> 4 bytes per block.
    With it (QLoRA §3): each absmax becomes an 8-bit code (1 byte per block), the codes of every
    `dq_blocksize` blocks share one fp32 absmax2 (4 bytes), and the tensor keeps one fp32 offset (the mean
    subtracted first).
    """
    if blocksize < 1 or dq_blocksize < 1:
        raise ValueError(f"blocksize={blocksize}, dq_blocksize={dq_blocksize}: both must be positive")
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * math.ceil(blocks / dq_blocksize) + 4


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    """Storage cost of NF4 per parameter in the limit of large tensors: 4 + 32/blocksize bits without DQ (4.5
    at blocksize 64), 4 + 8/blocksize + 32/(blocksize·dq_blocksize) with DQ (4.127 at 64 and 256)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def quantized_weight_bytes(config: Any, blocksize: int = 64, double_quant: bool = True,
                           dq_blocksize: int = 256) -> tuple[int, int]:
    """(packed 4-bit bytes, constant bytes) for every block linear of the model, tensor by tensor.

    Two 4-bit codes share a byte, so a tensor of n weights packs into ceil(n / 2) bytes.
    """
    a = architecture(config)
    packed = constants = 0
    for d_out, d_in in linear_shapes(a).values():
        n = d_out * d_in
        packed += (n + 1) // 2
        constants += quant_constant_bytes(n, blocksize, double_quant, dq_blocksize)
    return a.num_hidden_layers * packed, a.num_hidden_layers * constants


# ------------------------------------------------------------------------------------------------------------
# 4. Optimizer state
# ------------------------------------------------------------------------------------------------------------

def optimizer_state_bytes(num_params: int, num_tensors: int, optimizer: str = "adamw", param_bytes: int = 4,
                          master_weights: bool = False, block_size_8bit: int = 256) -> int:
    """Bytes an optimizer keeps for `num_params` trained parameters held in `num_tensors` tensors.

    * "adamw" (torch.optim.AdamW): m and v with the dtype of the parameters it updates, and a float32 0-dim
      `step` tensor per parameter tensor:  2·param_bytes·N + 4·num_tensors.
    * "paged_adamw" (bitsandbytes' 32-bit paged AdamW): m and v always fp32, step kept as a Python int: 8·N.
      Paged means the state sits in CUDA unified memory and can be evicted to CPU RAM under pressure - same
      bytes.
    * "adamw_8bit" / "paged_adamw_8bit": m and v as 8-bit codes with one fp32 absmax per block of 256: 2·N +
      8·blocks.
    * "sgd" (no momentum): nothing.
    * master_weights=True (mixed-precision full fine-tuning): the optimizer updates an fp32 master copy (4·N)
      of the 16-bit weights, and its moments are fp32 too: AdamW then keeps 4N + 8N = 12N (the "K = 12" of
      ZeRO).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: allowed {list(OPTIMIZERS)}")
    if num_params < 0 or num_tensors < 0:
        raise ValueError(f"num_params={num_params}, num_tensors={num_tensors}: counts must be >= 0")
    master = 4 * num_params if master_weights else 0
    if optimizer == "sgd":
        return master
    if optimizer == "adamw":
        moment_bytes = 4 if master_weights else param_bytes
        return master + 2 * moment_bytes * num_params + 4 * num_tensors
    if optimizer == "paged_adamw":
        return master + 8 * num_params
    blocks = math.ceil(num_params / block_size_8bit)
    return master + 2 * num_params + 2 * 4 * blocks


# ------------------------------------------------------------------------------------------------------------
# 5. Activations: the tensors autograd saves for backward
# ------------------------------------------------------------------------------------------------------------

def layer_activation_bytes(config: Any, tokens: int, method: str = "qlora", target: Any = "all-linear",
                           r: int = 64, lora_dropout: float = 0.0, compute_bytes: int = 2,
                           dropout_mask_bytes: int = 1, adapter_bytes: int | None = None) -> int:
    """Bytes saved for backward by ONE Llama decoder block over `tokens` = batch x seq tokens (T below).

    Counted tensor by tensor (c = compute_bytes, 2 for bf16; h hidden, i intermediate, q = heads·head_dim,
    kv = kv_heads·head_dim, a = heads):

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
      and the fp32 log-sum-exp per head (4Ta). o_proj's input is the attention output, already saved.
    * the gated MLP saves the gate output (SiLU input), SiLU output and up output: 3cTi; down_proj's input
      (their product, cTi) is saved when down_proj is trained or adapted.

    Full fine-tuning, dropout 0, q = h:  (20h + 4kv + 8i + 4a + 8)·T bytes in bf16.
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


# ------------------------------------------------------------------------------------------------------------
# 6. The report
# ------------------------------------------------------------------------------------------------------------

COMPONENTS = ("base_weights", "quant_constants", "lora_params", "gradients", "optimizer_state", "activations")


@dataclass
class MemoryReport:
    """Bytes per component of one fine-tuning setup; `total` adds the six components (activations as
    configured: with checkpointing when it is on)."""

    model: str
    method: str
    base_weights: int
    quant_constants: int
    lora_params: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_without_checkpointing: int
    num_parameters: int
    num_trainable: int
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    def components(self) -> dict[str, int]:
        """{component: bytes} in the order of the bar chart."""
        return {name: getattr(self, name) for name in COMPONENTS}

    def gb(self, name: str = "total") -> float:
        """A component (or "total") in GB = 1e9 bytes."""
        return getattr(self, name) / GB

    def gib(self, name: str = "total") -> float:
        """A component (or "total") in GiB = 2**30 bytes - the unit GPU memory is sold in."""
        return getattr(self, name) / GiB

    def fits(self, gpu_gib: float) -> bool:
        """Does `total` fit on a GPU of `gpu_gib` GiB (ignoring CUDA context and fragmentation)?"""
        return self.total <= gpu_gib * GiB

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """A Markdown table of the components in MB (1e6 bytes) and GB."""
        rows = ["| component | MB | GB |", "|---|---:|---:|"]
        for name in COMPONENTS + ("total",):
            value = getattr(self, name)
            rows.append(f"| {name} | {value / MB:,.1f} | {value / GB:.2f} |")
        without = self.activations_without_checkpointing
        rows.append(f"| (activations without checkpointing) | {without / MB:,.1f} | {without / GB:.2f} |")
        return "\n".join(rows)


def reports_table(reports: list[MemoryReport]) -> str:
    """Several reports side by side (GB per component), one column per report."""
    header = "| component | " + " | ".join(f"{r.model} {r.method}" for r in reports) + " |"
    rows = [header, "|---|" + "---:|" * len(reports)]
    for name in COMPONENTS + ("total",):
        rows.append(f"| {name} | " + " | ".join(f"{r.gb(name):,.2f}" for r in reports) + " |")
    return "\n".join(rows)


def estimate(model: Any, method: str = "qlora", r: int = 64, target: Any = "all-linear", batch_size: int = 1,
             seq_len: int = 512, gradient_checkpointing: bool = True, optimizer: str = "paged_adamw",
             double_quant: bool = True, blocksize: int = 64, dq_blocksize: int = 256,
             lora_dropout: float = 0.0, weight_bytes: int = 2, adapter_bytes: int = 2, compute_bytes: int = 2,
             dropout_mask_bytes: int = 1, master_weights: bool = True) -> MemoryReport:
    """Predict the memory of fine-tuning `model` (preset name, dict, transformers config) with `method`.

    Assumptions, method by method (N = all parameters, n = adapter parameters):

    * "full": 16-bit weights (weight_bytes·N) and 16-bit gradients (weight_bytes·N); with master_weights=True
      the optimizer updates an fp32 master copy and keeps fp32 m and v, 12·N - together the 2 + 2 + 4 + 4 + 4
      = 16 bytes per parameter of mixed-precision Adam. master_weights=False (pure 16-bit training) leaves 2 +
      2 + 8 = 12.
    * "lora": the base frozen in 16-bit (weight_bytes·N); adapters of adapter_bytes each, their gradients the
      same size, optimizer state for n only.
    * "qlora": every block linear stored as packed NF4 (½ byte per weight) plus absmax constants (with or
      without double quantization); embeddings, lm_head and norms stay 16-bit; compute in 16-bit; adapters as
      in "lora".
    * "adalora": like "lora" with init_r = r triplets per module: r·(d_in + d_out) + r parameters.
    * activations: `activation_bytes` (16-bit compute, memory-efficient attention).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: allowed {list(OPTIMIZERS)}")
    a = architecture(model)
    counts = count_parameters(a)
    N = counts["total"]
    if method == "full":
        base, constants, adapters = weight_bytes * N, 0, 0
        trainable, tensors, trained_bytes = N, count_parameter_tensors(a), weight_bytes
        state = optimizer_state_bytes(N, tensors, optimizer, weight_bytes, master_weights=master_weights)
    else:
        if method == "qlora":
            packed, constants = quantized_weight_bytes(a, blocksize, double_quant, dq_blocksize)
            base = packed + weight_bytes * (N - counts["linear"])
        else:
            base, constants = weight_bytes * N, 0
        trainable = lora_parameter_count(a, r, target, method)
        per_module = 3 if method == "adalora" else 2
        tensors = per_module * len(resolve_targets(target)) * a.num_hidden_layers
        adapters, trained_bytes = adapter_bytes * trainable, adapter_bytes
        state = optimizer_state_bytes(trainable, tensors, optimizer, adapter_bytes)
    gradients = trained_bytes * trainable
    act = dict(config=a, batch_size=batch_size, seq_len=seq_len, method=method, target=target, r=r,
               lora_dropout=lora_dropout, compute_bytes=compute_bytes, dropout_mask_bytes=dropout_mask_bytes,
               adapter_bytes=adapter_bytes)
    return MemoryReport(
        model=model if isinstance(model, str) else "custom",
        method=method,
        base_weights=base,
        quant_constants=constants,
        lora_params=adapters,
        gradients=gradients,
        optimizer_state=state,
        activations=activation_bytes(**act, gradient_checkpointing=gradient_checkpointing),
        activations_without_checkpointing=activation_bytes(**act, gradient_checkpointing=False),
        num_parameters=N,
        num_trainable=trainable,
        settings=dict(r=r, target=target, batch_size=batch_size, seq_len=seq_len,
                      gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                      double_quant=double_quant, blocksize=blocksize, lora_dropout=lora_dropout),
    )


# ------------------------------------------------------------------------------------------------------------
# 7. Throughput: FLOPs per token and model FLOPs utilization
# ------------------------------------------------------------------------------------------------------------

def training_flops_per_token(num_parameters: int, method: str = "qlora",
                             gradient_checkpointing: bool = True) -> int:
    """Matmul FLOPs per trained token, ignoring attention's T² term and the small adapters.

    Forward: 2N (one multiply + one add per weight). Backward: 2N for the input gradients + 2N for the weight
    gradients. Full fine-tuning = 6N. LoRA/QLoRA skip the frozen weights' gradients -> 4N. Checkpointing
    reruns the forward during backward: +2N (so 8N full, 6N LoRA/QLoRA).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    per_param = 6 if method == "full" else 4
    if gradient_checkpointing:
        per_param += 2
    return per_param * num_parameters


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization = achieved useful FLOP/s ÷ the chip's peak FLOP/s (between 0 and 1)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops}: must be positive")
    return tokens_per_second * flops_per_token / peak_flops


def dequant_seconds_lower_bound(config: Any, hbm_bytes_per_second: float, blocksize: int = 64,
                                double_quant: bool = True, compute_bytes: int = 2) -> float:
    """Least time to dequantize every 4-bit block linear once: read the packed codes and constants, write the
    16-bit weights. Dequantization does ~1 FLOP per byte moved, so HBM bandwidth, not arithmetic, sets this
    bound."""
    packed, constants = quantized_weight_bytes(config, blocksize, double_quant)
    written = compute_bytes * count_parameters(config)["linear"]
    return (packed + constants + written) / hbm_bytes_per_second


# ------------------------------------------------------------------------------------------------------------
# 8. Measuring the same quantities on a real model (CPU or GPU)
# ------------------------------------------------------------------------------------------------------------

def measure_saved_bytes(model: torch.nn.Module, **inputs) -> int:
    """Run `model(**inputs)` and count the bytes of every distinct tensor autograd saves for backward.

    A `saved_tensors_hooks` pack hook sees each saved tensor; tensors are deduplicated by their storage (views
    of one tensor are stored once) and the model's own parameters are skipped (they are weights, not
    activations). Deterministic, unlike reading process RSS. Returns the bytes; the forward's output is
    discarded.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def measure_training_bytes(model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held by a model after a training step: frozen / trainable parameters, their gradients and the
    optimizer's state tensors (sum of nbytes; tied parameters once)."""
    params = list(model.parameters())  # yields each tied tensor once
    result = {
        "frozen": sum(p.nbytes for p in params if not p.requires_grad),
        "trainable": sum(p.nbytes for p in params if p.requires_grad),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_state": 0,
    }
    if optimizer is not None:
        result["optimizer_state"] = sum(v.nbytes for state in optimizer.state.values() for v in state.values()
                                        if isinstance(v, torch.Tensor))
    return result
