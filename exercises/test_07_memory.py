"""Exercise 7 tests: the memory model's counts against transformers, peft, torch's AdamW and bitsandbytes.

Run against your stubs (exercises/learner/memory.py):   .venv/bin/python -m pytest exercises/test_07_memory.py
Run against the book's solution:                       ... --impl=reference
"""

import math

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

transformers.logging.set_verbosity_error()

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


@pytest.fixture
def memory(implementation):
    return implementation("memory")


def tiny_llama(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).to(dtype)


def test_linear_shapes_match_the_model(memory):
    model = tiny_llama(num_key_value_heads=1)
    shapes = memory.linear_shapes(model.config)
    layer = model.model.layers[0]
    for name, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
        if isinstance(module, torch.nn.Linear):
            assert shapes[name] == tuple(module.weight.shape), name
    assert len(shapes) == 7


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_exact(memory, tied):
    model = tiny_llama(tie_word_embeddings=tied)
    counts = memory.parameter_counts(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["lm_head"] == (0 if tied else TINY["vocab_size"] * TINY["hidden_size"])
    assert memory.parameter_counts(LLAMA_7B)["total"] == 6_738_415_616


def test_lora_parameter_count(memory):
    from peft import LoraConfig, get_peft_model
    for target in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=target))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert memory.lora_parameter_count(model.config, 4, target) == trainable
    assert memory.lora_parameter_count(LLAMA_7B, 64) == 159_907_840  # the QLoRA recipe at 7B
    assert memory.lora_parameter_count(LLAMA_7B, 64, method="adalora") == 159_907_840 + 64 * 7 * 32
    with pytest.raises(ValueError):
        memory.lora_parameter_count(LLAMA_7B, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_bytes_equal_torch_adamw(memory, dtype):
    model = tiny_llama(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    params = list(model.parameters())
    n, element = sum(p.numel() for p in params), params[0].element_size()
    assert memory.optimizer_state_bytes(n, len(params), "adamw", param_bytes=element) == state


def test_optimizer_state_rules(memory):
    N = 65_285_660_672  # LLaMA-65B
    assert memory.optimizer_state_bytes(N, 0, "paged_adamw") == 8 * N
    assert memory.optimizer_state_bytes(N, 0, "paged_adamw", master_weights=True) == 12 * N  # ZeRO's K = 12
    assert memory.optimizer_state_bytes(N, 0, "sgd") == 0
    with pytest.raises(ValueError):
        memory.optimizer_state_bytes(N, 0, "lion")


@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_constant_bytes_equal_bitsandbytes(memory, double_quant):
    from bitsandbytes.functional import quantize_4bit
    weight = torch.randn(300, 1000)  # 4,688 blocks of 64, the last one partial
    _, state = quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = state.absmax.nbytes + (state.state2.absmax.nbytes + state.offset.nbytes if double_quant else 0)
    assert memory.quant_constant_bytes(weight.numel(), 64, double_quant) == expected


def test_nf4_dq_costs_4_127_bits(memory):
    n = 4096 * 11008  # one LLaMA-7B MLP matrix
    bits = 4 + 8 * memory.quant_constant_bytes(n, 64, True) / n
    assert math.isclose(bits, 4.127, abs_tol=5e-4)
    assert 4 + 8 * memory.quant_constant_bytes(n, 64, False) / n == 4.5
