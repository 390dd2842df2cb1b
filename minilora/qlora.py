"""QLoRA: a frozen 4-bit base, computation in bf16, and a LoRA bypass on top (Dettmers et al., 2023).

QLoRA fine-tunes a model whose weights are *stored* in 4 bits (NF4, Chapter 3, with double-quantized
constants, Chapter 4) but *computed with* in 16 bits. One layer of a QLoRA model is (QLoRA eq. 5)

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + s · X L1 L2                    L1 L2 = (B A)ᵀ, s = α / r

The first term is this file's `Linear4bit`: it holds only the packed codes and their constants and
dequantizes them to `compute_dtype` inside every forward (and again inside every backward). The second term
is Chapter 1's `minilora.lora.LoRALinear`, which accepts `Linear4bit` as its base because `Linear4bit`
follows that file's base-layer protocol (in_features, out_features, bias, dequantized_weight(dtype)).

Storage dtype vs compute dtype: the storage dtype (4-bit NF4 codes) decides memory; the compute dtype (bf16)
decides the arithmetic. Nothing is ever multiplied in 4 bits.

Reading order: `MatMul4bit` (the autograd Function: what it saves for backward and why), `Linear4bit` (one
layer), `quantize_model` (a whole model, layer by layer) and `prepare_for_kbit_training` (freezing, fp32
norms, gradient checkpointing). A QLoRA model is then

    model = prepare_for_kbit_training(quantize_model(model))
    model = add_lora(model, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear"))

tests/test_qlora.py checks the layer against bitsandbytes' `Linear4bit` with peft's LoRA on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minilora.double_quant import QuantizedWeight
from minilora.frozen_linear import input_gradient
from minilora.lora import replace_module
from minilora.nf4 import check_input, check_quant_options

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# The autograd Function: dequantize in forward, dequantize *again* in backward
# ----------------------------------------------------------------------------------------------------


class MatMul4bit(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = dequantize(W4), saving only the 4-bit W4 for backward.

    Forward decodes the weight to x's dtype, does one matmul and lets the decoded copy go. Backward needs Ŵ
    once more, for the input gradient ∂L/∂x = ∂L/∂y · Ŵ, and decodes it again instead of keeping it: keeping
    it would store 16 bits per weight for every layer until backward, four times the 4-bit model itself.
    (The double-quantized absmax is decoded again too, from 8 bits: keeping it in float32 between forward
    and backward would hold 0.5 bit per weight for every layer, the very cost double quantization removes.)
    No weight gradient is computed (the base is frozen; that is the point of LoRA). A bias gradient is
    computed only if the bias requires one.

    forward(x (..., in), qweight: QuantizedWeight of shape (out, in), bias (out,) or None) -> (..., out)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        weight = qweight.dequantize(x.dtype)  # (out, in), dropped when forward returns
        # The QuantizedWeight object is not a tensor input of the graph: keep it on ctx. It references the
        # layer's existing 4-bit buffers; nothing is copied.
        ctx.qweight = qweight
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the decoded weight may live in a reused buffer
    def backward(ctx, grad_output: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.qweight.dequantize(grad_output.dtype)  # decoded a second time
            grad_x = input_gradient(grad_output, weight)  # minilora.frozen_linear
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, grad_bias


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


def _check_quant_options(blocksize, double_quant, quant_type, compute_dtype) -> None:
    check_quant_options(blocksize, quant_type)  # the one check of the format options, in nf4.py
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got double_quant={double_quant!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, "
                         f"got compute_dtype={compute_dtype!r}")


class Linear4bit(nn.Module):
    """A frozen Linear layer stored in 4 bits: y = x · dequantize(W4)ᵀ + b, computed in `compute_dtype`.

    Built from an nn.Linear, whose weight is quantized once (`QuantizedWeight.from_float`) and then dropped.
    The stored tensors are buffers (`weight_packed`, `weight_absmax` or `weight_qabsmax`, `weight_absmax2`,
    `weight_offset`): they appear in `state_dict()`, move with `.to(device)` and are never parameters, so no
    optimizer can touch them. A `.to(dtype)` on the model moves them but keeps their dtype (a bf16 absmax
    would silently change every weight). The bias stays a (frozen) parameter in its own dtype.

    forward: x is cast to compute_dtype, `MatMul4bit` runs, the result is cast back to x's dtype, exactly
    what bitsandbytes' Linear4bit does, so the output equals F.linear(x, dequantize(W4), b) in compute_dtype.
    """

    def __init__(self, base: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not base.weight.is_floating_point():
            raise TypeError(f"base weight must be a float tensor to quantize, got dtype={base.weight.dtype}")
        _check_quant_options(blocksize, double_quant, quant_type, compute_dtype)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.quant_type = quant_type
        self.compute_dtype = compute_dtype

        qweight = QuantizedWeight.from_float(base.weight.detach(), blocksize=blocksize,
                                             double_quant=double_quant, quant_type=quant_type)
        for name, tensor in qweight.tensors().items():
            self.register_buffer(f"weight_{name}", tensor)
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a `QuantizedWeight` (a view on this layer's buffers, no copy)."""
        return self._quantized_weight(reuse_output=False)

    def _quantized_weight(self, reuse_output: bool) -> QuantizedWeight:
        shape = (self.out_features, self.in_features)
        if self.double_quant:
            return QuantizedWeight(self.weight_packed, shape, self.blocksize, self.quant_type,
                                   qabsmax=self.weight_qabsmax, absmax2=self.weight_absmax2,
                                   offset=self.weight_offset, reuse_output=reuse_output)
        return QuantizedWeight(self.weight_packed, shape, self.blocksize, self.quant_type,
                               absmax=self.weight_absmax, reuse_output=reuse_output)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ of shape (out_features, in_features) in `dtype` (default compute_dtype); LoRA's base protocol."""
        return self.quantized_weight.dequantize(dtype or self.compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes this layer stores: codes + constants (+ bias)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized_weight.nbytes + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"x: Linear4bit expects a floating-point input (it computes in {self.compute_dtype}),"
                            f" got dtype {x.dtype}; integer token ids go through an embedding first")
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        # reuse_output: MatMul4bit reads each decoded weight once, so it may live in a shared buffer.
        return MatMul4bit.apply(x, self._quantized_weight(reuse_output=True), bias).to(input_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(), .cuda(), .half() all end up here. Let them move the 4-bit buffers to another device
        # but never change their dtype: the codes must stay uint8 and the constants float32 (a bf16 absmax
        # would silently change every weight of its block). So keep the old tensor, moved to the new device.
        stored = dict(self.named_buffers(recurse=False))
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}{dq}, "
                f"compute_dtype={self.compute_dtype}")


# ----------------------------------------------------------------------------------------------------
# A whole model
# ----------------------------------------------------------------------------------------------------


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tensor shared by two modules counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.device, tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class QuantizationReport:
    """What `quantize_model` did: how many layers, and the model's bytes before and after."""

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


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _check_quantizable(name: str, weight: torch.Tensor) -> None:
    """What `quantize_4bit` would refuse in this layer's weight, as an error that names the layer."""
    try:
        check_input(weight)  # float dtype, not empty
        if not bool(torch.isfinite(weight.detach().to(torch.float32)).all()):  # as the quantizer sees it
            raise ValueError(f"x: contains NaN or Inf (after conversion to float32), dtype {weight.dtype}")
    except ValueError as err:
        raise ValueError(f"quantize_model: layer {name!r} cannot be quantized ({err}); "
                         f"the model was left unchanged") from err


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                   compute_dtype: torch.dtype = torch.bfloat16, skip=("lm_head",), verbose: bool = False):
    """Replace every nn.Linear of `model` (but those in `skip`) by a `Linear4bit` in place; returns `model`.

    `skip` entries match a module whose full name equals the entry or ends with "." + entry (peft's rule);
    the output head is skipped by default, as in QLoRA: it is small next to the blocks and its error would
    reach every logit. Layers are converted one at a time and each 16/32-bit weight is released as soon
    as its 4-bit copy exists, so memory never holds the whole model twice: the peak is the starting size
    plus one layer's temporaries. All or nothing: every weight is checked first (float, not empty, finite
    in float32), so a bad one raises an error naming its layer before any layer has changed. The byte
    counts before and after are kept in `model.quantization_report` (a `QuantizationReport`) and printed
    if `verbose`.
    """
    _check_quant_options(blocksize, double_quant, quant_type, compute_dtype)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a tuple/list of module names, got skip={skip!r}")
    # Names only: holding the modules themselves in a list would keep every old weight alive to the end.
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not _skipped(name, skip)]
    if not names:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear layer outside "
                         f"skip={skip!r}")
    for name in names:  # all or nothing: find a weight that cannot be quantized before changing any layer
        _check_quantizable(name, model.get_submodule(name).weight)
    bytes_before = model_nbytes(model)
    linear_before = linear_after = 0
    for name in names:
        linear = model.get_submodule(name)
        linear_before += model_nbytes(linear)
        layer = Linear4bit(linear, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                           compute_dtype=compute_dtype)
        linear_after += model_nbytes(layer)
        replace_module(model, name, layer)
        del linear  # the last reference: the high-precision weight is freed here, before the next layer
    model.quantization_report = QuantizationReport(len(names), bytes_before, model_nbytes(model),
                                                   linear_before, linear_after)
    if verbose:
        print(model.quantization_report)
    return model


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True, head_fp32: bool = False,
                              use_reentrant: bool = False) -> nn.Module:
    """Get a quantized model ready for adapter training (in place); returns `model`. Call before add_lora.

    1. Freeze every parameter: the base never trains (add_lora later makes only `lora_` parameters trainable).
    2. Normalization layers to float32: RMSNorm/LayerNorm divide by a small statistic, where bf16's 8 bits of
       mantissa hurt most, and their weights are tiny, so fp32 costs nothing. `head_fp32=True` does the same
       for the output head (fp32 logits; costs vocab × hidden × 2 extra bytes).
    3. Gradient checkpointing (transformers models): keep only each block's input and recompute the block in
       backward. With frozen weights and integer token ids nothing entering a checkpointed block requires a
       gradient, and PyTorch's reentrant checkpoint then returns outputs that do not require grad either
       ("element 0 of tensors does not require grad and does not have a grad_fn"). The cure: a forward hook
       that marks the input embeddings' output as requiring grad, so the graph reaches the LoRA weights.
       `use_reentrant` chooses the checkpoint flavour (False, PyTorch's recommended one, needs no hook, but
       the hook is installed either way so both work).
    4. No KV cache while training (`config.use_cache = False`): it is useless there and conflicts with
       checkpointing.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm")):
            module.float()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head_fp32 and head is None:
        raise ValueError(f"head_fp32=True: {type(model).__name__} has no output head "
                         f"(get_output_embeddings() returned nothing)")
    if head_fp32:
        head.float()
    elif isinstance(head, nn.Linear) and not getattr(head, "_minilora_cast_hook", False):
        # The fp32 final norm now hands the 16-bit head fp32 activations; without autocast F.linear refuses
        # mixed dtypes, so the head casts its input to its own dtype.
        head.register_forward_pre_hook(_cast_input_to_weight_dtype)
        head._minilora_cast_hook = True
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, use_reentrant)
    return model


def _cast_input_to_weight_dtype(module, inputs):
    dtype = module.weight.dtype
    return tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)


def _make_output_require_grad(module, inputs, output):
    output.requires_grad_(True)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on a transformers model's gradient checkpointing (any transformers version), with the hook that
    makes the input embeddings' output require grad (see `prepare_for_kbit_training`)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    kwargs_name = "activation_checkpointing_kwargs"
    if enable is None:
        enable = getattr(model, "gradient_checkpointing_enable", None)  # older transformers
        kwargs_name = "gradient_checkpointing_kwargs"
    if enable is None or not callable(get_embeddings):
        raise ValueError(f"gradient_checkpointing=True needs a transformers model (with "
                         f"gradient_checkpointing_enable and get_input_embeddings); "
                         f"got {type(model).__name__}. Pass gradient_checkpointing=False.")
    if not getattr(model, "_minilora_input_grad_hook", False):
        get_embeddings().register_forward_hook(_make_output_require_grad)
        model._minilora_input_grad_hook = True
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})
