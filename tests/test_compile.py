"""Linear4bit, and LoRA on top of it, under torch.compile (inductor): same results as eager, never NaN.

Issue 12 found two failures here, in ports of bitsandbytes' own `test_linear4bit` compile tests: all-NaN
input gradients under inductor on CPU (from a transposed-copy backward, now `grad_output @ W`) and a
`fullgraph=True` break at a `.tolist()` that rebuilt the dynamic map on every call (now cached, and
tensor-only when traced). Kept small on purpose: each test compiles once (a few seconds on an idle CPU,
the first compile in a process pays ~10 s more for inductor's own start-up).

Tolerance: the compiled graph may keep an intermediate in float32 where eager rounds it to bf16 (inductor
drops a .to(bf16).to(fp32) pair), so results may differ by bf16 rounding steps. A bf16 step is 2^-8
relative; two layers and a LoRA sum compound at most a few of them: we allow 4 steps of the largest
magnitude, i.e. 2^-6 relative to max |eager|. The decode itself has no such freedom: it is bit-exact.
"""

import contextlib
import shutil

import pytest
import torch
import torch._inductor.config
from bitwise import bits
from torch import nn

from minilora.double_quant import QuantizedWeight
from minilora.lora import LoRALinear
from minilora.nf4 import dequantize_4bit_reference
from minilora.qlora import Linear4bit

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="inductor needs a C++ compiler on CPU")

BF16_STEPS = 4 * 2.0**-8  # see the module docstring


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    # ATen capped at its scalar kernels (ATEN_CPU_CAPABILITY=default, as `make test-portable` does): inductor
    # still emits at::vec code for the machine's vector ISA, which the capped headers do not declare, and g++
    # fails. Scalar code (simdlen 1) is what a CPU without vector units gets, so test that there.
    scalar = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    with torch._inductor.config.patch({"cpp.simdlen": 1}) if scalar else contextlib.nullcontext():
        yield
    torch._dynamo.reset()


def close_in_bf16(compiled: torch.Tensor, eager: torch.Tensor) -> bool:
    assert not compiled.isnan().any() and not eager.isnan().any()
    return float((compiled.float() - eager.float()).abs().max()) <= BF16_STEPS * float(eager.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_decode_is_bit_exact(dtype):
    # fullgraph: decoding a double-quantized weight must trace without a break (no .tolist(), no table
    # rebuilt in Python). An odd count with a partial last block: 37 x 29 = 1073 values, blocksize 64.
    w = torch.randn(37, 29, generator=torch.Generator().manual_seed(0)) * 2
    qweight = QuantizedWeight.from_float(w, blocksize=64, double_quant=True)
    decode = torch.compile(lambda q: q.dequantize(dtype), fullgraph=True)
    expected = dequantize_4bit_reference(qweight.packed, qweight.block_absmax(), w.shape, 64, "nf4", dtype)
    assert torch.equal(bits(decode(qweight)), bits(expected))


def two_layer_qlora(double_quant: bool) -> nn.Module:
    torch.manual_seed(1)
    first = Linear4bit(nn.Linear(64, 48), double_quant=double_quant, compute_dtype=torch.bfloat16)
    second = LoRALinear(Linear4bit(nn.Linear(48, 32), double_quant=double_quant), r=4, lora_alpha=8)
    nn.init.normal_(second.lora_B, std=0.1)  # B = 0 at init would hide the bypass from the comparison
    return nn.Sequential(first, nn.GELU(), second)


@pytest.mark.parametrize("double_quant,fullgraph", [(False, False), (True, True)])
def test_compiled_qlora_layers_match_eager(double_quant, fullgraph):
    model = two_layer_qlora(double_quant)
    x = torch.randn(8, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))

    def run(module):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        out.float().pow(2).mean().backward()
        lora_grad = model[2].lora_B.grad.clone()  # the compiled module shares model's parameters
        model.zero_grad(set_to_none=True)
        return out.detach(), inputs.grad, lora_grad

    eager_out, eager_grad, eager_lora = run(model)
    compiled_out, compiled_grad, compiled_lora = run(torch.compile(model, fullgraph=fullgraph))
    assert close_in_bf16(compiled_out, eager_out)
    assert close_in_bf16(compiled_grad, eager_grad)  # the input gradient: all NaN before the fix
    assert close_in_bf16(compiled_lora, eager_lora)
