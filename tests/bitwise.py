"""Bit-level equality for float tensors, and bitsandbytes' *reference* decode, shared by the quantization tests.

Why a reference decode: bitsandbytes' CPU backend picks its dequantize kernel by CPU. On CPUs with AVX-512 it
runs a native C kernel (`bitsandbytes/backends/cpu/ops.py`) that decodes some shapes wrongly (REFERENCE.md;
tests/test_bnb_kernels.py shows it); elsewhere it runs its generic PyTorch path
(`bitsandbytes/backends/default/ops.py`), the plain formula `code[nibble] * absmax[i // blocksize]`. Our
bit-exact tests compare with that generic path: it is what bitsandbytes *means*, on every CPU.
"""

import torch
from bitsandbytes.backends.cpu import ops as bnb_cpu_ops
from bitsandbytes.backends.default import ops as bnb_default_ops
from bitsandbytes.backends.utils import _get_4bit_code

# True where bitsandbytes dispatches its native AVX-512 dequantize kernel (the decision it makes at import, from
# torch's CPU capability). With ATEN_CPU_CAPABILITY=default it is False even on an AVX-512 CPU.
BNB_NATIVE_DEQUANTIZE = bnb_cpu_ops._has_avx512


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, flat, so that equality means equality in every bit (incl. -0.0)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.contiguous().reshape(-1).view(ints[t.dtype])


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
