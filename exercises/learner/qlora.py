"""Exercise 6: the heart of QLoRA yourself (Chapter 6, chapters/06-qlora.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_06_qlora.py            # against this file

until everything passes. The book's solution is minilora/qlora.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: MatMul4bit (the autograd Function that never keeps a 16-bit weight) and quantize_model.
Given (imported from minilora, not part of the exercise): QuantizedWeight (Chapters 3-4), Linear4bit (the
layer that calls minilora's own MatMul4bit), QuantizationReport, model_nbytes and replace_module.
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from minilora.double_quant import QuantizedWeight  # noqa: F401
from minilora.lora import replace_module  # noqa: F401
from minilora.qlora import Linear4bit, QuantizationReport, model_nbytes  # noqa: F401


class MatMul4bit(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = qweight.dequantize(x.dtype); saves only the 4-bit qweight for backward.

    forward(x (..., in), qweight: QuantizedWeight of shape (out, in), bias (out,) or None) -> (..., out)
    """

    @staticmethod
    def forward(ctx, x, qweight, bias):
        raise NotImplementedError(
            "hint: decode the weight with qweight.dequantize(x.dtype), return F.linear(x, weight, bias). For "
            "backward keep only the 4-bit object: ctx.qweight = qweight (NOT the decoded weight and not "
            "ctx.save_for_backward(weight): that would hold 16 bits per weight of every layer until backward).")

    @staticmethod
    def backward(ctx, grad_output):
        raise NotImplementedError(
            "hint: return one gradient per forward input: (grad_x, None, grad_bias). grad_x = grad_output @ Ŵ "
            "where Ŵ is decoded AGAIN from ctx.qweight in grad_output's dtype; compute it only if "
            "ctx.needs_input_grad[0]. The weight gets no gradient (it is frozen). grad_bias (only if "
            "ctx.needs_input_grad[2]) sums grad_output over every dimension but the last.")


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                   compute_dtype: torch.dtype = torch.bfloat16, skip=("lm_head",), verbose: bool = False):
    """Replace every nn.Linear (except names in `skip`) by a Linear4bit, one layer at a time; returns model."""
    raise NotImplementedError(
        "hint: first collect the NAMES (not the modules: a list of modules would keep every old weight alive) "
        "of the nn.Linear layers whose name neither equals an entry of skip nor ends with '.' + entry. Measure "
        "model_nbytes(model). Then for each name: linear = model.get_submodule(name); build Linear4bit(linear, "
        "blocksize=..., double_quant=..., quant_type=..., compute_dtype=...); replace_module(model, name, it); "
        "add model_nbytes of the old and the new layer to two running sums; del linear. Finally set "
        "model.quantization_report = QuantizationReport(layers, bytes_before, model_nbytes(model), "
        "linear_bytes_before, linear_bytes_after) and return model.")
