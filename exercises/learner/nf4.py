"""Exercise 3: NF4 levels and blockwise 4-bit quantization (Chapter 3, chapters/03-nf4.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_03_nf4.py            # against this file

until everything passes. The book's solution is minilora/nf4.py; try without it first.

You write: `nf4_code` (the 16 levels, from normal quantiles), `quantize_4bit` (absmax per block, nearest
level, two codes per byte) and `dequantize_4bit` (the way back). Only quant_type="nf4" is tested here.
Given: NF4_OFFSET. Your bytes are compared with bitsandbytes', so the details in the hints matter.
"""

import torch  # noqa: F401  (everything here is a few torch operations)

NF4_OFFSET = 0.9677083  # the outermost probability: Φ⁻¹(NF4_OFFSET) becomes the level 1.0


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted ascending, float32; index 7 is exactly 0."""
    raise NotImplementedError(
        "hint: 8 positive and 7 negative normal quantiles (torch.special.ndtri) at probabilities from "
        "NF4_OFFSET down to 0.5, plus one 0; sort and normalize. Why 8 and 7? For bit-equality see ANSWERS.md.")


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed, absmax): packed a flat uint8 tensor of ceil(n/2) bytes, absmax float32, one per block."""
    raise NotImplementedError(
        "hint: absmax per block, scale into [-1, 1], nearest level via the midpoints between sorted levels "
        "(torch.searchsorted), two 4-bit codes per byte with the first element in the HIGH nibble.")


def dequantize_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16):
    """Ŵ_i = code[q_i] · absmax[i // blocksize], reshaped to `shape`, in `dtype`."""
    raise NotImplementedError(
        "hint: unpack the nibbles (high first), look the levels up, multiply by each element's block "
        "absmax in float32, and cast to dtype only at the end.")
