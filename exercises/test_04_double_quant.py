"""Exercise 4 (Chapter 4, double quantization): tests for exercises/learner/double_quant.py.

    .venv/bin/python -m pytest exercises/test_04_double_quant.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_04_double_quant.py --impl=reference    # the book's solution

The oracle is bitsandbytes' quantize_blockwise (what quantize_4bit(..., compress_statistics=True) runs).
Its CPU kernel rounds through a lookup table that is not always nearest, so codes must agree on at least
99 % and, where they differ, yours must be the nearer level.
"""

import bitsandbytes.functional as bnb_f
import pytest
import torch

from minilora.double_quant import double_dequantize, dynamic_map


@pytest.fixture
def dq(implementation):
    return implementation("double_quant")


def first_level_absmax(n_blocks=3000, seed=0):
    """absmax of n_blocks blocks of 64 weight-like values (as minilora.nf4.quantize_4bit would store)."""
    w = torch.randn(n_blocks, 64, generator=torch.Generator().manual_seed(seed)) * 0.02
    return w.abs().amax(dim=1)


def test_output_types_and_sizes(dq):
    qabsmax, absmax2, offset = dq.double_quantize(first_level_absmax(), blocksize=256)
    assert qabsmax.dtype == torch.uint8 and qabsmax.shape == (3000,)
    assert absmax2.dtype == torch.float32 and absmax2.shape == (12,)  # ceil(3000 / 256): last one partial
    assert offset.dtype == torch.float32 and offset.numel() == 1


def test_offset_and_absmax2_equal_bitsandbytes(dq):
    absmax = first_level_absmax(seed=1)
    _, absmax2, offset = dq.double_quantize(absmax)
    qabsmax, state2 = bnb_f.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert offset.item() == absmax.mean().item()
    assert torch.equal(absmax2, state2.absmax)


def test_codes_agree_with_bitsandbytes_and_are_never_further(dq):
    absmax = first_level_absmax(seed=2)
    qabsmax, absmax2, offset = dq.double_quantize(absmax)
    theirs, _ = bnb_f.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert (qabsmax == theirs).double().mean() >= 0.99
    code, target = dynamic_map().double(), (absmax - offset).double()
    scale = absmax2.double().repeat_interleave(256)[:3000]
    err_ours = (code[qabsmax.long()] * scale - target).abs()
    err_theirs = (code[theirs.long()] * scale - target).abs()
    assert (err_ours <= err_theirs).all()


def test_round_trip_is_within_half_a_map_step(dq):
    absmax = first_level_absmax(seed=3)
    qabsmax, absmax2, offset = dq.double_quantize(absmax)
    error = (double_dequantize(qabsmax, absmax2, offset) - absmax).abs()
    assert (error <= dynamic_map().diff().max() / 2 * absmax2.repeat_interleave(256)[:3000] + 1e-7).all()
    assert (error / absmax).mean() < 0.01
