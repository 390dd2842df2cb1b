"""minilora.qlora against bitsandbytes' Linear4bit with peft's LoRA on top (the QLoRA stack people use).

Both stacks get the *same* 4-bit bytes (our QuantizedWeight handed to bitsandbytes through `to_bnb`) and the
same LoRA matrices. What is exact and what is not:
- our layer computes the formula bitsandbytes documents, `F.linear(x.bf16, dequantize(W))`: equal in every bit;
- bitsandbytes' own layer decodes with native code and BLAS sums in another order per CPU: equal within
  `bf16_matmul_bound` (tests/bitwise.py), a tolerance derived from the arithmetic, not fitted to one machine.
  Its layers here always take their unfused path (`bnb_layer`), the one that exists on every CPU; the fused
  AVX512-BF16 inference path is tested on its own, in test_bnb_kernels.py.
"""

import copy
import gc
import warnings
import weakref

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from bitwise import BF16_EPS, bits, bnb_layer, bnb_reference_dequantize
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from minilora.adapters import save_adapter
from minilora.double_quant import QuantizedWeight
from minilora.lora import LoraConfig, LoRALinear, add_lora, lora_layers, merge_lora
from minilora.qlora import Linear4bit, MatMul4bit, model_nbytes, prepare_for_kbit_training, quantize_model


def _bnb_model(model_16bit: nn.Module, ours_quantized: nn.Module) -> nn.Module:
    """A copy of `model_16bit` whose Linear layers (not lm_head) are bitsandbytes layers with our bytes."""
    theirs = copy.deepcopy(model_16bit)
    for name, module in list(theirs.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, bnb_layer(ours_quantized.get_submodule(name)))
    theirs.is_loaded_in_4bit = True  # so that peft dispatches its bitsandbytes LoRA layer
    return theirs


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_computes_the_bitsandbytes_formula_exactly(quant_type, double_quant, bias):
    torch.manual_seed(0)
    ours = Linear4bit(nn.Linear(96, 40, bias=bias), quant_type=quant_type, double_quant=double_quant)
    packed, state = ours.quantized_weight.to_bnb(torch.bfloat16)
    weight = bnb_reference_dequantize(packed, state)  # bitsandbytes' decode of our bytes, on any CPU
    x = torch.randn(2, 5, 96)
    b = ours.bias.detach().to(torch.bfloat16) if bias else None
    expected = F.linear(x.to(torch.bfloat16), weight, b).to(torch.float32)
    assert torch.equal(bits(ours(x)), bits(expected))


# The layer-level comparison with bitsandbytes' own Linear4bit (its unfused path on every CPU, its fused AVX512-BF16
# inference path where it exists) lives with the other per-CPU behaviour of bitsandbytes, in test_bnb_kernels.py.


def test_output_is_flinear_of_dequantized_weight():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    layer = Linear4bit(linear)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    w = layer.quantized_weight.dequantize(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, w, linear.bias.detach().to(torch.bfloat16)))
    assert torch.equal(layer.dequantized_weight(torch.float32),
                       QuantizedWeight.from_float(linear.weight.detach()).dequantize(torch.float32))


def test_backward_decodes_again_and_saves_nothing_16bit(monkeypatch):
    torch.manual_seed(2)
    layer = Linear4bit(nn.Linear(64, 32))
    calls = []
    original = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, dtype=torch.bfloat16: (
        calls.append(dtype), original(self, dtype))[1])
    saved = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert len(calls) == 1
    # Nothing of weight size (32 × 64) is kept for backward: the decoded weight died with forward.
    assert all(t.numel() < 32 * 64 for t in saved)
    y.sum().backward()
    assert len(calls) == 2  # decoded a second time, for ∂L/∂x
    assert x.grad is not None and x.grad.shape == x.shape
    assert not any(t.requires_grad for t in layer.buffers())


def test_matmul4bit_bias_gradient():
    torch.manual_seed(3)
    qweight = QuantizedWeight.from_float(torch.randn(8, 64))
    bias = torch.randn(8, requires_grad=True)
    x = torch.randn(3, 64)
    MatMul4bit.apply(x, qweight, bias).pow(2).sum().backward()
    ref_bias = bias.detach().clone().requires_grad_()
    F.linear(x, qweight.dequantize(torch.float32), ref_bias).pow(2).sum().backward()
    torch.testing.assert_close(bias.grad, ref_bias.grad)


def test_buffers_state_dict_and_dtype_casts():
    torch.manual_seed(4)
    layer = Linear4bit(nn.Linear(64, 64), double_quant=True)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert sorted(layer.state_dict()) == ["bias", "weight_absmax2", "weight_offset", "weight_packed",
                                          "weight_qabsmax"]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)  # moves/casts the bias, must leave the 4-bit storage bit-identical
    for key in ("weight_absmax2", "weight_offset", "weight_packed", "weight_qabsmax"):
        assert layer.state_dict()[key].dtype == before[key].dtype
        assert torch.equal(layer.state_dict()[key], before[key])
    assert layer.bias.dtype == torch.bfloat16
    other = Linear4bit(nn.Linear(64, 64), double_quant=True)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))
    # nbytes: 64·64/2 code bytes + 64 one-byte constants + one float32 absmax2 + float32 offset + bf16 bias
    assert layer.nbytes == 2048 + 64 + 4 + 4 + 64 * 2


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(nn.Linear(64, 64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(nn.Linear(64, 64), quant_type="nf3")
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(nn.Linear(64, 64), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="skip"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), skip="lm_head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), skip=("0",))


# ----------------------------------------------------------------------------------------------------
# A whole model
# ----------------------------------------------------------------------------------------------------


def test_quantize_model_replaces_layer_by_layer_and_reports_bytes(tiny_llama):
    model = tiny_llama(seed=0)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    refs = {n: weakref.ref(m) for n, m in linears.items() if n != "lm_head"}
    linear_bytes = sum(model_nbytes(m) for n, m in linears.items() if n != "lm_head")
    bytes_before = model_nbytes(model)
    del linears
    quantize_model(model)
    gc.collect()
    assert all(ref() is None for ref in refs.values())  # every 32-bit weight was released
    assert isinstance(model.lm_head, nn.Linear)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(quantized) == sorted(refs)
    report = model.quantization_report
    assert report.layers == len(refs) == 14
    assert report.bytes_before == bytes_before
    assert report.linear_bytes_before == linear_bytes
    assert report.linear_bytes_after == sum(m.nbytes for m in quantized.values())
    assert report.bytes_after == model_nbytes(model)
    assert report.bytes_after == bytes_before - linear_bytes + report.linear_bytes_after


def _qlora_pair(tiny_llama, seed=0):
    """(our QLoRA model, peft + bitsandbytes model) with the same bytes and the same non-zero LoRA weights.

    Widths 64 and 128: every weight row is a whole number of 64-blocks, as in real models, where
    bitsandbytes' native AVX-512 decode is right (tests/test_bnb_kernels.py has the shapes where it is not)."""
    model = tiny_llama(seed=seed, hidden_size=64, intermediate_size=128)
    ours = quantize_model(copy.deepcopy(model))
    theirs = _bnb_model(model, ours)
    add_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(theirs, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    for name, layer in lora_layers(ours).items():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)  # B = 0 would hide every bypass error
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert isinstance(peft_layer.base_layer, bnb.nn.Linear4bit)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return ours.train(), theirs.train()


# Model-level tolerance: each Linear of the two stacks agrees within one bf16 ulp (bf16_matmul_bound; on some
# CPUs bitsandbytes runs other kernels, and BLAS sums in another order). Normalised layers carry such relative
# errors forward without amplifying them, and the model has 2 layers of 7 Linears each: we allow 2^-5, four bf16
# ulps, relative to the largest value of each tensor compared.
MODEL_RTOL = 4 * 2 * BF16_EPS


def assert_close_model(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=MODEL_RTOL, atol=MODEL_RTOL * expected.abs().max().item())


def test_qlora_model_equals_peft_on_bitsandbytes(tiny_llama, token_ids):
    ours, theirs = _qlora_pair(tiny_llama)
    embeds = ours.get_input_embeddings()(token_ids).detach()
    e1, e2 = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    logits1 = ours(inputs_embeds=e1).logits
    logits2 = theirs(inputs_embeds=e2).logits
    assert_close_model(logits1, logits2)
    target = torch.randn_like(logits1)
    (logits1 * target).sum().backward()
    (logits2 * target).sum().backward()
    assert_close_model(e1.grad, e2.grad)
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert_close_model(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        assert_close_model(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    # ...and the tolerance has teeth: dropping one layer's adapter is far outside it
    name = next(iter(lora_layers(ours)))
    with torch.no_grad():
        ours.get_submodule(name).lora_B.zero_()
        assert (ours(inputs_embeds=embeds).logits - logits2).abs().max() > 10 * MODEL_RTOL * logits2.abs().max()


def test_training_changes_only_lora_and_keeps_the_4bit_bytes(tiny_llama, token_ids):
    # fp32 compute: bf16 matmuls are slow on CPUs without bf16 instructions, and the claim is the same
    model = prepare_for_kbit_training(quantize_model(tiny_llama(seed=0), compute_dtype=torch.float32))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    stored = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=token_ids, labels=token_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    for key, value in stored.items():
        assert torch.equal(after[key], value), key  # not one byte of the base moved
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_prepare_for_kbit_training(tiny_llama, token_ids):
    model = quantize_model(tiny_llama(seed=0, dtype=torch.bfloat16))
    model.config.use_cache = True
    prepare_for_kbit_training(model, gradient_checkpointing=True, use_reentrant=True)
    assert model.config.use_cache is False
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16  # head_fp32=False by default
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    model.train()
    # Reentrant checkpointing with frozen inputs is where "element 0 of tensors does not require grad" hits;
    # the input-embedding hook makes it work, and the gradients equal those without checkpointing.
    model(input_ids=token_ids, labels=token_ids).loss.backward()
    with_ckpt = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for g in with_ckpt.values())
    model.zero_grad()
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    model(input_ids=token_ids, labels=token_ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, with_ckpt[name])


def test_merge_lora_on_4bit_base_uses_dequantized_weight(tiny_llama, token_ids):
    model = quantize_model(tiny_llama(seed=0))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "down_proj")))
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = (q_proj.base.dequantized_weight(torch.float32) + q_proj.delta_weight()).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="4-bit rounding"):
        merge_lora(model, dtype=torch.bfloat16)
    merged = model.model.layers[0].self_attn.q_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, expected)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_qlora_adapter_is_a_lora_adapter_peft_loads_on_the_16bit_base(tiny_llama, token_ids, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = add_lora(quantize_model(tiny_llama(seed=0)), config)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter", config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    for name, layer in lora_layers(model).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(peft_layer.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(peft_layer.lora_B["default"].weight, layer.lora_B)
    # On the 16-bit base the adapter computes almost what it computed on the 4-bit one: the difference is
    # the quantization error of W0, not a lost or misplaced adapter weight.
    with torch.no_grad():
        ours, theirs = model(input_ids=token_ids).logits, peft_model(input_ids=token_ids).logits
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
