"""The three 4-bit data types by name: "nf4", "fp4", "int4" (QLoRA, 2023, §3).

Their 16 levels are built in minilora/core/nf4.py (`nf4_code` from normal quantiles, `fp4_code`, `int4_code`);
this file names the choice a user makes and checks it once, where it enters (`get_code`, `check_quant_type`).
It is on the ground floor: it imports only the core.
"""

from __future__ import annotations

import torch

from minilora.core import nf4 as core

QUANT_TYPES = ("nf4", "fp4", "int4")


def get_code(quant_type: str) -> torch.Tensor:
    """The 16 levels of `quant_type` ("nf4", "fp4" or "int4"), indexed by 4-bit pattern (minilora.core.nf4)."""
    check_quant_type(quant_type)
    return core.get_code(quant_type)


def check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
