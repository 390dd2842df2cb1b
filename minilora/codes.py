"""The 16 levels of a 4-bit data type: NF4 from normal quantiles, FP4 (E2M1) and Int4 (QLoRA, 2023, §3).

A 4-bit weight format is two decisions: which 16 values ("levels", together "the code") a weight may take
after it is divided by its block's absmax, and how each weight picks one. This file is the first decision;
minilora/nf4.py is the second (blockwise absmax scaling, nearest level, packing). Pretrained weights are
roughly normal, so NF4 places its levels at quantiles of N(0, 1): every level is used about equally often
(quantile quantization, QLoRA eq. 4). `fp4_code` (a 4-bit float, E2M1) and `int4_code` (evenly spaced
integers) are the two baselines QLoRA compares against. Every level equals bitsandbytes 0.50's to the last
bit (tests/test_nf4.py). It is on the ground floor: it imports nothing of ours.
"""

from __future__ import annotations

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")

# NF4's outermost probability: Φ⁻¹(NF4_OFFSET) ≈ 1.848 becomes the level 1.0. It cannot be 1 (Φ⁻¹(1) = ∞);
# 0.9677083 = ½·[(1 - 1/30) + (1 - 1/32)], halfway between the centre of the last of 15 equal-probability
# slices and that of the last of 16 (see chapters/03-nf4.md).
NF4_OFFSET = 0.9677083


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted ascending; index 7 is exactly 0 (QLoRA §3, "4-bit NormalFloat").

    Asymmetric on purpose: 8 positive quantiles, 7 negative ones and an exact zero (so that zero weights,
    e.g. padding, stay zero). Each half is a set of normal quantiles Φ⁻¹(p) with p evenly spaced from
    NF4_OFFSET down to 0.5 (the p = 0.5 end, Φ⁻¹ = 0, is dropped and replaced by the shared zero):

        positive: Φ⁻¹(linspace(NF4_OFFSET, 0.5, 9)[:-1])      8 levels
        negative: -Φ⁻¹(linspace(NF4_OFFSET, 0.5, 8)[:-1])     7 levels

    then everything is divided by the largest level so the code spans [-1, 1]. To reproduce bitsandbytes'
    table to the last bit, the probabilities are float32 (torch.linspace), Φ⁻¹ runs in float64 (float32
    ndtri is off by a few ulp), and the result is rounded to float32 before sorting and normalising.
    """
    positive_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]
    negative_p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(positive_p.double()).float()
    negative = -torch.special.ndtri(negative_p.double()).float()
    levels = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return levels / levels.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 (E2M1) levels in bitsandbytes' bit-pattern order: code[q] is the value of 4-bit pattern q.

    Bit 3 is the sign, bits 2-1 an exponent e, bit 0 a mantissa bit m. bitsandbytes' FP4 counts its
    exponent downwards: e = 1, 2, 3 give 8, 4, 2 times (1 + m/2), and e = 0 is subnormal (m · 0.0625).
    Magnitudes by pattern 0..7: 0, 0.0625, 8, 12, 4, 6, 2, 3; patterns 8..15 are their negatives. Divided
    by the largest magnitude (12), so the code spans [-1, 1]. Not sorted: use `code_midpoints`, which sorts
    first, to find nearest levels.

    Pattern 8 is negative zero, -0.0. Nearest-level rounding sends values in (0, 0.0026] to it (the
    second of the two equal zeros), and bitsandbytes' native CPU kernel decodes it as -0.0, so we do too.
    (bitsandbytes' Python table `get_4bit_type("fp4")` stores +0.0 there; equal as numbers, and its
    pure-PyTorch fallback returns +0.0.)
    """
    magnitudes = []
    for pattern in range(8):
        exponent, mantissa = pattern >> 1, pattern & 1
        if exponent == 0:
            magnitudes.append(0.0625 * mantissa)
        else:
            magnitudes.append(2.0 ** (4 - exponent) * (1 + mantissa / 2))
    levels = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return levels / levels.abs().max()


def int4_code() -> torch.Tensor:
    """Int4: symmetric, evenly spaced levels k/7 for k = -7..7 (QLoRA eq. 1 with 4 bits: round(7 · x/absmax)).

    15 distinct levels; the 16th bit pattern is a second zero. Laid out sign-magnitude like the int4 list
    in bitsandbytes' `get_4bit_type`: pattern q < 8 is (7 - q)/7, pattern 8 + k is -k/7. bitsandbytes'
    quantize_4bit offers only nf4 and fp4, so Int4 has no oracle; it is here as QLoRA's baseline.
    """
    magnitudes = [float(7 - q) for q in range(8)]  # 7, 6, ..., 1, 0
    levels = torch.tensor(magnitudes + [-float(k) for k in range(8)], dtype=torch.float32)
    levels[8] = 0.0  # -0.0 stored as +0.0
    return levels / 7.0


def get_code(quant_type: str) -> torch.Tensor:
    """The 16 levels of `quant_type` ("nf4", "fp4" or "int4"), indexed by 4-bit pattern."""
    check_quant_type(quant_type)
    return {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}[quant_type]()


def code_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries for nearest-level rounding: (midpoints, order).

    Sort the levels (`order[j]` is the pattern of the j-th smallest level; a stable sort, so of two equal
    levels the lower pattern comes first), then the boundary between neighbours is their float32 midpoint.
    A value v rounds to sorted position j = number of midpoints strictly below v — so an exact tie goes
    to the lower level, as in bitsandbytes — and its 4-bit pattern is order[j].
    """
    order = torch.sort(code, stable=True).indices
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2
    return midpoints, order


def check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
