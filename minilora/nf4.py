"""Blockwise 4-bit quantization for real: minilora/core/nf4.py's quantize_4bit and dequantize_4bit, checked,
and run through fast kernels (chapter 3).

The idea is minilora/core/nf4.py: the 16 levels (NF4 from normal quantiles, FP4, Int4), packing, and the
whole algorithm in a dozen lines (QLoRA eq. 1 per block):

    absmax_b = max_{i in block b} |W_i|,   q_i = argmin_j | code[j] − W_i / absmax_b |,   Ŵ_i = code[q_i] · absmax_b

This file is what the package uses. `quantize_4bit` and `dequantize_4bit` check their arguments once, then run
the same steps through minilora/kernels.py (cache-sized steps, tables built once per device) and, where it
compiles, minilora/native.py's AVX2 decode; tests/test_core.py proves every byte and value equal to the
core's, and tests/test_nf4.py equal to bitsandbytes 0.50. `quantize_4bit_reference` and
`dequantize_4bit_reference` are the core's functions behind the same checks.

Read first: `quantize_4bit`, then `dequantize_4bit`.

Supported: blocksize a power of two from 32 to 4096 (exactly what bitsandbytes accepts), x of dtype
float16, bfloat16, float32 or float64 (computed in float32, as bitsandbytes does), any shape, any length
(a last partial block is allowed; an odd length is padded with one code for 0 in the last byte).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from minilora import native
from minilora.codes import QUANT_TYPES, check_quant_type, get_code
from minilora.core import nf4 as core
from minilora.core.nf4 import NF4_OFFSET, code_midpoints, fp4_code, int4_code, nf4_code  # importable from here
from minilora.kernels import (
    CHUNK_ELEMENTS,  # importable from here: tests size their inputs by it
    all_finite,
    cached,
    count_midpoints_below,
    decode_full_blocks,
    encode_full_blocks,
    scale_blocks,
)

__all__ = ["BLOCKSIZES", "CHUNK_ELEMENTS", "FLOAT_DTYPES", "NF4_OFFSET", "QUANT_TYPES", "Tables",
           "byte_pair_table", "check_blocksize", "check_finite", "check_input", "check_quant_options",
           "check_quant_type", "check_quantize_args", "check_dequantize_args", "code_midpoints", "code_on",
           "dequantize_4bit", "dequantize_4bit_reference", "fp4_code", "get_code", "int4_code", "nf4_code",
           "pack_4bit", "quantize_4bit", "quantize_4bit_reference", "tables", "unpack_4bit"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# The levels as the kernels look them up, built once per device
# ----------------------------------------------------------------------------------------------------


class Tables(NamedTuple):
    """What the fast kernels look up for one quant_type on one device, built once (`tables`)."""

    code: torch.Tensor  # (16,) float32 levels by pattern, get_code(quant_type)
    pair_table: torch.Tensor  # (256,) int64, byte_pair_table(code)
    midpoints: list  # the 15 sorted float32 midpoints as Python floats, code_midpoints(code)[0]
    pattern_of_position: torch.Tensor | None  # (16,) uint8 sorted position -> pattern; None for sorted NF4


def tables(quant_type: str, device) -> Tables:
    """The `Tables` of `quant_type` on `device`, built on first use and cached for the process.

    Rebuilding them per call cost ~0.3 ms per dequantize (ndtri, sort, a 256-entry gather), twice per layer
    and step. Shared: never modify the tensors returned.
    """
    check_quant_type(quant_type)
    device = torch.device(device)

    def build() -> Tables:
        code = get_code(quant_type)
        midpoints, order = code_midpoints(code)
        pattern_of_position = None if quant_type == "nf4" else order.to(torch.uint8).to(device)
        return Tables(code.to(device), byte_pair_table(code).to(device), midpoints.tolist(),
                      pattern_of_position)

    return cached(("nf4.tables", quant_type, device), build)


@torch.compiler.assume_constant_result  # traced: called once, eagerly, and its result embedded as a constant
def code_on(quant_type: str, device) -> torch.Tensor:
    """The cached (16,) float32 levels of `quant_type` on `device` (shared: never modify it).

    Under torch.compile the table must not be rebuilt inside the graph: inductor's linspace is not
    bit-equal to eager's, and every level would move by an ulp.
    """
    return tables(quant_type, device).code


# ----------------------------------------------------------------------------------------------------
# Packing: two 4-bit patterns per byte, the first element in the high nibble
# ----------------------------------------------------------------------------------------------------


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """minilora.core.nf4.pack_4bit (byte[k] = q[2k] << 4 | q[2k+1]), for an integer tensor of patterns 0..15."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor of 4-bit patterns, got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes: 4-bit patterns must be in 0..15, got a maximum of {int(codes.max())}")
    return core.pack_4bit(codes)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """minilora.core.nf4.unpack_4bit: the first `n` 4-bit patterns (uint8, flat) stored in `packed`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected dtype torch.uint8, got {packed.dtype}")
    if n < 0 or (n + 1) // 2 != packed.numel():
        raise ValueError(f"packed: {packed.numel()} bytes cannot hold n={n} 4-bit values "
                         f"(need exactly ceil(n/2) = {(n + 1) // 2})")
    return core.unpack_4bit(packed, n)


# ----------------------------------------------------------------------------------------------------
# Checking inputs
# ----------------------------------------------------------------------------------------------------


def check_quant_options(blocksize, quant_type) -> None:
    """The one check of the format options, used by every module that accepts them."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)


def check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected a power of two from 32 to 4096, one of {BLOCKSIZES}, "
                         f"got {blocksize!r}")


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating-point tensor {FLOAT_DTYPES}, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x: cannot quantize an empty tensor (shape {tuple(x.shape)})")


def check_quantize_args(x, blocksize, quant_type) -> torch.Tensor:
    """Check what quantize_4bit gets; returns x detached (a Parameter is fine: quantizing is not
    differentiable, and no graph is wanted)."""
    check_input(x)
    check_quant_options(blocksize, quant_type)
    return x.detach()


def check_finite(absmax: torch.Tensor) -> None:
    # max|x| over a block is NaN or Inf exactly when the block holds a NaN or an Inf: one cheap test.
    if not bool(all_finite(absmax)):
        raise ValueError("x: contains NaN or Inf (after conversion to float32); cannot quantize")


def check_dequantize_args(packed, absmax, shape, blocksize, quant_type, dtype) -> torch.Size:
    check_quant_options(blocksize, quant_type)
    try:
        shape = torch.Size(shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shape: expected a sequence of ints, got {shape!r}") from err
    n = math.prod(shape)
    if n <= 0:
        raise ValueError(f"shape: expected a non-empty shape, got {tuple(shape)}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed: shape {tuple(shape)} has {n} values, which need {(n + 1) // 2} bytes, "
                         f"got {packed.numel()}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"absmax: expected a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax: {n} values in blocks of {blocksize} need {-(-n // blocksize)} constants, "
                         f"got {absmax.numel()}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    return shape


# ----------------------------------------------------------------------------------------------------
# Quantize: the reference, then the same steps in chunks
# ----------------------------------------------------------------------------------------------------


def quantize_4bit_reference(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """minilora.core.nf4.quantize_4bit, the algorithm in one piece, behind `quantize_4bit`'s checks.

    Same bytes as `quantize_4bit` (tests/test_core.py); uses several float32 copies of x at once.
    """
    packed, absmax = core.quantize_4bit(check_quantize_args(x, blocksize, quant_type), blocksize, quant_type)
    check_finite(absmax)
    return packed, absmax


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization (QLoRA eq. 1 per block): (packed, absmax).

    x: any shape, float16/bfloat16/float32/float64, read flat in row-major order. Each block of `blocksize`
    consecutive values is scaled by 1/absmax of the block and rounded to the nearest level of `quant_type`
    (exact ties to the lower level), exactly as bitsandbytes does on CPU.

    Returns packed, a flat uint8 tensor of ceil(n/2) bytes (two patterns per byte, first element in the high
    nibble; an odd n is padded with the pattern of 0), and absmax, float32, one per block (ceil(n/blocksize);
    a last partial block's absmax is clamped to at least 1e-38, as bitsandbytes stores it).

    The same steps as minilora.core.nf4.quantize_4bit, run by `kernels.encode_full_blocks` over steps of
    CHUNK_ELEMENTS values (so temporary float32 copies stay small: peak extra memory is the outputs plus a
    few chunks, plus one copy of x if x is not contiguous) and with `count_midpoints_below` in place of the
    binary search. tests/test_core.py proves both give the same bytes.
    """
    x = check_quantize_args(x, blocksize, quant_type)
    table = tables(quant_type, x.device)  # tables and outputs live on x's device: CPU or GPU alike
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    encode_full_blocks(flat, full, blocksize, table.midpoints, table.pattern_of_position, packed, absmax)
    if full < n:
        tail = flat[full:].float()  # the core's last partial block: clamped absmax and true division
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        scaled = tail / absmax[-1]
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad with the pattern of 0
        q = count_midpoints_below(scaled, table.midpoints).to(torch.uint8)
        pattern = table.pattern_of_position
        packed[full // 2:] = core.pack_4bit(pattern[q.long()] if pattern is not None else q)
    check_finite(absmax)
    return packed, absmax


# ----------------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------------


def dequantize_4bit_reference(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16):
    """minilora.core.nf4.dequantize_4bit (Ŵ = code[q] · absmax[block] in float32, cast to `dtype`), checked."""
    shape = check_dequantize_args(packed, absmax, shape, blocksize, quant_type, dtype)
    return core.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """256 entries, one per byte value: the float32 levels of its high and low nibble, side by side.

    Each entry's two float32 (8 bytes) are stored as one int64 so that a single 1-D gather moves both;
    viewing the gathered int64 tensor as float32 gives the decoded levels in element order (a pure byte
    copy, so it holds on any endianness).
    """
    patterns = torch.arange(256)
    pairs = torch.stack([code[patterns >> 4], code[patterns & 0x0F]], dim=1).contiguous()  # (256, 2) float32
    return pairs.view(torch.int64).reshape(256)


def dequantize_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16, out=None):
    """Decode `quantize_4bit`'s output: Ŵ_i = code[q_i] · absmax[i // blocksize], reshaped to `shape`.

    The product is formed in float32 and rounded once to `dtype` (bitsandbytes does the same, so results
    are bit-equal). packed may have any shape (e.g. bitsandbytes' (ceil(n/2), 1)); it is read flat. `out`
    (optional): a contiguous tensor of `dtype` with n elements to decode into, instead of a new tensor.

    Eager: `kernels.decode_full_blocks` (one gather per byte through `byte_pair_table`, cache-sized steps,
    cached tables; each step in minilora.native's compiled AVX2 loop where there is one). Under
    torch.compile: the reference formula, which the compiler fuses into one loop (written with
    `kernels.scale_blocks`, which inductor compiles correctly; the NaN check is skipped there, it would
    break the graph: the constants were checked when they were made).
    tests/test_core.py proves both equal minilora.core.nf4.dequantize_4bit bit for bit.
    """
    shape = check_dequantize_args(packed, absmax, shape, blocksize, quant_type, dtype)
    if torch.compiler.is_compiling():  # the core's formula, in blocks (see kernels.scale_blocks)
        values = code_on(quant_type, packed.device)[unpack_4bit(packed, math.prod(shape)).long()]
        return scale_blocks(values, absmax.reshape(-1), blocksize).to(dtype).reshape(shape)
    check_constants_finite(absmax)
    n = math.prod(shape)
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()
                            or out.device != packed.device):
        raise ValueError(f"out: expected a contiguous {dtype} tensor of {n} elements on {packed.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return decode_checked(packed, absmax, shape, blocksize, quant_type, dtype, out)


def check_constants_finite(absmax: torch.Tensor) -> None:
    """ValueError (on a GPU: a device-side assert, no sync per call) if a constant is NaN or Inf, e.g. from a
    corrupted checkpoint: never decode into NaN weights."""
    finite = all_finite(absmax)
    if absmax.device.type != "cpu":
        torch._assert_async(finite, "absmax: contains NaN or Inf")
    elif not bool(finite):
        raise ValueError("absmax: contains NaN or Inf; these constants cannot come from quantize_4bit")


def decode_checked(packed, absmax, shape, blocksize, quant_type, dtype, out=None) -> torch.Tensor:
    """`dequantize_4bit`'s eager decode, for arguments already checked (its own, or a QuantizedWeight's, whose
    pieces were checked when it was made and whose constants are checked as they are decoded)."""
    n = math.prod(shape)
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    table = tables(quant_type, packed.device)  # decode where the bytes are
    flat_bytes, flat_absmax, flat_out = packed.reshape(-1), absmax.reshape(-1), out.view(-1)
    full = n - n % blocksize
    fused = native.fused_decode(table.code, blocksize, flat_out) if flat_bytes.is_contiguous() else None
    decode_full_blocks(flat_bytes, flat_absmax, full, blocksize, table.pair_table, flat_out, fused)
    if full < n:  # a last partial block
        levels = table.pair_table.index_select(0, flat_bytes[full // 2:].long()).view(torch.float32)
        flat_out[full:] = levels[: n - full] * flat_absmax[-1]
    return out.view(shape)
