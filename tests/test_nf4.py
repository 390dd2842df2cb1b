"""minilora.nf4 against bitsandbytes 0.50 on CPU: codes, bytes, absmax and dequantized values, bit for bit."""

import subprocess
import sys
import textwrap

import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitwise import bits, bnb_reference_dequantize

from minilora.nf4 import (
    BLOCKSIZES,
    CHUNK_ELEMENTS,
    code_midpoints,
    count_midpoints_below,
    dequantize_4bit,
    dequantize_4bit_reference,
    fp4_code,
    get_code,
    int4_code,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    quantize_4bit_reference,
    unpack_4bit,
)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


def bits_any_zero(t: torch.Tensor) -> torch.Tensor:
    """Like `bits`, but -0.0 and +0.0 count as the same (for FP4's negative-zero pattern, see fp4_code)."""
    return bits(t + 0.0)


def bnb_quantize(x, blocksize, quant_type):
    packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return packed, state


def check_against_bnb(x, blocksize, quant_type):
    """Our bytes, absmax and decoded values equal bitsandbytes' for x (in every output dtype)."""
    packed, absmax = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    bnb_packed, state = bnb_quantize(x, blocksize, quant_type)
    assert packed.shape == ((x.numel() + 1) // 2,) and packed.dtype == torch.uint8
    assert torch.equal(packed, bnb_packed.reshape(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))
    same = bits if quant_type == "nf4" else bits_any_zero
    for dtype in FLOATS:
        state.dtype = dtype
        theirs = bnb_reference_dequantize(bnb_packed, state)  # what bnb means, on any CPU (tests/bitwise.py)
        ours = dequantize_4bit(packed, absmax, x.shape, blocksize, quant_type, dtype)
        assert ours.shape == x.shape and ours.dtype == dtype
        assert torch.equal(same(ours), same(theirs.reshape(x.shape)))
    return packed, absmax


# ----------------------------------------------------------------------------------------------------
# The codes
# ----------------------------------------------------------------------------------------------------


def test_nf4_code_equals_bitsandbytes_table_in_every_bit():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(bits(code), bits(bnb_f.get_4bit_type("nf4", device="cpu")))
    # The asymmetric layout: 7 negative levels, an exact zero at index 7, 8 positive levels, ends at ±1.
    assert code[0].item() == -1.0 and code[7].item() == 0.0 and code[15].item() == 1.0
    assert (code[:7] < 0).all() and (code[8:] > 0).all() and (code.diff() > 0).all()
    assert code[8].item() == pytest.approx(0.0795803, abs=1e-7)
    assert code[1].item() == pytest.approx(-0.6961928, abs=1e-7)


def test_nf4_code_would_be_wrong_with_float32_ndtri():
    # Why nf4_code evaluates the quantiles in float64: in float32 at least one level is off in its last bits.
    p = torch.linspace(0.9677083, 0.5, 9)[:-1]
    assert not torch.equal(torch.special.ndtri(p), torch.special.ndtri(p.double()).float())


def test_fp4_code_matches_bitsandbytes_bit_patterns():
    code, theirs = fp4_code(), bnb_f.get_4bit_type("fp4", device="cpu")
    assert torch.equal(code, theirs)  # as numbers, in bit-pattern order
    assert torch.equal(bits(code)[torch.arange(16) != 8], bits(theirs)[torch.arange(16) != 8])
    assert torch.signbit(code[8]) and code[8] == 0  # pattern 0b1000 is negative zero
    assert (code * 12).tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]


def test_int4_code_is_symmetric_and_evenly_spaced():
    code = int4_code()
    assert (code * 7).tolist() == [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]
    levels = torch.unique(code)
    assert levels.numel() == 15 and torch.allclose(levels.diff(), torch.full((14,), 1 / 7))


def test_code_midpoints_sort_levels_and_map_back_to_patterns():
    midpoints, order = code_midpoints(nf4_code())
    assert torch.equal(order, torch.arange(16))
    assert torch.equal(midpoints, (nf4_code()[:-1] + nf4_code()[1:]) / 2)
    _, order = code_midpoints(fp4_code())
    assert order.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]  # stable: 0 before 8


def test_get_code_rejects_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type.*'af4'"):
        get_code("af4")


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def test_pack_4bit_puts_first_element_in_high_nibble():
    assert pack_4bit(torch.tensor([1, 2, 3, 15, 0, 9])).tolist() == [0x12, 0x3F, 0x09]
    assert pack_4bit(torch.tensor([10, 11, 12])).tolist() == [0xAB, 0xC0]  # odd: padded with 0


def test_unpack_4bit_inverts_pack_4bit():
    q = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_4bit(pack_4bit(q), 1001), q.to(torch.uint8))


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="codes"):
        pack_4bit(torch.tensor([16]))
    with pytest.raises(ValueError, match="codes"):
        pack_4bit(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="packed"):
        unpack_4bit(torch.zeros(3, dtype=torch.uint8), 7)


# ----------------------------------------------------------------------------------------------------
# Quantize / dequantize == bitsandbytes
# ----------------------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (64,), (3, 50), (2, 3, 77), (5, 1000), (130, 64)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_bitsandbytes_on_shapes_and_dtypes(quant_type, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    check_against_bnb(x, 64, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_bitsandbytes_at_every_blocksize(quant_type, blocksize):
    x = torch.randn(3, 5001, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
    packed, absmax = check_against_bnb(x, blocksize, quant_type)
    assert absmax.numel() == -(-15003 // blocksize)


def test_matches_bitsandbytes_across_chunks_with_heavy_tails():
    # Several kernel chunks plus a partial last block; a normal over a uniform gives heavy-tailed outliers.
    g = torch.Generator().manual_seed(1)
    n = CHUNK_ELEMENTS * 2 + 1013
    x = torch.randn(n, generator=g) / torch.rand(n, generator=g)
    check_against_bnb(x.to(torch.bfloat16), 64, "nf4")


def test_all_zero_blocks():
    x = torch.randn(64 * 3 + 10)
    x[64:128] = 0.0  # a full block of zeros: absmax 0, every code is the level 0
    x[64 * 3:] = 0.0  # a partial last block of zeros: bitsandbytes stores absmax 1e-38 there
    for quant_type in ("nf4", "fp4"):
        packed, absmax = check_against_bnb(x, 64, quant_type)
        zero_byte = 0x77 if quant_type == "nf4" else 0x00
        assert absmax[1].item() == 0.0 and absmax[3].item() == pytest.approx(1e-38)
        assert (packed[32:64] == zero_byte).all() and (packed[96:] == zero_byte).all()
        assert (dequantize_4bit(packed, absmax, x.shape, 64, quant_type)[64:128] == 0).all()


def test_odd_length_pads_with_the_code_of_zero():
    x = torch.tensor([1.0, -1.0, 0.5, 0.25, -0.1, 0.0, 0.3])
    packed, _ = check_against_bnb(x, 64, "nf4")
    assert packed[-1].item() & 0x0F == 7  # NF4's zero level is index 7
    packed, _ = check_against_bnb(x, 64, "fp4")
    assert packed[-1].item() & 0x0F == 0


def test_exact_midpoint_ties_go_to_the_lower_level():
    for quant_type in ("nf4", "fp4"):
        midpoints, order = code_midpoints(get_code(quant_type))
        # absmax 2 (a power of two): scaling by 1/2 is exact, so the scaled values ARE the midpoints.
        block = torch.cat([torch.tensor([2.0]), 2 * midpoints, torch.zeros(64 - 16)])
        x = torch.cat([block, block[:40]])  # one full block (reciprocal) and a partial one (division)
        packed, _ = check_against_bnb(x, 64, quant_type)
        q = unpack_4bit(packed, x.numel()).long()
        expected = order[torch.arange(15)]  # midpoint j lies between sorted levels j and j+1: take j
        assert torch.equal(q[1:16], expected) and torch.equal(q[65:80], expected)


def _straddling_value(absmax: float, midpoint: float):
    """A float32 x with x·(1/absmax) and x/absmax on opposite sides of `midpoint` (None if none nearby)."""
    a = torch.tensor(absmax)
    x = (torch.tensor(midpoint, dtype=torch.float64) * absmax).float()
    for _ in range(64):
        by_reciprocal, by_division = (x * (1.0 / a)).item(), (x / a).item()
        if (by_reciprocal > midpoint) != (by_division > midpoint):
            return x
        x = torch.nextafter(x, torch.tensor(float("inf")))
    return None


def test_full_blocks_scale_by_reciprocal_partial_block_by_division():
    # bitsandbytes multiplies full blocks by 1/absmax but divides the last partial block; at a midpoint the
    # two roundings can pick different levels. Find such values and check we follow bitsandbytes in both.
    midpoints, _ = code_midpoints(nf4_code())
    found = 0
    for absmax in (3.0, 5.0, 7.0, 11.0, 13.0, 0.3, 0.7):
        for m in midpoints.tolist():
            x = _straddling_value(absmax, m)
            if x is None:
                continue
            found += 1
            block = torch.cat([torch.tensor([absmax, x.item()]), torch.zeros(62)])
            check_against_bnb(torch.cat([block, block[:2]]), 64, "nf4")  # full block, then partial block
            q = unpack_4bit(quantize_4bit(torch.cat([block, block[:2]]))[0], 66)
            assert q[1] != q[65]  # the same value got different codes under the two rules
    assert found >= 3


def test_dequantized_value_is_the_nearest_level_times_absmax():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for quant_type in ("nf4", "fp4", "int4"):
        packed, absmax = quantize_4bit(x, 64, quant_type)
        xhat = dequantize_4bit(packed, absmax, x.shape, 64, quant_type, torch.float32).double()
        candidates = get_code(quant_type).double()[None, :] * absmax.double().repeat_interleave(64)[:, None]
        best = (candidates - x.double()[:, None]).abs().min(dim=1).values
        assert torch.allclose((xhat - x.double()).abs(), best, rtol=0, atol=1e-6)


def test_reconstruction_error_nf4_beats_int4_and_fp4_on_gaussian_weights():
    # Mean squared error on N(0, 1) weights at blocksize 64. NF4 wins clearly; bitsandbytes' FP4 (E2M1,
    # which spends a level on ±0.0052) is even worse than evenly spaced Int4 on Gaussian data.
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    errors = {}
    for quant_type in ("nf4", "fp4", "int4"):
        xhat = dequantize_4bit(*quantize_4bit(x, 64, quant_type), x.shape, 64, quant_type, torch.float32)
        errors[quant_type] = ((xhat - x) ** 2).mean().item()
    assert errors == pytest.approx({"nf4": 0.008487, "int4": 0.011608, "fp4": 0.014901}, rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# The fast kernels equal the readable references
# ----------------------------------------------------------------------------------------------------


def test_count_midpoints_below_equals_searchsorted_including_ties():
    midpoints, _ = code_midpoints(fp4_code())
    values = torch.cat([torch.rand(10000) * 2 - 1, midpoints, torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    counts = count_midpoints_below(values, midpoints)
    assert torch.equal(counts.long(), torch.searchsorted(midpoints, values))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_chunked_kernels_equal_the_references(quant_type):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(CHUNK_ELEMENTS + 333, generator=g) * torch.rand(CHUNK_ELEMENTS + 333, generator=g) * 3
    x[:100] = 0.0
    x[100:200] = -0.0
    for dtype in (torch.float64, torch.bfloat16):
        xd = x.to(dtype)
        packed, absmax = quantize_4bit(xd, 64, quant_type)
        ref_packed, ref_absmax = quantize_4bit_reference(xd, 64, quant_type)
        assert torch.equal(packed, ref_packed) and torch.equal(bits(absmax), bits(ref_absmax))
        for out in (torch.float32, torch.bfloat16):
            fast = dequantize_4bit(packed, absmax, x.shape, 64, quant_type, out)
            assert torch.equal(bits(fast), bits(dequantize_4bit_reference(packed, absmax, x.shape, 64,
                                                                          quant_type, out)))


def test_quantize_leaves_input_untouched_and_reads_non_contiguous():
    x = torch.randn(64, 130)
    before = x.clone()
    packed, absmax = quantize_4bit(x.t())
    assert torch.equal(x, before)
    assert torch.equal(packed, quantize_4bit(x.t().contiguous())[0])


def test_quantize_needs_little_temporary_memory():
    # Peak resident memory while quantizing a 16 MiB bf16 matrix, measured in a fresh process: the outputs
    # (4.25 MiB) plus a few float32 chunks, well below the matrix itself. (The one-piece reference needs
    # over ten times the matrix.)
    script = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from minilora.nf4 import quantize_4bit
        x = torch.randn(4096, 2048, dtype=torch.bfloat16)
        quantize_4bit(x[:64])  # warm up the allocator and the code tables
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        packed, absmax = quantize_4bit(x)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra = int(run.stdout)
    matrix_bytes = 4096 * 2048 * 2
    assert extra < 0.75 * matrix_bytes


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 64.0, True, "64"])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(128), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_4bit(torch.zeros(64, dtype=torch.uint8), torch.ones(2), (128,), blocksize=blocksize)


@pytest.mark.parametrize(
    "x, pattern",
    [
        (torch.arange(128), "x: expected a floating-point"),
        (torch.tensor([1.0, float("nan")]), "x: contains NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), "x: contains NaN or Inf"),
        (torch.tensor([1e300], dtype=torch.float64), "x: contains NaN or Inf"),
        (torch.zeros(0, 4), "x: cannot quantize an empty"),
        ([1.0, 2.0], "x: expected a torch.Tensor"),
    ],
    ids=["int", "nan", "inf", "float64-overflow", "empty", "list"],
)
def test_rejects_bad_x(x, pattern):
    with pytest.raises(ValueError, match=pattern):
        quantize_4bit(x)
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.numel():
        with pytest.raises(ValueError, match=pattern):  # NaN in any chunk, not only the last
            quantize_4bit(torch.cat([x, torch.zeros(CHUNK_ELEMENTS * 2, dtype=x.dtype)]))


def test_rejects_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="NF4")
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_4bit(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (64,), quant_type="af4")


def test_dequantize_rejects_mismatched_pieces():
    packed, absmax = quantize_4bit(torch.randn(3, 50))
    with pytest.raises(ValueError, match="packed: shape \\(3, 51\\)"):
        dequantize_4bit(packed, absmax, (3, 51))
    with pytest.raises(ValueError, match="absmax"):
        dequantize_4bit(packed, absmax[:2], (3, 50))
    with pytest.raises(ValueError, match="packed: expected a uint8"):
        dequantize_4bit(packed.int(), absmax, (3, 50))
    with pytest.raises(ValueError, match="shape"):
        dequantize_4bit(packed, absmax, (0,))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_4bit(packed, absmax, (3, 50), dtype=torch.int8)
