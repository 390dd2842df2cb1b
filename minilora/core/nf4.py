"""Chapter 3, NF4: 4-bit NormalFloat levels and blockwise 4-bit quantization (QLoRA, Dettmers et al., 2023, §3).

A 4-bit weight format is two decisions: which 16 values ("levels", together "the code") a weight may take after
it is divided by its block's absmax, and how each weight picks one. QLoRA's rule is blockwise absmax scaling
(QLoRA eq. 1, applied per block of `blocksize` consecutive weights):

    absmax_b = max_{i in block b} |W_i|                  one float32 constant per block
    q_i      = argmin_j | code[j] − W_i / absmax_b |     the nearest of the 16 levels, stored in 4 bits
    Ŵ_i      = code[q_i] · absmax_b                      dequantization

Read first: `nf4_code` (the levels), `code_midpoints` (nearest level), `pack_4bit`, then `quantize_4bit` and
`dequantize_4bit`. Every byte equals bitsandbytes 0.50's; minilora/nf4.py runs the same steps in fast kernels,
and tests/test_core.py proves them equal bit for bit.
"""

from __future__ import annotations

import math

import torch

# NF4's outermost probability: Φ⁻¹(NF4_OFFSET) ≈ 1.848 becomes the level 1.0. It cannot be 1 (Φ⁻¹(1) = ∞);
# 0.9677083 = ½·[(1 − 1/30) + (1 − 1/32)], halfway between the centre of the last of 15 equal-probability
# slices and that of the last of 16 (chapters/03-nf4.md).
NF4_OFFSET = 0.9677083


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted ascending; index 7 is exactly 0 (QLoRA §3, eq. 4: quantiles of N(0, 1)).

    Pretrained weights are roughly normal, so levels at normal quantiles are each used about equally often.
    Asymmetric on purpose: 8 positive quantiles, 7 negative ones and an exact zero (zero weights stay zero):

        positive: Φ⁻¹(linspace(NF4_OFFSET, 0.5, 9)[:-1])      8 levels
        negative: -Φ⁻¹(linspace(NF4_OFFSET, 0.5, 8)[:-1])     7 levels

    then everything is divided by the largest level. For bitsandbytes' table to the last bit, the
    probabilities are float32, Φ⁻¹ runs in float64, and the result is rounded to float32 before normalising.
    """
    positive_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]
    negative_p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(positive_p.double()).float()
    negative = -torch.special.ndtri(negative_p.double()).float()
    levels = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return levels / levels.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 (E2M1) levels in bitsandbytes' bit-pattern order: code[q] is the value of pattern q (QLoRA's
    baseline). Bit 3 is the sign, bits 2-1 an exponent e counted downwards (e = 1, 2, 3 give 8, 4, 2 times
    1 + m/2; e = 0 is subnormal, m · 0.0625), bit 0 the mantissa m; divided by 12, the largest magnitude.
    Not sorted: `code_midpoints` sorts. Pattern 8 is -0.0, as bitsandbytes' native CPU kernel decodes it."""
    magnitudes = []
    for pattern in range(8):
        exponent, mantissa = pattern >> 1, pattern & 1
        magnitudes.append(0.0625 * mantissa if exponent == 0 else 2.0 ** (4 - exponent) * (1 + mantissa / 2))
    levels = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return levels / levels.abs().max()


def int4_code() -> torch.Tensor:
    """Int4: evenly spaced levels k/7, k = -7..7 (QLoRA eq. 1 with 4 bits: round(7 · x/absmax)), laid out
    sign-magnitude like bitsandbytes' int4 list: pattern q < 8 is (7 − q)/7, pattern 8 + k is −k/7 (8: +0.0)."""
    levels = torch.tensor([7.0 - q for q in range(8)] + [-float(k) for k in range(8)], dtype=torch.float32)
    levels[8] = 0.0  # -0.0 stored as +0.0
    return levels / 7.0


def get_code(quant_type: str) -> torch.Tensor:
    """The 16 levels of `quant_type` ("nf4", "fp4" or "int4"), indexed by 4-bit pattern."""
    return {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}[quant_type]()


def code_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order): the bounds of nearest-level rounding (the round() of QLoRA eq. 1).

    `order[j]` is the pattern of the j-th smallest level (a stable sort), and the bound between neighbours is
    their float32 midpoint. A value v rounds to sorted position j = the number of midpoints strictly below v,
    so an exact tie goes to the lower level, as in bitsandbytes; its 4-bit pattern is order[j].
    """
    order = torch.sort(code, stable=True).indices
    levels = code[order]
    return (levels[:-1] + levels[1:]) / 2, order


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit patterns (0..15) per byte, the first in the high nibble: byte[k] = q[2k] << 4 | q[2k+1].
    An odd count gets a 0 pattern in the last low nibble; returns a flat uint8 tensor of ceil(n/2) bytes."""
    q = codes.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` 4-bit patterns stored in `packed` (uint8, flat): the inverse of `pack_4bit`."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n]


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization (QLoRA eq. 1 per block): (packed, absmax).

    x: any shape and float dtype, read flat and computed in float32. packed: ceil(n/2) bytes (an odd n is
    padded with the pattern of 0); absmax: float32, one per block, ceil(n / blocksize) of them.
    """
    midpoints, order = code_midpoints(get_code(quant_type).to(x.device))
    values = x.detach().reshape(-1).float()
    n = values.numel()
    full = n - n % blocksize
    # Full blocks: absmax per block, then scale by its reciprocal (multiply, as bitsandbytes does).
    blocks = values[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)]
    if full < n:  # a last partial block: bitsandbytes stores its absmax clamped to 1e-38 and divides
        tail_absmax = values[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled.append(values[full:] / tail_absmax)
    scaled = torch.cat(scaled)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad with the pattern of 0, like bitsandbytes
    # Nearest level: count the midpoints strictly below each value (ties to the lower level), then map the
    # sorted position to its bit pattern. No clamp to [-1, 1] is needed: every midpoint lies inside.
    return pack_4bit(order[torch.searchsorted(midpoints, scaled)]), absmax


def dequantize_4bit(packed, absmax, shape, blocksize: int = 64, quant_type: str = "nf4",
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Ŵ_i = code[q_i] · absmax[i // blocksize] (QLoRA eq. 2 per block), in float32, rounded once to `dtype`."""
    n = math.prod(shape)
    values = get_code(quant_type).to(packed.device)[unpack_4bit(packed, n).long()]
    scale = absmax.reshape(-1).repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)
