"""QLoRA for real: minilora/core/qlora.py's 4-bit layer and quantize_model, with every option, the fast
decode, and what transformers models need for training (Dettmers et al., 2023; chapter 6).

The idea is minilora/core/qlora.py: weights *stored* in 4 bits (NF4 with double-quantized constants), *computed
with* in bf16, and a LoRA bypass on top (QLoRA eq. 5)

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + s · X L1 L2                    L1 L2 = (B A)ᵀ, s = α / r

The autograd Function `MatMul4bit` is the core's, with an input gradient in the layout that is fast here.
`Linear4bit` keeps its weight in a minilora.double_quant.QuantizedWeight (any blocksize, NF4/FP4/Int4, with or
without DQ), decodes it with minilora.nf4's fast kernels into a reused buffer, and follows the base-layer
protocol of minilora.bypass, so that minilora.lora.LoRALinear accepts it as its base. `quantize_model` checks
every weight before changing any layer (all or nothing); `prepare_for_kbit_training` freezes, casts norms to
fp32 and turns on gradient checkpointing. A QLoRA model is then

    model = prepare_for_kbit_training(quantize_model(model))
    model = add_lora(model, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear"))

Read first: `quantize_model`. tests/test_core.py proves MatMul4bit, Linear4bit and quantize_model equal to the
core's; tests/test_qlora.py checks the layer against bitsandbytes' Linear4bit with peft's LoRA on top.
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.checks import check_bool
from minilora.core import qlora as core
from minilora.core.lora import is_target
from minilora.core.qlora import QuantizationReport, model_nbytes  # the core's, used as they are (and importable)
from minilora.double_quant import QuantizedWeight
from minilora.frozen_linear import input_gradient
from minilora.kernels import all_finite
from minilora.lora import replace_module
from minilora.nf4 import check_input, check_quant_options
from minilora.targets import output_head

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# The autograd Function: dequantize in forward, dequantize *again* in backward
# ----------------------------------------------------------------------------------------------------


class MatMul4bit(core.MatMul4bit):
    """minilora.core.qlora.MatMul4bit (y = x Ŵᵀ + b, the 4-bit weight decoded in forward and again in backward,
    nothing 16-bit kept), with the input gradient ∂L/∂y · Ŵ in the layout that is fast on this CPU
    (minilora.frozen_linear). The double-quantized absmax is decoded again too, from 8 bits: keeping it in
    float32 between forward and backward would hold 0.5 bit per weight for every layer, the very cost double
    quantization removes.
    """

    @staticmethod
    @torch.autograd.function.once_differentiable  # the decoded weight may live in a reused buffer
    def backward(ctx, grad_output: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad_output, ctx.qweight.dequantize(grad_output.dtype))  # decoded again
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, grad_bias


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


def check_linear4bit_options(blocksize, double_quant, quant_type, compute_dtype) -> None:
    check_quant_options(blocksize, quant_type)
    check_bool("double_quant", double_quant)
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
        check_linear4bit_options(blocksize, double_quant, quant_type, compute_dtype)
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


def _check_quantizable(name: str, weight: torch.Tensor) -> None:
    """What `quantize_4bit` would refuse in this layer's weight, as an error that names the layer."""
    try:
        check_input(weight)  # float dtype, not empty
        if not bool(all_finite(weight.detach().to(torch.float32))):  # as the quantizer sees it
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
    check_linear4bit_options(blocksize, double_quant, quant_type, compute_dtype)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a tuple/list of module names, got skip={skip!r}")
    # Names only: holding the modules themselves in a list would keep every old weight alive to the end.
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not is_target(name, skip)]
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
    head = output_head(model)
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
