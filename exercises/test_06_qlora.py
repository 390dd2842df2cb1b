"""Exercise 6 tests: the 4-bit matmul Function and quantize_model (chapters/06-qlora.md).

Oracles: plain PyTorch autograd on the dequantized weight, and minilora's quantize_model. The layer
quantize_model must build is the one the module under test gives (the core's Linear4bit, in the stub).
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.double_quant import QuantizedWeight
from minilora.qlora import quantize_model as reference_quantize_model


@pytest.fixture
def qlora(implementation):
    return implementation("qlora")


class CountingWeight:
    """A QuantizedWeight that counts how often it is decoded."""

    def __init__(self, qweight):
        self.qweight, self.calls = qweight, 0

    def dequantize(self, dtype=torch.bfloat16):
        self.calls += 1
        return self.qweight.dequantize(dtype)

    def __getattr__(self, name):
        return getattr(self.qweight, name)


def _setup(seed=0, bias=True):
    torch.manual_seed(seed)
    qweight = QuantizedWeight.from_float(torch.randn(24, 64))
    b = torch.randn(24) if bias else None
    return qweight, b


def test_forward_is_linear_with_the_dequantized_weight(qlora):
    qweight, bias = _setup()
    x = torch.randn(3, 5, 64)
    y = qlora.MatMul4bit.apply(x, qweight, bias)
    assert torch.equal(y, F.linear(x, qweight.dequantize(torch.float32), bias))
    xb = x.to(torch.bfloat16)
    yb = qlora.MatMul4bit.apply(xb, qweight, bias.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, F.linear(xb, qweight.dequantize(torch.bfloat16), bias.to(torch.bfloat16)))


def test_input_gradient(qlora):
    qweight, bias = _setup(1)
    x = torch.randn(4, 64, requires_grad=True)
    grad = torch.randn(4, 24)
    qlora.MatMul4bit.apply(x, qweight, bias).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, qweight.dequantize(torch.float32), bias).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_bias_gradient(qlora):
    qweight, bias = _setup(2)
    bias.requires_grad_()
    x = torch.randn(2, 3, 64)
    qlora.MatMul4bit.apply(x, qweight, bias).pow(2).sum().backward()
    ref = bias.detach().clone().requires_grad_()
    F.linear(x, qweight.dequantize(torch.float32), ref).pow(2).sum().backward()
    torch.testing.assert_close(bias.grad, ref.grad)


def test_backward_decodes_again_instead_of_keeping_the_weight(qlora):
    qweight, _ = _setup(3, bias=False)
    counting = CountingWeight(qweight)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlora.MatMul4bit.apply(x, counting, None)
    assert counting.calls == 1, "forward should decode the weight exactly once"
    assert all(t.numel() < 24 * 64 for t in saved), "a weight-sized tensor was saved for backward"
    y.sum().backward()
    assert counting.calls == 2, "backward should decode the 4-bit weight again (and keep nothing 16-bit)"


def _tiny_model(seed=0):
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def test_quantize_model_replaces_every_linear_but_the_skipped(qlora):
    model = qlora.quantize_model(_tiny_model(), compute_dtype=torch.float32, skip=("lm_head", "down_proj"))
    Linear4bit = qlora.Linear4bit
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.1.mlp.down_proj"] is nn.Linear
    assert kinds["model.layers.0.self_attn.q_proj"] is Linear4bit
    assert sum(k is Linear4bit for k in kinds.values()) == 12
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
    ids = torch.randint(0, 64, (2, 9))
    reference = reference_quantize_model(_tiny_model(), compute_dtype=torch.float32, skip=("lm_head", "down_proj"))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_quantize_model_releases_old_weights_and_reports_bytes(qlora):
    model = _tiny_model()
    refs = [weakref.ref(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    qlora.quantize_model(model)
    gc.collect()
    assert all(ref() is None for ref in refs), "an old nn.Linear is still alive after quantize_model"
    expected = reference_quantize_model(_tiny_model()).quantization_report
    assert model.quantization_report == expected
