"""minilora.double_quant against bitsandbytes 0.50 (compress_statistics=True) on CPU."""

import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitwise import bits, bnb_reference_absmax, bnb_reference_dequantize
from safetensors.torch import load_file, save_file

from minilora import native
from minilora.double_quant import (
    DQ_BLOCKSIZE,
    QuantizedWeight,
    double_dequantize,
    double_quantize,
    dynamic_map,
    dynamic_map_on,
)
from minilora.kernels import one_intra_op_thread
from minilora.nf4 import dequantize_4bit, quantize_4bit

pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


def weight(rows, cols, seed=0, dtype=torch.bfloat16):
    """A weight-like matrix: N(0, 0.02²) with a few large outliers, as in pretrained linear layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w.view(-1)[torch.randint(0, rows * cols, (rows * cols // 1000,), generator=g)] *= 8
    return w.to(dtype)


@pytest.fixture(scope="module")
def big_weight():
    """A 4096 x 4096 bf16 weight (a 7B model's attention projection) and its 4-bit quantization."""
    w = weight(4096, 4096)
    return w, QuantizedWeight.from_float(w, blocksize=64, double_quant=False)


# ----------------------------------------------------------------------------------------------------
# The dynamic map and the 8-bit quantization of the constants
# ----------------------------------------------------------------------------------------------------


def test_dynamic_map_equals_bitsandbytes_in_every_bit():
    code = dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.equal(bits(code), bits(bnb_f.create_dynamic_map(signed=True)))
    assert code[-1].item() == 1.0 and (code == 0).sum() == 1 and (code.diff() > 0).all()
    assert code[0].item() == pytest.approx(-0.99296875) and code[128].item() == pytest.approx(5.5e-7)


def _compare_with_bnb(absmax):
    """Our double quantization of absmax next to bitsandbytes': (ours, theirs) dicts."""
    ours = dict(zip(("qabsmax", "absmax2", "offset"), double_quantize(absmax)))
    # bitsandbytes' offset is absmax.mean() on all of torch's threads, and a long float32 mean depends on the
    # thread count (chapter 4); ours is taken on one thread, so compare with theirs at one thread.
    with one_intra_op_thread():
        offset = absmax.mean()
    qabsmax, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=DQ_BLOCKSIZE)
    theirs = {"qabsmax": qabsmax, "absmax2": state2.absmax, "offset": offset}
    return ours, theirs


@pytest.mark.parametrize("shape", [(4096, 4096), (300, 333)], ids=str)
def test_double_quantize_agrees_with_bitsandbytes_and_is_never_further(shape, big_weight):
    if shape == (4096, 4096):
        absmax = big_weight[1].absmax
    else:
        _, absmax = quantize_4bit(weight(*shape, seed=1), 64, "nf4")
    ours, theirs = _compare_with_bnb(absmax)
    assert torch.equal(bits(ours["offset"].reshape(1)), bits(theirs["offset"].reshape(1)))
    assert torch.equal(bits(ours["absmax2"]), bits(theirs["absmax2"]))  # incl. a partial last block
    assert ours["absmax2"].numel() == -(-absmax.numel() // 256)

    agree = (ours["qabsmax"] == theirs["qabsmax"]).double().mean().item()
    assert agree >= 0.99
    # Where we differ, our code decodes closer to the centred constant (exact float64 distances).
    code = dynamic_map().double()
    target = (absmax - ours["offset"]).double()
    scale = ours["absmax2"].double().repeat_interleave(DQ_BLOCKSIZE)[: absmax.numel()]
    err_ours = (code[ours["qabsmax"].long()] * scale - target).abs()
    err_theirs = (code[theirs["qabsmax"].long()] * scale - target).abs()
    assert (err_ours <= err_theirs).all()
    if agree < 1:
        differ = ours["qabsmax"] != theirs["qabsmax"]
        assert (err_ours[differ] < err_theirs[differ]).double().mean() > 0.99


def test_double_dequantize_equals_bitsandbytes_nested_decode():
    _, absmax = quantize_4bit(weight(512, 1000, seed=2), 64, "nf4")
    offset = absmax.mean()
    qabsmax, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=DQ_BLOCKSIZE)
    # bitsandbytes' generic decode (tests/bitwise.py), the same code on every CPU
    state = bnb_f.QuantState(absmax=qabsmax, shape=absmax.shape, code=bnb_f.get_4bit_type("nf4", device="cpu"),
                             blocksize=64, quant_type="nf4", dtype=torch.float32, offset=offset, state2=state2)
    theirs = bnb_reference_absmax(state)
    assert torch.equal(bits(double_dequantize(qabsmax, state2.absmax, offset)), bits(theirs))


def test_double_quantization_error_is_within_half_a_map_step():
    _, absmax = quantize_4bit(weight(1024, 1024, seed=3), 64, "nf4")
    qabsmax, absmax2, offset = double_quantize(absmax)
    error = (double_dequantize(qabsmax, absmax2, offset) - absmax).abs()
    widest_step = dynamic_map().diff().max()  # 0.0141, between the levels nearest ±1
    assert (error <= widest_step / 2 * absmax2.repeat_interleave(DQ_BLOCKSIZE) + 1e-7).all()
    assert (error / absmax).mean().item() == pytest.approx(0.00349, rel=0.01)  # 0.35 % on average


def test_double_quantize_constant_block_and_partial_block():
    absmax = torch.full((300,), 0.25)
    qabsmax, absmax2, offset = double_quantize(absmax)
    assert offset.item() == 0.25 and absmax2.tolist() == [0.0, 0.0]
    assert torch.equal(double_dequantize(qabsmax, absmax2, offset), absmax)


def test_double_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="absmax: expected a float32"):
        double_quantize(torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="absmax: cannot"):
        double_quantize(torch.ones(0))
    with pytest.raises(ValueError, match="absmax: contains NaN"):
        double_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="blocksize"):
        double_quantize(torch.ones(10), blocksize=0)
    with pytest.raises(ValueError, match="absmax2"):
        double_dequantize(torch.zeros(300, dtype=torch.uint8), torch.ones(1), torch.tensor(0.0))
    with pytest.raises(ValueError, match="qabsmax"):
        double_dequantize(torch.zeros(3), torch.ones(1), torch.tensor(0.0))


# ----------------------------------------------------------------------------------------------------
# QuantizedWeight: storage cost, round trips, interop
# ----------------------------------------------------------------------------------------------------


def test_bits_per_param_on_a_real_size_matrix(big_weight):
    w, plain = big_weight
    n = w.numel()
    assert plain.nbytes == n // 2 + 4 * (n // 64)
    assert plain.bits_per_param == 4.5
    qabsmax, absmax2, offset = double_quantize(plain.absmax)  # what from_float(double_quant=True) does
    nested = QuantizedWeight(plain.packed, w.shape, 64, "nf4", qabsmax=qabsmax, absmax2=absmax2,
                             offset=offset)
    assert nested.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert nested.bits_per_param == pytest.approx(4.127, abs=0.001)
    assert nested.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert plain.bits_per_param - nested.bits_per_param == pytest.approx(0.373, abs=0.001)


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_float_matches_bitsandbytes_quantize_4bit(double_quant):
    w = weight(300, 334, seed=4)
    qw = QuantizedWeight.from_float(w, blocksize=64, double_quant=double_quant, quant_type="nf4")
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert qw.shape == w.shape and torch.equal(qw.packed, packed.reshape(-1))
    if not double_quant:
        assert torch.equal(bits(qw.absmax), bits(state.absmax)) and qw.qabsmax is None
        assert torch.equal(bits(qw.dequantize(torch.bfloat16)), bits(bnb_reference_dequantize(packed, state)))
    else:
        assert qw.absmax is None
        assert torch.equal(bits(qw.absmax2), bits(state.state2.absmax))
        assert torch.equal(bits(qw.offset.reshape(1)), bits(state.offset.reshape(1)))
        assert (qw.qabsmax == state.absmax).double().mean() >= 0.99


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(256, 512), (3, 5, 77)], ids=str)
def test_bitsandbytes_decodes_our_tensors_to_exactly_our_result(quant_type, double_quant, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    qw = QuantizedWeight.from_float(w, blocksize=64, double_quant=double_quant, quant_type=quant_type)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        packed, state = qw.to_bnb(dtype)
        theirs = bnb_reference_dequantize(packed, state)  # what bnb means, on any CPU (tests/bitwise.py)
        ours = qw.dequantize(dtype)
        assert theirs.shape == ours.shape == shape and theirs.dtype == dtype
        if quant_type == "fp4":  # bitsandbytes' fallback (odd last dim) writes FP4's -0.0 as +0.0
            ours, theirs = ours + 0.0, theirs + 0.0
        assert torch.equal(bits(ours), bits(theirs))


def test_dequantize_uses_the_double_dequantized_constants():
    w = weight(64, 640, seed=6)
    qw = QuantizedWeight.from_float(w, double_quant=True)
    absmax = double_dequantize(qw.qabsmax, qw.absmax2, qw.offset)
    assert torch.equal(bits(qw.block_absmax()), bits(absmax))
    expected = dequantize_4bit(qw.packed, absmax, w.shape, 64, "nf4", torch.float32)
    assert torch.equal(bits(qw.dequantize(torch.float32)), bits(expected))
    # Close to the weight: at most half the widest NF4 gap (0.16) times a block's absmax, plus DQ's error.
    assert (qw.dequantize(torch.float32) - w.float()).abs().max() < 0.1 * w.float().abs().max()


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_safetensors(double_quant, tmp_path):
    w = weight(96, 200, seed=7)
    qw = QuantizedWeight.from_float(w, blocksize=128, double_quant=double_quant, quant_type="fp4")
    sd = qw.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    expected_keys = {"packed", "shape", "blocksize", "quant_type"} | (
        {"qabsmax", "absmax2", "offset"} if double_quant else {"absmax"})
    assert set(sd) == expected_keys
    save_file(sd, tmp_path / "w.safetensors")
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "w.safetensors"))
    assert (back.shape, back.blocksize, back.quant_type) == (w.shape, 128, "fp4")
    assert back.double_quant == double_quant
    assert back.nbytes == qw.nbytes
    for name, tensor in qw.tensors().items():
        assert torch.equal(getattr(back, name), tensor)
    assert torch.equal(bits(back.dequantize()), bits(qw.dequantize()))


def test_from_state_dict_refuses_wrong_keys():
    sd = QuantizedWeight.from_float(weight(64, 64), double_quant=True).state_dict()
    with pytest.raises(ValueError, match="sd: expected keys"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "absmax2"})
    with pytest.raises(ValueError, match="sd: expected keys"):
        QuantizedWeight.from_state_dict({**sd, "absmax": torch.ones(64)})
    with pytest.raises(ValueError, match="quant_type"):
        QuantizedWeight.from_state_dict({**sd, "quant_type": torch.tensor(list(b"nf5"), dtype=torch.uint8)})


def test_quantized_weight_rejects_bad_input():
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        QuantizedWeight.from_float(torch.ones(64, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        QuantizedWeight.from_float(torch.ones(64, 64), blocksize=100)
    qw = QuantizedWeight.from_float(torch.randn(64, 64), double_quant=False)
    with pytest.raises(ValueError, match="packed"):
        QuantizedWeight(qw.packed[:-1], (64, 64), absmax=qw.absmax)
    with pytest.raises(ValueError, match="absmax"):
        QuantizedWeight(qw.packed, (64, 64), absmax=qw.absmax[:-1])
    with pytest.raises(ValueError, match="absmax: give either"):
        QuantizedWeight(qw.packed, (64, 64), absmax=qw.absmax, qabsmax=torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="quant_type.*int4"):
        QuantizedWeight.from_float(torch.randn(64, 64), quant_type="int4").to_bnb()


def test_quantized_weight_refuses_pieces_its_decode_would_misread():
    """dequantize decodes the stored pieces unchecked (the compiled loop reads raw memory by their counts and
    dtypes), so the constructor refuses every piece of the wrong dtype or size: 300 x 300 at blocksize 64 has
    1,407 blocks, and so 6 second-level constants."""
    nested = QuantizedWeight.from_float(torch.randn(300, 300))
    plain = QuantizedWeight.from_float(torch.randn(300, 300), double_quant=False)
    pieces = {"packed": nested.packed, "shape": (300, 300), "qabsmax": nested.qabsmax,
              "absmax2": nested.absmax2, "offset": nested.offset}
    assert nested.absmax2.numel() == 6
    for name, bad, message in [("absmax2", nested.absmax2[:1], "absmax2: 1407 constants .* need 6 .* got 1 "),
                               ("absmax2", nested.absmax2.double(), "absmax2: .* got 6 of torch.float64"),
                               ("qabsmax", nested.qabsmax.float(), "qabsmax: .* got 1407 of torch.float32"),
                               ("offset", nested.offset.repeat(2), "offset: expected one torch.float32 value")]:
        with pytest.raises(ValueError, match=message):
            QuantizedWeight(**{**pieces, name: bad})
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(ValueError, match=f"absmax: .* got 1407 of {dtype}"):
            QuantizedWeight(plain.packed, (300, 300), absmax=plain.absmax.to(dtype))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        plain.dequantize(torch.int8)
    # and the compiled constants' decode, called directly with too few second-level constants, declines
    levels = dynamic_map_on(torch.device("cpu"))
    assert native.decode_constants(nested.qabsmax, nested.absmax2[:1], nested.offset, levels, 256) is None


def test_double_quantize_is_the_same_on_any_number_of_threads():
    """ATen splits a long float32 sum among its threads, in pieces that depend on the thread count: the offset
    (a mean) of an 11008 x 4096 weight's 704,512 constants differed in its last bit between 1 and 2 threads, and
    with it some codes. double_quantize takes the mean on one thread, so its bytes are the same everywhere."""
    absmax = torch.rand(704_512, generator=torch.Generator().manual_seed(7)) * 0.1
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            results.append(double_quantize(absmax))
    finally:
        torch.set_num_threads(threads)
    for qabsmax, absmax2, offset in results[1:]:
        assert torch.equal(qabsmax, results[0][0])
        assert torch.equal(bits(offset.reshape(1)), bits(results[0][2].reshape(1)))
        assert torch.equal(bits(absmax2), bits(results[0][1]))
