"""Exercise 3: NF4 levels and blockwise 4-bit quantization (Chapter 3, chapters/03-nf4.md).

This is minilora/core/nf4.py with the bodies taken out. Fill in every body that raises NotImplementedError,
then run

    .venv/bin/python -m pytest exercises/test_03_nf4.py            # against this file

until everything passes. The book's solution is minilora/core/nf4.py; try without it first.

You write: `nf4_code` (the 16 levels, from normal quantiles), `code_midpoints` (nearest-level bounds),
`pack_4bit` / `unpack_4bit` (two codes per byte), `quantize_4bit` (absmax per block, nearest level, packing)
and `dequantize_4bit` (the way back). Only quant_type="nf4" is tested here.
Given (imported from the core): NF4_OFFSET, the baselines fp4_code and int4_code, and get_code. Your bytes are
compared with bitsandbytes', so the details in the hints matter.
"""

from __future__ import annotations

import math  # noqa: F401  (math.prod)

import torch

from minilora.core.nf4 import NF4_OFFSET, fp4_code, get_code, int4_code  # noqa: F401  (given)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted ascending, float32; index 7 is exactly 0."""
    raise NotImplementedError(
        "hint: 8 positive and 7 negative normal quantiles (torch.special.ndtri) at probabilities from "
        "NF4_OFFSET down to 0.5, plus one 0; sort and normalize. Why 8 and 7? For bit-equality see ANSWERS.md.")


def code_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between the sorted levels, order: the pattern of each sorted level)."""
    raise NotImplementedError("hint: a stable sort of the levels, then the midpoint of each neighbouring pair.")


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit patterns per byte, the first element in the HIGH nibble; a flat uint8 tensor of ceil(n/2)."""
    raise NotImplementedError("hint: pad an odd count with one 0, then (q[0::2] << 4) | q[1::2].")


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit patterns stored in packed."""
    raise NotImplementedError("hint: the high nibble first, then the low one; interleave; keep n.")


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed, absmax): packed a flat uint8 tensor of ceil(n/2) bytes, absmax float32, one per block."""
    raise NotImplementedError(
        "hint: absmax per block, scale into [-1, 1], nearest level via the midpoints between sorted levels "
        "(torch.searchsorted), two 4-bit codes per byte with the first element in the HIGH nibble.")


def dequantize_4bit(packed, absmax, shape, blocksize: int = 64, quant_type: str = "nf4",
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Ŵ_i = code[q_i] · absmax[i // blocksize], reshaped to `shape`, in `dtype`."""
    raise NotImplementedError(
        "hint: unpack the nibbles (high first), look the levels up, multiply by each element's block "
        "absmax in float32, and cast to dtype only at the end.")
