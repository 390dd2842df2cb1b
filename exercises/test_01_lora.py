"""Exercise 1 (Chapter 1, LoRA): tests for exercises/learner/lora.py.

    .venv/bin/python -m pytest exercises/test_01_lora.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_01_lora.py --impl=reference    # the book's solution

Start with test_shapes_and_freezing and work down; each test says in its name what it checks.
"""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def lora(implementation):
    return implementation("lora")


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def layer_with_random_B(lora, d_in=20, d_out=12, r=4, lora_alpha=8, **kwargs):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(d_in, d_out), r=r, lora_alpha=lora_alpha, **kwargs)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d_out, r))   # as if trained for a while
    return layer


def test_shapes_and_freezing(lora):
    base = nn.Linear(20, 12)
    layer = lora.LoRALinear(base, r=4, lora_alpha=16)
    assert layer.lora_A.shape == (4, 20)       # A: (r, in_features)
    assert layer.lora_B.shape == (12, 4)       # B: (out_features, r)
    assert layer.scaling == 4.0                # lora_alpha / r
    assert layer.base is base and not layer.merged
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 4 * (20 + 12)   # r (d + k)


def test_kaiming_init(lora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(400, 300), r=64)
    A, bound = layer.lora_A.detach(), 1 / math.sqrt(400)
    assert torch.count_nonzero(layer.lora_B) == 0                  # B = 0: the model starts unchanged
    assert 0.99 * bound < A.abs().max() <= bound                   # U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.01 * bound


def test_gaussian_init(lora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(400, 300), r=16, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 16) < 0.02 / 16    # std 1/r
    assert torch.count_nonzero(layer.lora_B) == 0


def test_forward_at_init_equals_base(lora):
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = lora.LoRALinear(base, r=4)
    x = torch.randn(3, 5, 20)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_forward_formula(lora):
    layer = layer_with_random_B(lora, lora_alpha=6)
    x = torch.randn(3, 20)
    W0, b = layer.base.weight, layer.base.bias
    expected = x @ W0.T + b + (6 / 4) * (x @ layer.lora_A.T @ layer.lora_B.T)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dropout_only_on_the_bypass(lora):
    layer = layer_with_random_B(lora, lora_dropout=0.5)
    x = torch.randn(64, 20)
    with torch.no_grad():
        layer.train()
        noisy = layer(x)
        layer.eval()
        clean = layer(x)
        assert not torch.allclose(noisy, clean, atol=1e-3)         # dropout does act in training ...
        layer.lora_B.zero_()
        layer.train()
        assert torch.equal(layer(x), layer.base(x))                # ... but never on the base path


def test_bf16_input(lora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2)
    out = layer(torch.randn(4, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_delta_weight(lora):
    layer = layer_with_random_B(lora, lora_alpha=3)
    delta = layer.delta_weight()
    assert delta.shape == (12, 20)
    assert torch.allclose(delta, 0.75 * layer.lora_B @ layer.lora_A, atol=1e-6)
    assert torch.linalg.matrix_rank(delta.detach()) == 4            # rank r, not min(d, k)


def test_merge_and_unmerge(lora):
    layer = layer_with_random_B(lora)
    x = torch.randn(3, 20)
    W0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert layer.merged
        assert torch.allclose(layer.base.weight, W0 + layer.delta_weight(), atol=1e-6)
        assert torch.allclose(layer(x), before, atol=1e-5)             # same outputs, one matmul
        assert torch.allclose(layer(x), layer.base(x))                 # merged forward is the base alone
        layer.unmerge()
        assert not layer.merged
        assert torch.allclose(layer.base.weight, W0, atol=1e-6)
        assert torch.allclose(layer(x), before, atol=1e-5)


def test_merge_twice_is_an_error(lora):
    layer = layer_with_random_B(lora)
    layer.merge()
    with pytest.raises(RuntimeError):
        layer.merge()


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(lora, r):
    with pytest.raises(ValueError):
        lora.LoRALinear(nn.Linear(20, 12), r=r)                    # a rank is an integer >= 1


def test_add_lora_on_a_llama(lora):
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    assert lora.add_lora(model, lora.LoraConfig(r=4, target_modules=("q_proj", "v_proj"))) is model
    wrapped = [name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # q_proj is 32 -> 32 and v_proj 32 -> 16 (2 key/value heads): 2 layers x (4·(32+32) + 4·(32+16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 896
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)                  # B = 0: nothing changed yet
