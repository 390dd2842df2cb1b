"""The book's answers to exercise 8 (exercises/learner/interview.py), computed with minilora.

`exercises/test_08_interview.py --impl=reference` loads this file: chapter 8 has no module of its own in the
package, so its reference answers live here. Each answer asks the code of an earlier chapter rather than
repeating a formula, so the self-test and the book cannot drift apart. Where minilora has no code for a method
(rsLoRA, prompt and prefix tuning, IA3, bitsandbytes' paging rule), the answer is Chapter 8's closed form and the
test asks peft or bitsandbytes.
"""

import math

import torch
from torch import nn

import minilora.memory as memory
from minilora.lora import LoRALinear


def lora_parameter_count(d: int, k: int, r: int) -> int:
    """Count the trainable parameters of a real LoRALinear (on the meta device: shapes, no memory)."""
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(k, d, bias=False), r=r)
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


def lora_fraction(d: int, k: int, r: int) -> float:
    return lora_parameter_count(d, k, r) / (d * k)


def bits_per_param(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    return memory.bits_per_parameter(blocksize, double_quant, dq_blocksize)


def dq_saving_bits(blocksize: int = 64, dq_blocksize: int = 256) -> float:
    return (memory.bits_per_parameter(blocksize, double_quant=False)
            - memory.bits_per_parameter(blocksize, double_quant=True, dq_blocksize=dq_blocksize))


def weight_gb(num_params: int, bits: float) -> float:
    return num_params * bits / 8 / memory.GB


def adam_state_bytes_per_param(master_weights: bool = False) -> int:
    return memory.optimizer_state_bytes(1, 0, "paged_adamw", master_weights=master_weights)


def full_finetune_gb(num_params: int, master_weights: bool = True) -> float:
    weights = gradients = 2 * num_params
    state = memory.optimizer_state_bytes(num_params, 0, "paged_adamw", master_weights=master_weights)
    return (weights + gradients + state) / memory.GB


def training_flops_per_token(num_params: int, method: str = "full") -> int:
    return memory.training_flops_per_token(num_params, method, gradient_checkpointing=False)


# --- The PEFT family, LoRA variants and bitsandbytes' rules. minilora has no code for these methods, so the
# answers are the closed forms of Chapter 8; the tests ask peft and bitsandbytes themselves.

def rslora_scaling(lora_alpha: float, r: int) -> float:
    return lora_alpha / math.sqrt(r)


def prompt_tuning_parameter_count(num_virtual_tokens: int, hidden_size: int) -> int:
    return num_virtual_tokens * hidden_size


def prefix_tuning_parameter_count(num_virtual_tokens: int, num_layers: int, hidden_size: int) -> int:
    return 2 * num_virtual_tokens * num_layers * hidden_size


def ia3_parameter_count(num_layers: int, kv_dim: int, intermediate_size: int) -> int:
    return num_layers * (2 * kv_dim + intermediate_size)


def is_paged_by_bitsandbytes(numel: int) -> bool:
    return numel >= 100_000


def adam_8bit_state_bytes(num_params: int) -> int:
    return memory.optimizer_state_bytes(num_params, 1, "adamw_8bit")
