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
        "hint: 8 positive levels Φ⁻¹(p) for p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], 7 negative levels "
        "-Φ⁻¹(p) for p = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1], and one 0. Φ⁻¹ is torch.special.ndtri; "
        "to match bitsandbytes in every bit keep p float32 but evaluate ndtri in float64 (p.double()), cast "
        "back to float32, then sort and divide by the largest level. Why 8 positive but 7 negative?")


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed, absmax): packed a flat uint8 tensor of ceil(n/2) bytes, absmax float32, one per block."""
    raise NotImplementedError(
        "hint: flatten x and convert to float32. Full blocks of `blocksize`: absmax = max|x| per block, "
        "scaled = x * (1 / absmax.clamp(min=1e-38)) (multiply by the reciprocal, like bitsandbytes). A last "
        "partial block: absmax clamped to 1e-38 is what bitsandbytes stores, and it divides: x / absmax. "
        "Nearest level: the midpoints (code[:-1] + code[1:]) / 2 are the decision boundaries; the index is "
        "the number of midpoints strictly below the value (torch.searchsorted does exactly that; a tie goes "
        "to the lower level). If n is odd, pad one 0.0 (scaled) before looking up levels. Pack two 4-bit "
        "indices per byte, first element in the HIGH nibble: byte[k] = q[2k] << 4 | q[2k+1] (in uint8).")


def dequantize_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16):
    """Ŵ_i = code[q_i] · absmax[i // blocksize], reshaped to `shape`, in `dtype`."""
    raise NotImplementedError(
        "hint: unpack both nibbles (packed >> 4 and packed & 0x0F, interleaved: high nibble first), keep "
        "the first n = prod(shape) indices, look the levels up in nf4_code(), multiply by each element's "
        "block absmax (absmax.repeat_interleave(blocksize)[:n]) in float32, and only then cast to dtype "
        "(rounding once, as bitsandbytes does).")
