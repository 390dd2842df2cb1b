"""y = x W^T + b with W and b frozen: the base layer's matmul, and ∂L/∂x in the layout that is fast here.

Every bypass in this package sits on a frozen base: LoRA (minilora.lora), DoRA (minilora.family) and
AdaLoRA (minilora.svd_adapter) over an `nn.Linear` (through minilora.bypass.LowRankLinear.base_forward), QLoRA
over a 4-bit layer (minilora.qlora). From the base
the backward pass needs one thing only, the input gradient

    ∂L/∂x = ∂L/∂y · W        (..., out) @ (out, in) -> (..., in)

PyTorch's autograd computes it as `grad_output @ weight`. That is the right call on a GPU, in float32 and
float64, and on CPUs with native bf16 matmuls (AVX512-BF16, AMX). On a CPU without them, a bf16 or fp16
matmul in that layout falls to a slow generic kernel, while the same product written as
`F.linear(grad_output, weight.t().contiguous())` runs in the fast one, several times faster even with the
transposed copy (in float64 it is the other way round; benchmarks/MEASUREMENTS.md). Both layouts accumulate in
float32 and round once, so they agree to float32 summation order (tests/test_kernels.py, tests/test_core.py).

In a LoRA step on such a CPU this backward is most of the time: peft's step on a bf16 34M Llama spends
nearly all of it in `aten::mm`, and most of that in this product (chapter 6, "How fast").

Read first: `frozen_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_layout_is_slow(weight: torch.Tensor) -> bool:
    """True where `grad_output @ weight` falls to the slow generic kernel: a bf16/fp16 weight on a CPU
    without native bf16 matmuls (AVX512-BF16 or AMX), outside torch.compile (under inductor on CPU the
    transposed copy gave all-NaN input gradients, issue 12)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling()
            and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def input_gradient(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = ∂L/∂y · W, the same product in the layout that is fast here (see the module docstring)."""
    if plain_layout_is_slow(weight):
        return F.linear(grad_output, weight.t().contiguous())
    return grad_output @ weight


class FrozenLinearFunction(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward gives ∂L/∂x only (weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return input_gradient(grad_output, weight), None, None


def frozen_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x), the same forward numbers; for a frozen plain nn.Linear where the plain layout is slow, with
    its input gradient from `input_gradient`.

    Everything else is simply base(x): a trainable weight or bias (those need autograd's own backward),
    any other layer type, a layer with forward hooks (the shortcut would skip them), or nothing to
    differentiate (no grad mode, or an input that needs no gradient).
    """
    fast = (type(base) is nn.Linear and torch.is_grad_enabled() and x.requires_grad
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and not (base._forward_hooks or base._forward_pre_hooks) and plain_layout_is_slow(base.weight))
    return FrozenLinearFunction.apply(x, base.weight, base.bias) if fast else base(x)
