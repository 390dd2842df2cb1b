"""Chapter 4, double quantization: quantizing the quantization constants (QLoRA, Dettmers et al., 2023, §3).

Blockwise 4-bit quantization (chapter 3) keeps one float32 absmax per block of 64 weights: 32/64 = 0.5 bit per
parameter on top of the 4. Double quantization stores those constants in 8 bits instead, themselves quantized
blockwise (256 constants per second-level block) with the "dynamic" 8-bit map:

    offset      = mean(absmax)                                                one float32 per tensor
    absmax2_k   = max_{j in block k} |absmax_j − offset|                      one float32 per 256 constants
    qabsmax_j   = argmin_q | dynamic[q] − (absmax_j − offset) / absmax2_k |  8 bits each
    absmax_j   ≈ dynamic[qabsmax_j] · absmax2_k + offset

At blocksize 64 that is 8/64 + 32/(64·256) = 0.127 bit instead of 0.5: it saves 0.373 bit per parameter.
Subtracting the mean first lets the signed map use both halves (every absmax is positive).

Read first: `dynamic_map`, then `double_quantize` and `double_dequantize`. minilora/double_quant.py builds the
real package on this file (checks, a cached map, the container Linear4bit keeps); tests/test_core.py proves
them equal bit for bit.
"""

from __future__ import annotations

import torch

DQ_BLOCKSIZE = 256  # constants per second-level block, as in QLoRA and bitsandbytes


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 256 float32 levels in [-1, 1], sorted (Dettmers, 2016).

    After the sign bit, the number of leading zero bits picks a decade 10^(i-6), i = 0..6, and the bits after
    the first 1 a fraction with 2^i steps: decade i holds the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times
    10^(i-6), on both signs, plus 0 and 1.0 — fine steps near zero, coarse ones near ±1. Built as bitsandbytes
    builds it (float32 midpoints times a Python-float power of ten), so every level is equal in bits.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2
        decade = 10.0 ** (i - 6)
        levels += [decade * means, -decade * means]
    return torch.cat(levels).sort().values


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """The first-level constants in 8 bits (QLoRA §3, "Double Quantization"): (qabsmax uint8, absmax2 float32 per
    block, offset float32 scalar).

    Nearest is decided exactly (float64 distances, ties to the lower level). bitsandbytes' CPU kernel picks
    codes through a lookup table that is not always nearest; ours are never further from the constants.
    """
    values = absmax.reshape(-1)
    offset = values.mean()
    centered = values - offset
    n = centered.numel()
    blocks = -(-n // blocksize)  # ceil: a last partial block is allowed
    padded = torch.nn.functional.pad(centered, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax2 = padded.abs().amax(dim=1)  # zero padding never raises a block's max
    code = dynamic_map().to(absmax.device).double()
    midpoints = (code[:-1] + code[1:]) / 2  # exact in float64
    scaled = centered.double() / absmax2.double().clamp(min=1e-38).repeat_interleave(blocksize)[:n]
    qabsmax = torch.searchsorted(midpoints, scaled).to(torch.uint8)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """absmax_j = dynamic[qabsmax_j] · absmax2[j // blocksize] + offset, in float32: the inner dequant of QLoRA
    eq. 6, doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)."""
    n = qabsmax.numel()
    levels = dynamic_map().to(qabsmax.device)[qabsmax.reshape(-1).long()]
    return levels * absmax2.reshape(-1).repeat_interleave(blocksize)[:n] + offset
