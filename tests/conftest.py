"""Shared fixtures for tests/: a tiny transformers Llama built from a config (no downloads)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _tiny_llama(seed: int = 0, tie_word_embeddings: bool = False, dtype=torch.float32, hidden_size: int = 32,
                intermediate_size: int = 64) -> LlamaForCausalLM:
    """A 2-layer Llama, by default hidden 32 (q_proj 32->32, v_proj 32->16), random weights from `seed`."""
    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    """Factory: `tiny_llama(seed=0, tie_word_embeddings=False, dtype=torch.float32, hidden_size=32,
    intermediate_size=64)` builds a fresh model."""
    return _tiny_llama


@pytest.fixture
def token_ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eager_bitsandbytes():
    """bitsandbytes torch.compile's its pure-PyTorch dequantize fallback (odd last dimensions): ~25 s of
    compilation per shape on CPU. Run it eagerly; compiling does not change what it computes."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before
