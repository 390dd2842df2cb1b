"""Exercise 3 (Chapter 3, NF4): tests for exercises/learner/nf4.py.

    .venv/bin/python -m pytest exercises/test_03_nf4.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_03_nf4.py --impl=reference    # the book's solution

The oracle is bitsandbytes (0.50, on CPU): your levels, bytes and decoded values must equal its, bit for bit.
For decoding, the oracle is bitsandbytes' generic PyTorch code, the same on every CPU: its native CPU kernel
differs per CPU, and its AVX-512 loop decodes some shapes wrongly (Chapter 3 explains).
"""

import bitsandbytes.functional as bnb_f
import pytest
import torch


@pytest.fixture
def nf4(implementation):
    return implementation("nf4")


def bits(t):
    return t.contiguous().reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def bnb_generic_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit as its generic path computes it (eagerly), whatever this CPU dispatches."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    code = bnb_f.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), state.absmax, code, state.blocksize,
                                                state.shape, state.dtype)


def weights(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_nf4_code_equals_bitsandbytes_in_every_bit(nf4):
    code = nf4.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(bits(code), bits(bnb_f.get_4bit_type("nf4", device="cpu")))


def test_nf4_code_is_asymmetric_with_an_exact_zero(nf4):
    code = nf4.nf4_code()
    assert code[7].item() == 0.0 and (code[:7] < 0).sum() == 7 and (code[8:] > 0).sum() == 8
    assert code[0].item() == -1.0 and code[15].item() == 1.0


def test_quantize_packs_first_element_in_the_high_nibble(nf4):
    # Levels -1 -> 0, 0 -> 7, +1 -> 15; three values pad to four with the code of 0.
    packed, absmax = nf4.quantize_4bit(torch.tensor([-1.0, 0.0, 1.0]), blocksize=64)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x07, 0xF7]
    assert absmax.tolist() == [1.0]


def test_quantize_matches_bitsandbytes(nf4):
    x = weights((64, 100))
    packed, absmax = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4")
    bnb_packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert packed.shape == (3200,)
    assert torch.equal(packed, bnb_packed.reshape(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_quantize_other_blocksizes_odd_length_and_partial_block(nf4, blocksize):
    x = weights((3, 1001), seed=blocksize)  # 3003 values: odd, and a partial last block
    packed, absmax = nf4.quantize_4bit(x, blocksize=blocksize)
    bnb_packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, bnb_packed.reshape(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))


def test_quantize_exact_ties_go_to_the_lower_level(nf4):
    code = bnb_f.get_4bit_type("nf4", device="cpu")
    midpoints = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.tensor([1.0]), midpoints])  # absmax 1: the scaled values are the midpoints
    packed, _ = nf4.quantize_4bit(x)
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:16]
    assert q.tolist() == [15] + list(range(15))


def test_dequantize_matches_bitsandbytes(nf4):
    x = weights((3, 50), seed=1)  # a partial last block
    bnb_packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    for dtype in (torch.bfloat16, torch.float32):
        state.dtype = dtype
        ours = nf4.dequantize_4bit(bnb_packed.reshape(-1), state.absmax, (3, 50), 64, "nf4", dtype)
        assert ours.shape == (3, 50) and ours.dtype == dtype
        assert torch.equal(bits(ours), bits(bnb_generic_dequantize(bnb_packed, state)))


def test_round_trip_error_is_at_most_half_the_widest_gap(nf4):
    x = weights((32, 256), seed=2).float()
    packed, absmax = nf4.quantize_4bit(x, blocksize=64)
    xhat = nf4.dequantize_4bit(packed, absmax, x.shape, 64, "nf4", torch.float32)
    widest_gap = bnb_f.get_4bit_type("nf4", device="cpu").diff().max()  # 0.277, between -1 and -0.696
    assert ((xhat - x).abs() <= widest_gap / 2 * absmax.repeat_interleave(64).view(x.shape) + 1e-6).all()
