"""Double quantization: quantizing the quantization constants (Dettmers et al., QLoRA, 2023, §3).

Blockwise 4-bit quantization (minilora.nf4) stores one float32 absmax per block of 64 weights, which costs
32/64 = 0.5 bit per parameter on top of the 4 bits. Double quantization (DQ) stores those constants in 8 bits
instead, themselves quantized blockwise (256 constants per second-level block) with the "dynamic" 8-bit map:

    offset      = mean(absmax)                       one float32 for the whole tensor
    absmax2_k   = max_{j in block k} |absmax_j - offset|     one float32 per 256 constants
    qabsmax_j   = argmin_q | dynamic[q] - (absmax_j - offset) / absmax2_k |     8 bits each
    absmax_j   ≈ dynamic[qabsmax_j] · absmax2_k + offset

Cost per parameter at blocksize 64: 8/64 + 32/(64·256) = 0.127 bit instead of 0.5, so 4.127 bits in all:
DQ saves 0.373 bit per parameter (not "about 0.5", as is often said). Subtracting the mean first matters:
all absmax are positive, and centring them lets the signed 8-bit map use both of its halves.

Reading order: `dynamic_map`, `double_quantize`, `double_dequantize`, then `QuantizedWeight`, the container
Chapter 6's Linear4bit keeps (4-bit bytes + constants, with or without DQ, a state_dict round trip, and
`to_bnb` to hand the same bytes to bitsandbytes). tests/test_double_quant.py checks everything against
bitsandbytes 0.50.

One deliberate difference: bitsandbytes' CPU 8-bit quantizer picks codes through a 65,536-entry lookup
table, which is not always the nearest code (about 0.1-2 % of codes, depending on the data). We round to the
truly nearest code; our dequantized absmax is therefore never further from the original, and the rest of
the format (map, absmax2, offset, 4-bit bytes) is identical, so bitsandbytes reads our tensors unchanged.
"""

from __future__ import annotations

import math

import torch

from minilora.kernels import cached, one_intra_op_thread, scale_blocks, scratch
from minilora.nf4 import check_quant_options, dequantize_4bit, get_code, quantize_4bit

DQ_BLOCKSIZE = 256  # constants per second-level block, as in QLoRA and bitsandbytes


# ----------------------------------------------------------------------------------------------------
# The dynamic 8-bit map
# ----------------------------------------------------------------------------------------------------


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: 256 float32 levels in [-1, 1], sorted ascending.

    Dynamic tree quantization (Dettmers, 2016): after the sign bit, the number of leading zero bits picks a
    decade 10^(i-6) for i = 0..6, and the bits after the first 1 are a fraction with 2^i steps. Decade i thus
    holds 2^i levels, the midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6) — fine resolution near
    zero, coarse near ±1 — on both signs (2 · 127 levels), plus 0 and 1.0: 256 in all.

    Built the way bitsandbytes builds it (float32 midpoints times a Python-float power of ten, in float32),
    so every level is equal in bits to `bitsandbytes.functional.create_dynamic_map()`. Tensor operations
    only (no `.tolist()`), so torch.compile can trace it without a graph break.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2
        decade = 10.0 ** (i - 6)
        levels += [decade * means, -decade * means]
    return torch.cat(levels).sort().values


@torch.compiler.assume_constant_result  # traced: called once, eagerly, and its result embedded as a constant
def dynamic_map_on(device) -> torch.Tensor:
    """`dynamic_map()` on `device`, built once per device and cached (shared: never modify it).

    Under torch.compile it must not be rebuilt inside the graph: inductor's linspace is not bit-equal to
    eager's, and levels would move by an ulp (measured: tests/test_compile.py).
    """
    device = torch.device(device)
    return cached(("dynamic_map", device), lambda: dynamic_map().to(device))


# ----------------------------------------------------------------------------------------------------
# Quantize and dequantize the constants
# ----------------------------------------------------------------------------------------------------


def _check_dq_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize: expected a positive int (QLoRA uses 256), got {blocksize!r}")


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """Quantize first-level constants to 8 bits: (qabsmax uint8, absmax2 float32, offset float32 scalar).

    offset = mean(absmax); the centred constants are split into blocks of `blocksize`, each scaled by its
    own absmax2 (max |absmax - offset| in the block, a last partial block allowed) and rounded to the nearest
    level of `dynamic_map()`. Nearest is decided exactly (float64 distances, ties to the lower level), which
    agrees with bitsandbytes' table-based rounding on the great majority of codes and is never worse.
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"absmax: expected a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if absmax.numel() == 0:
        raise ValueError("absmax: cannot double-quantize an empty tensor")
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax: contains NaN or Inf")
    if bool((absmax < 0).any()):  # max |x| is never negative: these are not quantize_4bit's constants
        raise ValueError(f"absmax: per-block constants are max |x| >= 0, got a minimum of {float(absmax.min())}")
    _check_dq_blocksize(blocksize)

    values = absmax.reshape(-1)
    offset = values.mean()
    centered = values - offset
    n = centered.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(centered, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax2 = padded.abs().amax(dim=1)  # zero padding never raises a block's max

    code = dynamic_map_on(absmax.device).double()
    midpoints = (code[:-1] + code[1:]) / 2  # exact in float64
    scaled = centered.double() / absmax2.double().clamp(min=1e-38).repeat_interleave(blocksize)[:n]
    qabsmax = torch.searchsorted(midpoints, scaled).to(torch.uint8)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax, absmax2, offset, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """absmax_j = dynamic[qabsmax_j] · absmax2[j // blocksize] + offset, in float32 (as bitsandbytes)."""
    if not isinstance(qabsmax, torch.Tensor) or qabsmax.dtype != torch.uint8:
        raise ValueError(f"qabsmax: expected a uint8 tensor, got {getattr(qabsmax, 'dtype', type(qabsmax))}")
    _check_dq_blocksize(blocksize)
    n = qabsmax.numel()
    if not isinstance(absmax2, torch.Tensor) or absmax2.numel() != -(-n // blocksize):
        raise ValueError(f"absmax2: {n} codes in blocks of {blocksize} need {-(-n // blocksize)} constants, "
                         f"got {getattr(absmax2, 'numel', lambda: type(absmax2).__name__)()}")
    offset = torch.as_tensor(offset, dtype=torch.float32, device=qabsmax.device)
    if offset.numel() != 1:
        raise ValueError(f"offset: expected a single number, got shape {tuple(offset.shape)}")
    levels = dynamic_map_on(qabsmax.device)[qabsmax.reshape(-1).long()]
    return scale_blocks(levels, absmax2.reshape(-1).float(), blocksize) + offset.reshape(())


# ----------------------------------------------------------------------------------------------------
# The container: one quantized weight matrix
# ----------------------------------------------------------------------------------------------------


def _encode_text(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _decode_text(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("ascii")


class QuantizedWeight:
    """A weight stored as 4-bit codes plus its constants — what QLoRA keeps instead of the bf16 matrix.

    Attributes (plain tensors, so a module can hold them as buffers):
        packed   uint8 (ceil(n/2),)        two 4-bit patterns per byte (minilora.nf4.quantize_4bit)
        absmax   float32 (blocks,)         per-block constants, or None when double-quantized, then:
        qabsmax  uint8 (blocks,)           the constants in 8 bits (double_quantize)
        absmax2  float32 (ceil(blocks/256),)
        offset   float32 ()                the mean that was subtracted
    and metadata: shape (torch.Size), blocksize (int), quant_type ("nf4", "fp4" or "int4").

    reuse_output=True (for a caller that reads each decoded weight once and drops it, like Linear4bit's
    forward and backward): on a CPU in eager mode, `dequantize` writes into a buffer shared by every
    weight of the same size (`kernels.scratch`), so the result is only valid until the next such call. A
    fresh 4096 x 4096 bf16 tensor costs ~8,200 page faults, about as long as the decode itself. GPUs
    (caching allocator) and torch.compile (which plans its own buffers) always get a fresh tensor.
    """

    def __init__(self, packed, shape, blocksize=64, quant_type="nf4", absmax=None,
                 qabsmax=None, absmax2=None, offset=None, reuse_output: bool = False):
        check_quant_options(blocksize, quant_type)
        self.packed = packed
        self.shape = torch.Size(shape)
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.absmax = absmax
        self.qabsmax = qabsmax
        self.absmax2 = absmax2
        self.offset = offset
        self.reuse_output = reuse_output
        if (absmax is None) == (qabsmax is None) or ((qabsmax is None) != (absmax2 is None)
                                                     or (qabsmax is None) != (offset is None)):
            raise ValueError("absmax: give either absmax, or qabsmax with absmax2 and offset (double quant)")
        # Fail now, not at first use, if the pieces do not fit together.
        n, blocks = self.numel, -(-self.numel // blocksize)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed: shape {tuple(self.shape)} needs {(n + 1) // 2} uint8 bytes, "
                             f"got {packed.numel()} of {packed.dtype}")
        stored = absmax if absmax is not None else qabsmax
        if stored.numel() != blocks:
            raise ValueError(f"absmax: shape {tuple(self.shape)} at blocksize {blocksize} has {blocks} "
                             f"blocks, got {stored.numel()} constants")

    @classmethod
    def from_float(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4") -> QuantizedWeight:
        """Quantize a float weight: 4-bit codes per block of `blocksize`, constants double-quantized if asked.

        Raises ValueError for what `minilora.nf4.quantize_4bit` refuses (non-float or empty w, NaN/Inf,
        unsupported blocksize or quant_type).
        """
        packed, absmax = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        if not double_quant:
            return cls(packed, w.shape, blocksize, quant_type, absmax=absmax)
        qabsmax, absmax2, offset = double_quantize(absmax, DQ_BLOCKSIZE)
        return cls(packed, w.shape, blocksize, quant_type, qabsmax=qabsmax, absmax2=absmax2, offset=offset)

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The float32 per-block constants (decoded from 8 bits when double-quantized)."""
        if self.double_quant:
            return double_dequantize(self.qabsmax, self.absmax2, self.offset, DQ_BLOCKSIZE)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight Ŵ = code[q] · absmax, shaped like the original, in `dtype` (see reuse_output)."""
        device = self.packed.device
        if device.type != "cpu" or torch.compiler.is_compiling():
            return dequantize_4bit(self.packed, self.block_absmax(), self.shape, self.blocksize,
                                   self.quant_type, dtype)
        with one_intra_op_thread():  # the constants' decode opens no parallel region either (kernels, point 3)
            absmax = self.block_absmax()
        out = scratch(self.numel, dtype, device) if self.reuse_output else None
        return dequantize_4bit(self.packed, absmax, self.shape, self.blocksize, self.quant_type, dtype, out=out)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored data tensors by name (no metadata)."""
        if self.double_quant:
            return {"packed": self.packed, "qabsmax": self.qabsmax, "absmax2": self.absmax2,
                    "offset": self.offset}
        return {"packed": self.packed, "absmax": self.absmax}

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors: 4-bit codes and constants (shape, blocksize, type not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        """Storage per weight: 4.5 at blocksize 64 without DQ, 4 + 8/64 + 32/(64·256) ≈ 4.127 with DQ."""
        return 8 * self.nbytes / self.numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors- and buffer-friendly): the data plus metadata encoded as small tensors.

        Keys: packed, absmax | qabsmax, absmax2, offset; shape (int64), blocksize (int64 scalar),
        quant_type (its ASCII bytes as uint8).
        """
        sd = dict(self.tensors())
        sd["shape"] = torch.tensor(list(self.shape), dtype=torch.int64)
        sd["blocksize"] = torch.tensor(self.blocksize, dtype=torch.int64)
        sd["quant_type"] = _encode_text(self.quant_type)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Rebuild from `state_dict()`; unknown or missing keys are an error, never silently ignored."""
        plain = {"packed", "absmax", "shape", "blocksize", "quant_type"}
        nested = {"packed", "qabsmax", "absmax2", "offset", "shape", "blocksize", "quant_type"}
        if set(sd) not in (plain, nested):
            raise ValueError(f"sd: expected keys {sorted(plain)} or {sorted(nested)}, got {sorted(sd)}")
        quant_type, blocksize = _decode_text(sd["quant_type"]), int(sd["blocksize"])
        check_quant_options(blocksize, quant_type)
        shape = torch.Size(sd["shape"].tolist())
        if "absmax" in sd:
            return cls(sd["packed"], shape, blocksize, quant_type, absmax=sd["absmax"])
        return cls(sd["packed"], shape, blocksize, quant_type, qabsmax=sd["qabsmax"], absmax2=sd["absmax2"],
                   offset=sd["offset"])

    def to_bnb(self, dtype: torch.dtype = torch.bfloat16):
        """(packed, QuantState) for `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`.

        bitsandbytes decodes our bytes and constants to exactly `self.dequantize(dtype)` (tested). The packed
        bytes are reshaped to bitsandbytes' (ceil(n/2), 1) layout; the tensors are shared, not copied.
        """
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type: bitsandbytes only reads 'nf4' and 'fp4', this weight is "
                             f"{self.quant_type!r}")
        from bitsandbytes.functional import QuantState  # a dev dependency, needed only here

        code = get_code(self.quant_type)
        if not self.double_quant:
            state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type=self.quant_type, dtype=dtype)
        else:
            state2 = QuantState(absmax=self.absmax2, code=dynamic_map(), blocksize=DQ_BLOCKSIZE,
                                dtype=torch.float32)
            state = QuantState(absmax=self.qabsmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type=self.quant_type, dtype=dtype, offset=self.offset, state2=state2)
        return self.packed.reshape(-1, 1), state

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"QuantizedWeight(shape={tuple(self.shape)}, {self.quant_type}, blocksize={self.blocksize}"
                f"{dq}, {self.bits_per_param:.3f} bits/param)")
