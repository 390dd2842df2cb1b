"""Bit-level equality for float tensors, bitsandbytes' *reference* decode, its Linear4bit holding our bytes, and
the bf16 matmul error bound: shared by the quantization tests.

Why a reference decode: on CPU, bitsandbytes 0.50 decodes with native C code (`bitsandbytes/backends/cpu/ops.py`),
which picks its own branch from the CPU's flags: an AVX-512 loop that decodes some shapes wrongly, or a scalar
loop (tests/test_bnb_kernels.py says which runs where). Its generic PyTorch path
(`bitsandbytes/backends/default/ops.py`) is the plain formula `code[nibble] * absmax[i // blocksize]`, the same
code on every CPU. Every bit-exact test that decides whether *minilora* is right compares with that generic path:
it is what bitsandbytes *means*, on every CPU.
"""

import bitsandbytes as bnb
import torch
from bitsandbytes.backends.default import ops as bnb_default_ops
from bitsandbytes.backends.utils import _get_4bit_code
from torch import nn

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: unit roundoff 2^-8, one ulp at most 2^-7 relative


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, flat, so that equality means equality in every bit (incl. -0.0 and NaN
    payloads); any other tensor flat as it is."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(ints[t.dtype]) if t.dtype in ints else flat


def bnb_reference_absmax(state) -> torch.Tensor:
    """The float32 absmax a QuantState stands for: itself, or (double quantization) decoded by bitsandbytes'
    generic blockwise path, `code[q] * absmax2[i // 256] + offset`, in float32 as bitsandbytes does."""
    if not state.nested:
        return state.absmax
    decode = bnb_default_ops._dequantize_blockwise_compute.__wrapped__  # eager: the same code, not compiled
    s2 = state.state2
    absmax = decode(state.absmax.reshape(-1), s2.absmax, s2.code, s2.blocksize, torch.float32)
    return absmax + state.offset


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit as its generic path computes it, whatever kernel this CPU dispatches."""
    decode = bnb_default_ops._dequantize_4bit_compute.__wrapped__  # eager: the same code, not compiled
    code = _get_4bit_code(state.quant_type, packed.device)
    return decode(packed.reshape(-1).view(torch.uint8), bnb_reference_absmax(state), code, state.blocksize,
                  state.shape, state.dtype)


def bf16_matmul_bound(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |y1 - y2| for two bf16 computations of y = a @ b that may differ in kernel.

    Per term a_k b_k: a weight decoded with a bf16-rounded absmax (bitsandbytes' AVX512-BF16 gemv) or rounded
    to bf16 once more is off by at most 2 bf16 roundoffs, 2 * 2^-8 relative. The K-term fp32 sum in another
    order adds at most K * 2^-24 relative to sum_k |a_k b_k| (the standard gamma_K bound). Each result is
    rounded to bf16 once: at most one ulp, 2^-7 |y|, apart. So |y1 - y2| <= (2^-7 + K 2^-24) (|a| @ |b|) + 2^-7 |y|.
    """
    k = a.shape[-1]
    return (2 * BF16_EPS + k * 2.0**-24) * (a.abs() @ b.abs()) + 2 * BF16_EPS * exact.abs()


def bnb_layer(ours, fused: bool = False) -> bnb.nn.Linear4bit:
    """bitsandbytes' Linear4bit holding exactly the bytes (and bias) of our Linear4bit `ours`, compute dtype bf16.

    `fused=False` switches off its AVX512-BF16 inference path (the instance flag `support_avx512bf16_for_cpu`, which
    bitsandbytes sets from its native library's `has_avx512bf16()`), so that the layer runs the same unfused path,
    dequantize then matmul, on every CPU. `fused=True` keeps what bitsandbytes chose on this CPU.
    """
    packed, state = ours.quantized_weight.to_bnb()
    layer = bnb.nn.Linear4bit(ours.in_features, ours.out_features, bias=ours.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type=ours.quant_type,
                              compress_statistics=ours.double_quant)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=ours.blocksize,
                                     compress_statistics=ours.double_quant, quant_type=ours.quant_type,
                                     bnb_quantized=True, module=layer)
    if ours.bias is not None:
        layer.bias = nn.Parameter(ours.bias.detach().clone(), requires_grad=False)
    if not fused:
        layer.support_avx512bf16_for_cpu = False
    return layer
