"""Exercise (Chapter 1, several adapters): tests for exercises/learner/switching.py.

    .venv/bin/python -m pytest exercises/test_01_switching.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_01_switching.py --impl=reference    # the book's solution

The model with two adapters is built with minilora's own add_lora; you write how to switch between them.
Switching computes exactly what a model with only that adapter computes, so outputs are compared exactly.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.lora import LoraConfig, add_lora, lora_layers

A = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
B = LoraConfig(r=2, lora_alpha=4, target_modules=("v_proj", "down_proj"))
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def switching(implementation):
    return implementation("switching")


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def trained(model, name, seed):
    """Give adapter `name` nonzero B matrices, as training would, and A from `seed` too (so that two models
    built apart hold the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapter_names():
                slot = layer.adapter(name)
                slot.lora_A.copy_(torch.randn(slot.lora_A.shape, generator=gen) * 0.1)
                slot.lora_B.copy_(torch.randn(slot.lora_B.shape, generator=gen) * 0.1)
    return model


def two_adapters():
    model = trained(add_lora(tiny_llama(), A, "a"), "a", 1)
    return trained(add_lora(model, B, "b"), "b", 2)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_active_adapter(switching):
    model = two_adapters()
    assert switching.active_adapter(model) == "a"          # the first adapter; "b" waits, inactive
    for layer in lora_layers(model).values():
        layer.disabled = True
    assert switching.active_adapter(model) is None


def test_set_adapter_computes_what_a_model_with_only_that_adapter_computes(switching):
    model = two_adapters()
    only_b = trained(add_lora(tiny_llama(), B, "b"), "b", 2)
    switching.set_adapter(model, "b")
    assert torch.equal(logits(model), logits(only_b))
    only_a = trained(add_lora(tiny_llama(), A, "a"), "a", 1)
    switching.set_adapter(model, "a")
    assert torch.equal(logits(model), logits(only_a))


def test_a_layer_without_the_adapter_computes_only_its_base(switching):
    model = two_adapters()
    switching.set_adapter(model, "b")
    q_proj = model.model.layers[0].self_attn.q_proj             # only "a" adapts q_proj
    x = torch.randn(3, 32)
    assert torch.equal(q_proj(x), q_proj.base(x))
    assert switching.active_adapter(model) == "b"


def test_only_the_active_adapter_trains(switching):
    model = two_adapters()
    switching.set_adapter(model, "b")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{m}.{k}" for i in (0, 1) for m in ("self_attn.v_proj", "mlp.down_proj")
                         for k in ("lora_A", "lora_B")}


def test_unknown_adapter_is_an_error(switching):
    with pytest.raises(ValueError, match="'c'"):
        switching.set_adapter(two_adapters(), "c")


def test_disable_adapter_gives_the_base_model_and_restores_the_layers(switching):
    model = two_adapters()
    switching.set_adapter(model, "b")
    before = [layer.disabled for layer in lora_layers(model).values()]
    with switching.disable_adapter(model):
        assert torch.equal(logits(model), logits(tiny_llama()))
    assert [layer.disabled for layer in lora_layers(model).values()] == before
    with pytest.raises(KeyError), switching.disable_adapter(model):
        raise KeyError("an error inside the block")
    assert [layer.disabled for layer in lora_layers(model).values()] == before
