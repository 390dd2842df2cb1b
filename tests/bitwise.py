"""Bit-level equality for float tensors, shared by the quantization tests."""

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, flat, so that equality means equality in every bit (incl. -0.0)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.contiguous().reshape(-1).view(ints[t.dtype])
