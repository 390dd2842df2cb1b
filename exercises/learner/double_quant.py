"""Exercise 4: double quantization of the absmax constants (Chapter 4, chapters/04-double-quant.md).

This is minilora/core/double_quant.py with the body of `double_quantize` taken out. Fill it in, then run

    .venv/bin/python -m pytest exercises/test_04_double_quant.py            # against this file

until everything passes. The book's solution is minilora/core/double_quant.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: `double_quantize` (8-bit blockwise quantization of the first-level constants).
Given (imported from the core): `dynamic_map`, bitsandbytes' signed dynamic 8-bit map (256 sorted levels in
[-1, 1]; building it bit-exactly is a detail of Chapter 4, not the idea of double quantization), and
`double_dequantize`, the way back.
"""

from __future__ import annotations

import torch

from minilora.core.double_quant import DQ_BLOCKSIZE, double_dequantize, dynamic_map  # noqa: F401  (given)


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """(qabsmax uint8, absmax2 float32 per block of `blocksize`, offset float32 scalar)."""
    raise NotImplementedError(
        "hint: subtract the mean first (why?), then blockwise absmax quantization of the centred values "
        "with the 256 levels of dynamic_map(), rounding to the nearest level. Return uint8 codes.")
