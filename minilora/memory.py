"""The memory model for real: how many bytes does fine-tuning a Llama-shaped model need, before we buy a GPU?

Read first: `estimate` (chapter 7 derives every number step by step). It adds up seven kinds of bytes:

    total = base_weights + quant_constants + lora_params + gradients + optimizer_state
            + importance_scores + activations

The idea, priced for QLoRA's recipe, is minilora/core/memory.py; this file prices every option (any target,
dtype, optimizer, allocator, blocksize, dropout) and returns a `MemoryReport`. tests/test_core.py proves the two
equal on the core's recipe.

* Parameter counts are exact, read off the architecture (`minilora.architecture`).
* Optimizer state is the bookkeeping AdamW keeps: two moments per trained parameter (plus a 4-byte step tensor
  per parameter tensor in torch's AdamW), and for full fine-tuning in mixed precision an fp32 master copy.
* AdaLoRA's RankAllocator keeps importance scores the size of the adapter between steps (`importance_score_bytes`).
* Activations are the tensors autograd saves between forward and backward, counted tensor by tensor
  (`minilora.activations`); `minilora.measure.measure_saved_bytes` counts the same thing on a real model.

What the model leaves out, on purpose: the CUDA context and kernels (~0.3-1 GB on a real GPU), allocator
caching and fragmentation, transient buffers that live inside one operation (e.g. the gradient of the logits),
and the tiny per-tensor code tables of the quantizer. Measured peaks on a GPU are therefore a little above
`total`. FLOPs per token and MFU, for throughput, close the file.

Units: everything is in bytes. `GB` is 10**9 bytes and `GiB` is 2**30 bytes; GPU memory is sold in GiB
("a 48 GB card" holds 48 GiB), so capacity checks compare against GiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from minilora.activations import activation_bytes
from minilora.architecture import (
    METHODS,
    architecture,
    count_parameter_tensors,
    linear_shapes,
    lora_parameter_count,
    parameter_counts,
    resolve_targets,
)
from minilora.core import memory as core
from minilora.options import TrainConfig
from minilora.peft_layer import autocast_dtype

GB = 10**9
GiB = 2**30
MB = 10**6

OPTIMIZERS = ("adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
ALLOCATORS = ("peft", "minilora")

# ------------------------------------------------------------------------------------------------------------
# 1. Bytes of stored weights: 16-bit, or NF4 with its quantization constants
# ------------------------------------------------------------------------------------------------------------

def quant_constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                         dq_blocksize: int = 256) -> int:
    """Bytes of the absmax constants of one 4-bit tensor of `numel` entries (minilora.core.memory's).

    Without double quantization: one fp32 absmax per block of `blocksize` -> 4 bytes per block.
    With it (QLoRA §3): each absmax becomes an 8-bit code (1 byte per block), the codes of every
    `dq_blocksize` blocks share one fp32 absmax2 (4 bytes), and the tensor keeps one fp32 offset (the mean
    subtracted first).
    """
    if blocksize < 1 or dq_blocksize < 1:
        raise ValueError(f"blocksize={blocksize}, dq_blocksize={dq_blocksize}: both must be positive")
    return core.quant_constant_bytes(numel, blocksize, double_quant, dq_blocksize)


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
# 2. Optimizer state
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
    if optimizer.endswith("8bit"):
        blocks = math.ceil(num_params / block_size_8bit)
        return (4 * num_params if master_weights else 0) + 2 * num_params + 2 * 4 * blocks
    return core.optimizer_state_bytes(num_params, num_tensors, optimizer, param_bytes, master_weights)


# ------------------------------------------------------------------------------------------------------------
# 3. AdaLoRA's importance scores
# ------------------------------------------------------------------------------------------------------------

def importance_score_bytes(num_trainable: int, num_modules: int, r: int, allocator: str = "peft",
                           adapter_bytes: int = 2) -> int:
    """Bytes AdaLoRA's RankAllocator keeps from step to step for its importance scores (AdaLoRA Eqs. 8-9).

    For every element of every P, Λ and Q (all `num_trainable` adapter parameters, Λ included) the allocator
    smooths the sensitivity I = |w · ∂L/∂w| into Ī and its uncertainty into Ū:

    * "peft" (peft's `tuners/adalora/layer.py`, RankAllocator.update_ipt): three tensors shaped and typed like
      each parameter - the latest I, Ī and Ū: 3·adapter_bytes·n.
    * "minilora" (`minilora.adalora.RankAllocator`): Ī and Ū only, in float32 (I lives for one step): 8·n,
      plus the forgotten-call watch, one copy of every Λ (r per module, adapter dtype).

    Not counted: each SVDLinear's `ranknum` and `rank_mask` buffers (4 + r bytes per module, model buffers).
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator={allocator!r}: allowed {list(ALLOCATORS)}")
    if allocator == "peft":
        return 3 * adapter_bytes * num_trainable
    return 2 * 4 * num_trainable + adapter_bytes * r * num_modules

# ------------------------------------------------------------------------------------------------------------
# 4. The report and the estimate
# ------------------------------------------------------------------------------------------------------------

COMPONENTS = ("base_weights", "quant_constants", "lora_params", "gradients", "optimizer_state",
              "importance_scores", "activations")


@dataclass
class MemoryReport:
    """Bytes per component of one fine-tuning setup; `total` adds the seven components (activations as
    configured: with checkpointing when it is on)."""

    model: str
    method: str
    base_weights: int
    quant_constants: int
    lora_params: int
    gradients: int
    optimizer_state: int
    importance_scores: int
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


def frozen_weight_bytes(config: Any, method: str, weight_bytes: int = 2, blocksize: int = 64,
                        double_quant: bool = True, dq_blocksize: int = 256) -> tuple[int, int]:
    """(base weight bytes, quantization-constant bytes): 16-bit everywhere, except that "qlora" stores every
    block linear as packed NF4 plus its absmax constants (embeddings, lm_head and norms stay 16-bit)."""
    a = architecture(config)
    N = parameter_counts(a)["total"]
    if method != "qlora":
        return weight_bytes * N, 0
    packed, constants = quantized_weight_bytes(a, blocksize, double_quant, dq_blocksize)
    return packed + weight_bytes * (N - parameter_counts(a)["linear"]), constants


def trained_bytes(config: Any, method: str, r: int, target: Any, optimizer: str, weight_bytes: int,
                  adapter_bytes: int, master_weights: bool, allocator: str) -> dict[str, int]:
    """Bytes that exist because something trains: the adapter, gradients, optimizer state, AdaLoRA's scores.

    Full fine-tuning trains all N parameters in weight_bytes (the weights themselves are `base_weights`);
    the adapter methods train n adapter parameters of adapter_bytes each, in 2 tensors per adapted module
    (A, B), 3 for AdaLoRA (P, Λ, Q).
    """
    a = architecture(config)
    if method == "full":
        n, tensors = parameter_counts(a)["total"], count_parameter_tensors(a)
        state = optimizer_state_bytes(n, tensors, optimizer, weight_bytes, master_weights=master_weights)
        return dict(lora_params=0, gradients=weight_bytes * n, optimizer_state=state, importance_scores=0,
                    num_trainable=n)
    n = lora_parameter_count(a, r, target, method)
    modules = len(resolve_targets(target)) * a.num_hidden_layers
    tensors = (3 if method == "adalora" else 2) * modules
    scores = importance_score_bytes(n, modules, r, allocator, adapter_bytes) if method == "adalora" else 0
    return dict(lora_params=adapter_bytes * n, gradients=adapter_bytes * n,
                optimizer_state=optimizer_state_bytes(n, tensors, optimizer, adapter_bytes),
                importance_scores=scores, num_trainable=n)


def estimate(model: Any, method: str = "qlora", r: int = 64, target: Any = "all-linear", batch_size: int = 1,
             seq_len: int = 512, gradient_checkpointing: bool = True, optimizer: str = "paged_adamw",
             double_quant: bool = True, blocksize: int = 64, dq_blocksize: int = 256,
             lora_dropout: float = 0.0, weight_bytes: int = 2, adapter_bytes: int = 2, compute_bytes: int = 2,
             dropout_mask_bytes: int = 1, master_weights: bool = True, allocator: str = "peft") -> MemoryReport:
    """Predict the memory of fine-tuning `model` (preset name, dict, transformers config) with `method`.

    Assumptions, method by method (N = all parameters, n = adapter parameters):

    * "full": 16-bit weights (weight_bytes·N) and 16-bit gradients (weight_bytes·N); with master_weights=True
      the optimizer updates an fp32 master copy and keeps fp32 m and v, 12·N - together the 2 + 2 + 4 + 4 + 4
      = 16 bytes per parameter of mixed-precision Adam. master_weights=False (pure 16-bit training) leaves 2 +
      2 + 8 = 12.
    * "lora": the base frozen in 16-bit (weight_bytes·N); adapters of adapter_bytes each, their gradients the
      same size, optimizer state for n only.
    * "qlora": block linears in NF4 (`frozen_weight_bytes`); adapters as in "lora".
    * "adalora": like "lora" with init_r = r triplets per module (r·(d_in + d_out) + r parameters), plus the
      allocator's importance scores (`importance_score_bytes`, peft's allocator by default).
    * activations: `activation_bytes` (16-bit compute, memory-efficient attention).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: allowed {list(OPTIMIZERS)}")
    a = architecture(model)
    base, constants = frozen_weight_bytes(a, method, weight_bytes, blocksize, double_quant, dq_blocksize)
    trained = trained_bytes(a, method, r, target, optimizer, weight_bytes, adapter_bytes, master_weights,
                            allocator)
    act = dict(config=a, batch_size=batch_size, seq_len=seq_len, method=method, target=target, r=r,
               lora_dropout=lora_dropout, compute_bytes=compute_bytes, dropout_mask_bytes=dropout_mask_bytes,
               adapter_bytes=adapter_bytes)
    return MemoryReport(
        model=model if isinstance(model, str) else "custom", method=method,
        base_weights=base, quant_constants=constants, **trained,
        activations=activation_bytes(**act, gradient_checkpointing=gradient_checkpointing),
        activations_without_checkpointing=activation_bytes(**act, gradient_checkpointing=False),
        num_parameters=parameter_counts(a)["total"],
        settings=dict(r=r, target=target, batch_size=batch_size, seq_len=seq_len,
                      gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                      double_quant=double_quant, blocksize=blocksize, lora_dropout=lora_dropout,
                      allocator=allocator),
    )


def adapter_bytes(compute_dtype: torch.dtype = torch.bfloat16, autocast_adapter_dtype: bool = True) -> int:
    """Bytes per adapter parameter (and per entry of its gradient) on a base computing in `compute_dtype`,
    by peft's rule (minilora.peft_layer.autocast_dtype): 4 for float32 adapters on a 16-bit base, peft's and
    minilora's default; the base's 2 with autocast_adapter_dtype=False. `estimate`'s own default, 2, is the
    QLoRA paper's bf16 adapters."""
    return autocast_dtype(compute_dtype, autocast_adapter_dtype).itemsize


def estimate_run(config: TrainConfig, model: Any = None, seq_len: int | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> MemoryReport:
    """`estimate` for a training run's options (minilora.options: a recipe, the command line): its method,
    rank, targets, batch, optimizer, quantization, dropout, and the adapter dtype its
    --autocast-adapter-dtype gives on a `compute_dtype` base (`adapter_bytes`). `model`: the architecture
    when config.model is not a preset name; seq_len: the tokens per sequence (default config.max_seq_len).

    The run keeps the frozen weights in compute_dtype and full fine-tuning's in float32 (no master copy);
    AdaLoRA's scores are minilora's allocator's.
    """
    targets = config.target_modules()
    return estimate(model or config.model, method=config.method, r=config.r,
                    target=targets if isinstance(targets, str) else list(targets), batch_size=config.batch_size,
                    seq_len=seq_len or config.max_seq_len, gradient_checkpointing=config.gradient_checkpointing,
                    optimizer=config.optimizer, double_quant=config.double_quant, blocksize=config.blocksize,
                    lora_dropout=config.lora_dropout,
                    weight_bytes=4 if config.method == "full" else compute_dtype.itemsize,
                    adapter_bytes=adapter_bytes(compute_dtype, config.autocast_adapter_dtype),
                    compute_bytes=compute_dtype.itemsize, master_weights=False, allocator="minilora")


# ------------------------------------------------------------------------------------------------------------
# 5. Throughput: FLOPs per token and model FLOPs utilization
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
    written = compute_bytes * parameter_counts(config)["linear"]
    return (packed + constants + written) / hbm_bytes_per_second
