"""Double quantization for real: minilora/core/double_quant.py's functions checked and cached, and
`QuantizedWeight`, the container a 4-bit layer keeps (chapter 4).

The idea is minilora/core/double_quant.py: the first-level absmax constants, one per block of 64 weights,
quantized blockwise again to 8 bits with the dynamic map (QLoRA §3), 0.373 bit per parameter saved. This file
checks their arguments once (`double_quantize`, `double_dequantize`), keeps the map cached per device and
compile-safe (`dynamic_map_on`), and holds one weight's bytes in `QuantizedWeight` (4-bit codes + constants,
with or without DQ, a state_dict round trip, `to_bnb` to hand the same bytes to bitsandbytes, and a decode into
a reused buffer). tests/test_core.py proves the functions equal to the core's bit for bit;
tests/test_double_quant.py checks everything against bitsandbytes 0.50.

Read first: `QuantizedWeight.from_float`, then `QuantizedWeight.dequantize`.

One deliberate difference: bitsandbytes' CPU 8-bit quantizer picks codes through a 65,536-entry lookup
table, which is not always the nearest code (about 0.1-2 % of codes, depending on the data). We round to the
truly nearest code; our dequantized absmax is therefore never further from the original, and the rest of
the format (map, absmax2, offset, 4-bit bytes) is identical, so bitsandbytes reads our tensors unchanged.
"""

from __future__ import annotations

import math

import torch

from minilora import native
from minilora.core import double_quant as core
from minilora.core.double_quant import DQ_BLOCKSIZE, dynamic_map  # importable from here
from minilora.kernels import cached, one_intra_op_thread, scale_blocks, scratch
from minilora.nf4 import (
    FLOAT_DTYPES,
    check_constants_finite,
    check_quant_options,
    decode_checked,
    dequantize_4bit,
    get_code,
    quantize_4bit,
)

__all__ = ["DQ_BLOCKSIZE", "QuantizedWeight", "double_dequantize", "double_quantize", "dynamic_map",
           "dynamic_map_on"]


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
    """minilora.core.double_quant.double_quantize: (qabsmax uint8, absmax2 float32, offset float32 scalar), for
    first-level constants as quantize_4bit makes them (float32, finite, >= 0, not empty)."""
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"absmax: expected a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if absmax.numel() == 0:
        raise ValueError("absmax: cannot double-quantize an empty tensor")
    check_constants_finite(absmax)
    if bool((absmax < 0).any()):  # max |x| is never negative: these are not quantize_4bit's constants
        raise ValueError(f"absmax: per-block constants are max |x| >= 0, got a minimum of {float(absmax.min())}")
    _check_dq_blocksize(blocksize)
    # On one thread: ATen splits a long float32 sum among its threads, so the offset (a mean) and with it every
    # code would depend on the thread count (a 4096 x 4096 weight's 262,144 constants are above its grain size).
    with one_intra_op_thread():
        return core.double_quantize(absmax, blocksize)


def double_dequantize(qabsmax, absmax2, offset, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """absmax_j = dynamic[qabsmax_j] · absmax2[j // blocksize] + offset, in float32: the core's formula, checked,
    with the cached map and `kernels.scale_blocks` (the same products in a shape torch.compile gets right)."""
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
        # Fail now, not at first use, if the pieces do not fit together: `dequantize` trusts them (the compiled
        # decode reads raw memory by these counts and dtypes).
        n, blocks = self.numel, -(-self.numel // blocksize)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed: shape {tuple(self.shape)} needs {(n + 1) // 2} uint8 bytes, "
                             f"got {packed.numel()} of {packed.dtype}")
        name, stored, dtype = (("absmax", absmax, torch.float32) if absmax is not None
                               else ("qabsmax", qabsmax, torch.uint8))
        if stored.dtype != dtype or stored.numel() != blocks:
            raise ValueError(f"{name}: shape {tuple(self.shape)} at blocksize {blocksize} has {blocks} blocks, "
                             f"needs {blocks} {dtype} constants, got {stored.numel()} of {stored.dtype}")
        if qabsmax is not None:
            blocks2 = -(-blocks // DQ_BLOCKSIZE)
            if absmax2.dtype != torch.float32 or absmax2.numel() != blocks2:
                raise ValueError(f"absmax2: {blocks} constants in blocks of {DQ_BLOCKSIZE} need {blocks2} "
                                 f"torch.float32 values, got {absmax2.numel()} of {absmax2.dtype}")
            if offset.dtype != torch.float32 or offset.numel() != 1:
                raise ValueError(f"offset: expected one torch.float32 value, got {offset.numel()} of "
                                 f"{offset.dtype}")

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
        """The float32 per-block constants, decoded from 8 bits when double-quantized (in minilora.native's one
        compiled pass where it can: the same bits as `double_dequantize`'s half a dozen tensor ops), and checked
        finite: a corrupted checkpoint must never decode into NaN weights."""
        if torch.compiler.is_compiling():  # a check would break the graph: the constants were checked when made
            return double_dequantize(self.qabsmax, self.absmax2, self.offset) if self.double_quant else self.absmax
        if self.double_quant:
            fast = native.decode_constants(self.qabsmax.reshape(-1), self.absmax2.reshape(-1), self.offset,
                                           dynamic_map_on(self.qabsmax.device), DQ_BLOCKSIZE)
            if fast is not None:  # checked as it was decoded
                return fast
        absmax = double_dequantize(self.qabsmax, self.absmax2, self.offset) if self.double_quant else self.absmax
        check_constants_finite(absmax)
        return absmax

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight Ŵ = code[q] · absmax, shaped like the original, in `dtype` (see reuse_output)."""
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        if torch.compiler.is_compiling():
            return dequantize_4bit(self.packed, self.block_absmax(), self.shape, self.blocksize,
                                   self.quant_type, dtype)
        with one_intra_op_thread():  # the constants' decode opens no parallel region either (kernels, point 3)
            absmax = self.block_absmax()
        reuse = self.reuse_output and self.packed.device.type == "cpu"
        out = scratch(self.numel, dtype, self.packed.device) if reuse else None
        # The pieces were checked when this weight was made (__init__), the constants just now: decode.
        return decode_checked(self.packed, absmax, self.shape, self.blocksize, self.quant_type, dtype, out)

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
