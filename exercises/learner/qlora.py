"""Exercise 6: the heart of QLoRA yourself (Chapter 6, chapters/06-qlora.md).

This is minilora/core/qlora.py with the bodies of MatMul4bit and quantize_model taken out. Fill in every body
that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_06_qlora.py            # against this file

until everything passes. The book's solution is minilora/core/qlora.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: MatMul4bit (the autograd Function that never keeps a 16-bit weight) and quantize_model.
Given (imported from the core, not part of the exercise): Linear4bit (the layer, which calls the core's own
MatMul4bit), model_nbytes, QuantizationReport, train_step, and replace_module and is_target from chapter 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from minilora.core.lora import is_target, replace_module  # noqa: F401  (given)
from minilora.core.qlora import Linear4bit, QuantizationReport, model_nbytes, train_step  # noqa: F401  (given)


class MatMul4bit(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = qweight.dequantize(x.dtype); saves only the 4-bit qweight for backward.

    forward(x (..., in), qweight: anything with dequantize(dtype) -> (out, in), bias (out,) or None) -> (..., out)
    """

    @staticmethod
    def forward(ctx, x, qweight, bias):
        raise NotImplementedError(
            "hint: decode, F.linear, and keep only the 4-bit object for backward — not the decoded weight "
            "(what would that cost in memory?).")

    @staticmethod
    def backward(ctx, grad_output):
        raise NotImplementedError(
            "hint: one gradient per forward input: (grad_x, None, grad_bias). grad_x needs the weight again: "
            "decode it again. The frozen weight gets no gradient.")


def quantize_model(model: nn.Module, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                   skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) by a Linear4bit, one layer at a time; returns model."""
    raise NotImplementedError(
        "hint: collect the names of the Linear layers to replace first (why names, not modules?), then "
        "swap them one at a time for Linear4bit, counting bytes before and after for model.quantization_report "
        "(a QuantizationReport).")
