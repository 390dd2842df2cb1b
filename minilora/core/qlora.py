"""Chapter 6, QLoRA: a frozen 4-bit base, computation in 16 bits, a LoRA bypass on top (Dettmers et al., 2023).

The weights are *stored* in 4 bits (NF4 with double-quantized constants, chapters 3 and 4) but *computed with*
in bf16. One layer of a QLoRA model is (QLoRA eq. 5)

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + s · X L1 L2                    L1 L2 = (B A)ᵀ, s = α / r

The first term is `Linear4bit`; the second is chapter 1's LoRALinear with a Linear4bit as its base.

Read first: `MatMul4bit` (what it keeps for backward, and why), then `Linear4bit`, `quantize_model` and
`train_step`. minilora/qlora.py and minilora/loop.py build the real package on this file (options, fast
decode, gradient checkpointing, several processes); tests/test_core.py proves them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minilora.core.double_quant import double_dequantize, double_quantize
from minilora.core.lora import is_target, replace_module
from minilora.core.nf4 import dequantize_4bit, quantize_4bit


class MatMul4bit(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = qweight.dequantize(x.dtype), keeping only the 4-bit qweight for backward (QLoRA §3).

    Backward needs Ŵ once more, for ∂L/∂x = ∂L/∂y · Ŵ, and decodes it again instead of keeping it: keeping it
    would hold 16 bits per weight for every layer until backward, four times the 4-bit model itself. No
    weight gradient: the base is frozen, which is the point of LoRA.

    forward(x (..., in), qweight: anything with dequantize(dtype) -> (out, in), bias (out,) or None) -> (..., out)
    """

    @staticmethod
    def forward(ctx, x, qweight, bias):
        ctx.qweight = qweight  # not a tensor: it holds the 4-bit buffers, nothing is copied
        return F.linear(x, qweight.dequantize(x.dtype), bias)  # the decoded weight is dropped on return

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ ctx.qweight.dequantize(grad_output.dtype)  # decoded a second time
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen Linear layer stored as NF4 codes with double-quantized constants, computed in `compute_dtype`: the
    first term of QLoRA eq. 5.

    The 4-bit tensors are buffers (`weight_packed`, `weight_qabsmax`, `weight_absmax2`, `weight_offset`): they
    move with .to(device) and are no parameters, so no optimizer touches them. The bias stays, frozen.
    """

    def __init__(self, base: nn.Linear, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.blocksize, self.compute_dtype = blocksize, compute_dtype
        packed, absmax = quantize_4bit(base.weight, blocksize, "nf4")
        qabsmax, absmax2, offset = double_quantize(absmax)
        for name, tensor in dict(packed=packed, qabsmax=qabsmax, absmax2=absmax2, offset=offset).items():
            self.register_buffer(f"weight_{name}", tensor)
        bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ = doubleDequant(...): the 8-bit constants decoded first (chapter 4), then the 4-bit codes (chapter 3)."""
        absmax = double_dequantize(self.weight_qabsmax, self.weight_absmax2, self.weight_offset)
        shape = (self.out_features, self.in_features)
        return dequantize_4bit(self.weight_packed, absmax, shape, self.blocksize, "nf4", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return MatMul4bit.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tensor shared by two modules counted once)."""
    tensors = {(t.device, t.data_ptr()): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class QuantizationReport:
    """What `quantize_model` did: how many layers, and the bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int
    linear_bytes_before: int  # the replaced nn.Linear layers alone
    linear_bytes_after: int  # ... and their Linear4bit replacements

    def __str__(self) -> str:
        mb = 2**20
        return (f"quantized {self.layers} Linear layers: {self.linear_bytes_before / mb:.2f} MiB -> "
                f"{self.linear_bytes_after / mb:.2f} MiB; whole model {self.bytes_before / mb:.2f} MiB -> "
                f"{self.bytes_after / mb:.2f} MiB")


def quantize_model(model: nn.Module, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                   skip=("lm_head",)) -> nn.Module:
    """Every nn.Linear but those in `skip` becomes a Linear4bit, in place; the bytes go to
    `model.quantization_report`. The output head is skipped, as in QLoRA: small, and its error reaches
    every logit. One layer at a time, each 16/32-bit weight freed as soon as its 4-bit copy exists: memory
    never holds the whole model twice."""
    # Names only: a list of the modules themselves would keep every old weight alive to the end.
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_target(name, skip)]
    bytes_before, linear_before, linear_after = model_nbytes(model), 0, 0
    for name in names:
        linear = model.get_submodule(name)
        layer = Linear4bit(linear, blocksize, compute_dtype)
        linear_before, linear_after = linear_before + model_nbytes(linear), linear_after + model_nbytes(layer)
        replace_module(model, name, layer)
        del linear  # the last reference: the high-precision weight is freed here, before the next layer
    model.quantization_report = QuantizationReport(len(names), bytes_before, model_nbytes(model),
                                                   linear_before, linear_after)
    return model


def train_step(model: nn.Module, micro_batches: list[dict], optimizer: torch.optim.Optimizer,
               max_grad_norm: float | None = None) -> float:
    """One optimizer step over `micro_batches` (gradient accumulation); returns their mean loss.

    Each micro-batch's loss is divided by their number before backward, so the summed gradients are those of
    the mean; the adapters' gradient norm is clipped to max_grad_norm (QLoRA's recipe: 0.3), then one step.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for batch in micro_batches:
        loss = model(**batch).loss
        (loss / len(micro_batches)).backward()
        total += loss.item()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)
