"""bitsandbytes' per-CPU behaviour, in one place, with an explicit expectation for every CPU class.

Every test that decides whether *minilora* is right compares with bitsandbytes' generic PyTorch code, which is the
same on every CPU (tests/bitwise.py). This module is about what bitsandbytes 0.50 itself does differently per CPU,
keyed to the decisions bitsandbytes really makes (read from `bitsandbytes/backends/cpu/ops.py` and
`bitsandbytes/nn/modules.py`, measured on three CPU classes; ../shared/REFERENCE.md):

| CPU class                    | dequantize_4bit                     | Linear4bit, eval, no grad | at import       |
|------------------------------|-------------------------------------|---------------------------|-----------------|
| AVX2, arm64                  | native C, scalar loop: right        | unfused: decode, matmul   | silent          |
| AVX-512 without AVX512-BF16  | native C, AVX-512 loop: wrong where | unfused                   | silent          |
|                              | rows are not a whole number of      |                           |                 |
|                              | blocks (and some other conditions)  |                           |                 |
| AVX512-BF16, with/without AMX| as above                            | fused gemv; refuses       | tries a Hub     |
|                              |                                     | out_features % 32 != 0    | kernel, logs    |

- Dequantize: bitsandbytes registers its native C kernel on every CPU where its native library loads. Python falls
  back to the generic path only for an odd last dimension, or for blocksize >= 2048 when torch's CPU capability
  is AVX512 (`_has_avx512`, which `ATEN_CPU_CAPABILITY=default` turns False). Inside the C kernel the AVX-512
  loop is chosen from the CPU's own flags, whatever torch's capability says: `CPU_AVX512F` below.
- The fused path: `Linear4bit` copies `has_avx512bf16()` (asked of the native library) into the instance flag
  `support_avx512bf16_for_cpu`; the repacking it then does in Python asserts out_features % 32 == 0. Setting the
  flag on any CPU reaches that assert, so its Python part runs everywhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitsandbytes.backends.cpu import ops as bnb_cpu_ops
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary
from bitsandbytes.cextension import lib as bnb_native_lib
from bitwise import BF16_EPS, bf16_matmul_bound, bits, bnb_layer, bnb_reference_dequantize
from torch import nn

from minilora.machine import KNOWN_HARMLESS
from minilora.nf4 import dequantize_4bit, get_code, quantize_4bit
from minilora.qlora import Linear4bit


def _cpu_has_avx512f() -> bool:
    """The CPU's own AVX-512F flag, as bitsandbytes' C code sees it (not torch's capability, which an environment
    variable can lower). Linux lists the flags in /proc/cpuinfo; elsewhere torch asks cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo.read_text().splitlines())
    return torch.cpu._is_avx512_supported()


BNB_NATIVE = not isinstance(bnb_native_lib, ErrorHandlerMockBNBNativeLibrary)
CPU_AVX512F = _cpu_has_avx512f()
TORCH_AVX512 = bnb_cpu_ops._has_avx512  # torch.backends.cpu.get_cpu_capability() == "AVX512", read at import
FUSED = BNB_NATIVE and bnb_f.has_avx512bf16()


def dequantize_path(shape, blocksize: int) -> str:
    """The code bitsandbytes 0.50 runs for `dequantize_4bit` of a `shape` tensor on this CPU."""
    if not BNB_NATIVE or shape[-1] % 2 or (TORCH_AVX512 and blocksize >= 2048):
        return "generic"
    return "native AVX-512" if CPU_AVX512F else "native scalar"


def _wrong_on_avx512(shape, blocksize: int) -> bool:
    """Where the AVX-512 loop is wrong, as measured (rows of 2..798 values, blocksize 64/128/256): it takes the
    rows whose length is a multiple of 16 and looks up each value's absmax as if every row began a new block,
    which picks a wrong block whenever rows are not whole blocks and the tensor spans more than one block."""
    rows, n = shape
    return n % 16 == 0 and n % blocksize != 0 and rows * n > blocksize


# (shape, blocksize). Row lengths that are whole blocks (every Linear4bit weight whose in_features is a multiple of
# the blocksize) are right on every path; the others are right on the scalar and generic paths only.
CASES = [((2, 32), 64), ((40, 128), 64), ((10, 100), 64), ((3, 50), 64), ((256, 512), 64),
         ((40, 96), 64), ((3, 32), 64), ((10, 48), 64), ((40, 160), 64), ((10, 80), 128),
         ((40, 128), 2048), ((256, 512), 2048)]  # large blocks: generic at capability AVX512, native below it
DEFECT = ("bitsandbytes 0.50's native AVX-512 dequantize_4bit takes each value's absmax from the wrong block when "
          "rows are not a whole number of blocks; its generic path and minilora decode it right")


def _bf16(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.usefixtures("eager_bitsandbytes")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, blocksize", CASES, ids=str)
def test_bnb_dequantize_on_this_cpu(shape, blocksize, quant_type, request):
    path = dequantize_path(shape, blocksize)
    if path == "native AVX-512" and _wrong_on_avx512(shape, blocksize):
        request.applymarker(pytest.mark.xfail(strict=True, reason=DEFECT))
    packed, state = bnb_f.quantize_4bit(_bf16(shape), blocksize=blocksize, quant_type=quant_type)
    dispatched = bnb_f.dequantize_4bit(packed, state)  # what bitsandbytes runs on this CPU
    reference = bnb_reference_dequantize(packed, state)  # what bitsandbytes means
    error = (dispatched.float() - reference.float()).abs().max().item()
    # +0.0: FP4 has a -0 code, and the kernels disagree on its sign, which is no difference in value
    assert torch.equal(bits(dispatched + 0.0), bits(reference + 0.0)), f"{path}: max difference {error:.3f}"


@pytest.mark.parametrize("shape, blocksize", [c for c in CASES if _wrong_on_avx512(*c)], ids=str)
def test_our_decode_is_right_where_bnb_native_kernel_is_wrong(shape, blocksize):
    x = _bf16(shape)
    packed, absmax = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    ours = dequantize_4bit(packed, absmax, shape, blocksize, "nf4", torch.float32)
    # 1. The same bytes decode to the same bits as bitsandbytes' generic path (its definition of the format).
    bnb_packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, bnb_packed.reshape(-1))
    state.dtype = torch.float32
    assert torch.equal(bits(ours), bits(bnb_reference_dequantize(bnb_packed, state)))
    # 2. Every value lands within half the widest gap between NF4 levels of its block's absmax: the error
    #    bound of nearest-level quantization, which a decode with the wrong block's absmax breaks.
    half_gap = (get_code("nf4").diff().max() / 2).item()
    scale = absmax.repeat_interleave(blocksize)[: x.numel()].reshape(shape)
    error = (ours - x.float()).abs()
    assert (error <= half_gap * scale * (1 + 2**-20)).all()


# ----------------------------------------------------------------------------------------------------
# bitsandbytes' Linear4bit beside ours: the unfused path on every CPU, the fused one where it exists
# ----------------------------------------------------------------------------------------------------


def _pair(shape, quant_type="nf4", double_quant=True, seed=0):
    torch.manual_seed(seed)
    in_features, out_features = shape
    ours = Linear4bit(nn.Linear(in_features, out_features), quant_type=quant_type, double_quant=double_quant)
    return ours, ours.dequantized_weight(torch.float32)


def _assert_forward_within_bound(ours, theirs, weight, requires_grad):
    x1 = torch.randn(2, 5, ours.in_features, requires_grad=requires_grad)
    x2 = x1.detach().clone().requires_grad_(requires_grad)
    with torch.set_grad_enabled(requires_grad):
        y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype == torch.float32  # both cast back to the input dtype
    xb = x1.detach().to(torch.bfloat16).float()
    bound = bf16_matmul_bound(xb, weight.t(), y1.detach()) + ours.bias.detach().abs() * 2 * BF16_EPS
    assert ((y1 - y2).abs() <= bound).all()
    return x1, x2, y1, y2


# (in, out): rows that are whole blocks, as in real models; out_features 40 and 24 are not multiples of 32.
LAYER_SHAPES = [(128, 40), (64, 24), (128, 64)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
def test_unfused_bnb_layer_equals_ours_within_bf16_bound(quant_type, double_quant, shape):
    """Every CPU: bitsandbytes' Linear4bit with its fused path switched off (decode, then matmul) in eval and
    train mode, forward and input gradient."""
    ours, weight = _pair(shape, quant_type, double_quant)
    _assert_forward_within_bound(ours, bnb_layer(ours).eval(), weight, requires_grad=False)
    x1, x2, y1, y2 = _assert_forward_within_bound(ours, bnb_layer(ours).train(), weight, requires_grad=True)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    # The input gradient is grad @ W in bf16 on both sides, laid out differently in memory: the same bound.
    gb = grad.to(torch.bfloat16).float()
    assert ((x1.grad - x2.grad).abs() <= bf16_matmul_bound(gb, weight, x1.grad)).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
def test_bnb_layer_as_this_cpu_runs_it_in_eval_without_grad(quant_type, shape, request):
    """The path bitsandbytes chooses by itself: fused on AVX512-BF16 CPUs (which rounds absmax to bf16, inside
    `bf16_matmul_bound`), unfused elsewhere. The fused path refuses out_features that are not a multiple of 32."""
    if FUSED and shape[1] % 32:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "bitsandbytes 0.50's fused AVX512-BF16 inference path repacks the weight in blocks of 32 output "
            "rows and asserts out_features % 32 == 0 ('N must be divisible by block_n')")))
    ours, weight = _pair(shape, quant_type)
    theirs = bnb_layer(ours, fused=True).eval()
    assert theirs.support_avx512bf16_for_cpu == FUSED
    _assert_forward_within_bound(ours, theirs, weight, requires_grad=False)
    assert getattr(theirs.weight.quant_state, "packing_format_for_cpu", False) == FUSED  # it really was fused


def test_fused_path_refuses_widths_not_a_multiple_of_32_on_every_cpu():
    """The flag forced on: bitsandbytes' repacking, in Python, asserts before any AVX512-BF16 code runs."""
    ours, _ = _pair((64, 40))
    theirs = bnb_layer(ours, fused=True).eval()
    theirs.support_avx512bf16_for_cpu = True
    with pytest.raises(AssertionError, match="N must be divisible by block_n"), torch.no_grad():
        theirs(torch.randn(3, 64))


# ----------------------------------------------------------------------------------------------------
# What importing bitsandbytes prints, and minilora's filter of it (minilora/machine.py)
# ----------------------------------------------------------------------------------------------------

KERNELS_LINE = KNOWN_HARMLESS[0][1]  # "Failed to load CPU gemm_4bit_forward from kernels-community"


def _stderr_of(code: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # as `make` runs everything: no Hub, nothing downloaded
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          timeout=120).stderr


def test_bnb_import_logs_the_kernel_line_exactly_on_avx512bf16_cpus():
    """bitsandbytes tries a Hub kernel for its fused path at import, only where it has that path."""
    assert (KERNELS_LINE in _stderr_of("import bitsandbytes")) == FUSED


@pytest.mark.skipif(not FUSED, reason="bitsandbytes logs no such line on this CPU (the test above), so nothing "
                                       "to silence; tests/test_machine.py checks the filter itself on every CPU")
def test_importing_minilora_first_silences_it_where_bitsandbytes_logs_it():
    assert "kernels-community" not in _stderr_of("import minilora, bitsandbytes, peft")
