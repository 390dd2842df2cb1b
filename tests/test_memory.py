"""The memory model (minilora.memory) against real models, real optimizers and the QLoRA paper's numbers.

Oracles: transformers' LlamaForCausalLM (parameter counts, saved activations), torch.optim.AdamW and
bitsandbytes' PagedAdamW32bit (optimizer-state bytes), bitsandbytes' quantize_4bit (4-bit storage bytes), peft
(adapter counts).
"""

import math

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from minilora import memory
from minilora.activations import activation_breakdown
from minilora.architecture import PRESETS, count_parameter_tensors, lora_parameter_count, parameter_counts
from minilora.measure import held_tensor_bytes, measure_saved_bytes, measure_training_bytes
from minilora.memory import (
    GB,
    MB,
    bits_per_parameter,
    estimate,
    importance_score_bytes,
    optimizer_state_bytes,
    quant_constant_bytes,
    quantized_weight_bytes,
    training_flops_per_token,
)

transformers.logging.set_verbosity_error()
pytestmark = [pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # transformers' checkpointing renames

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
BATCH, SEQ = 2, 24


def tiny_llama(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).to(dtype)


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 1, "head_dim": 32},
    {"attention_bias": True, "mlp_bias": True, "num_hidden_layers": 3},
])
def test_parameter_counts_equal_transformers(overrides):
    model = tiny_llama(**overrides)
    counts = parameter_counts(model.config)
    assert counts["total"] == n_params(model)
    assert count_parameter_tensors(model.config) == len(list(model.parameters()))
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears)
    assert counts["linear"] == linear


@pytest.mark.parametrize("name", ["llama-7b", "llama-65b", "llama2-70b", "mistral-7b"])
def test_preset_counts_equal_transformers_on_meta_device(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[name]))
    assert parameter_counts(name)["total"] == n_params(model)


def test_tiny_llama_preset_is_the_running_example():
    from minilora.data import build_tiny_llama
    assert parameter_counts("tiny-llama")["total"] == n_params(build_tiny_llama())


def test_published_sizes():
    assert parameter_counts("llama-7b")["total"] == 6_738_415_616
    assert parameter_counts("llama-13b")["total"] == 13_015_864_320
    assert parameter_counts("llama-33b")["total"] == 32_528_943_616
    assert parameter_counts("llama-65b")["total"] == 65_285_660_672


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_count_equals_peft(target):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=target))
    assert lora_parameter_count(model.config, 8, target) == n_params(model, trainable_only=True)


def test_adalora_count_equals_peft():
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(init_r=12, target_r=4, target_modules="all-linear", total_step=100)
    model = get_peft_model(tiny_llama(), config)
    assert lora_parameter_count(model.config, 12, "all-linear", method="adalora") == n_params(model, True)


def test_lora_count_7b_recipe():
    # r = 64 on all seven block linears of LLaMA-7B: 2.37 % of the model (the paper's 26 MB figure is a 0.2 %
    # LoRA).
    n = lora_parameter_count("llama-7b", 64)
    assert n == 159_907_840
    assert estimate("llama-7b", "qlora").lora_params == 2 * n


# ------------------------------------------------------------------------- parameter / gradient / state bytes

def _adamw_step(model, optimizer):
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return measure_training_bytes(model, optimizer)


def test_full_finetune_bytes_exact_vs_torch_adamw():
    model = tiny_llama(torch.float32)
    measured = _adamw_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    report = estimate(model.config, "full", optimizer="adamw", master_weights=False, weight_bytes=4)
    assert report.base_weights == measured["trainable"]
    assert report.gradients == measured["gradients"]
    assert report.optimizer_state == measured["optimizer_state"]


def test_lora_bytes_exact_vs_peft_and_paged_adamw():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    # peft keeps a 16-bit base and (by default) upcasts the adapters to fp32.
    model = get_peft_model(tiny_llama(torch.bfloat16), LoraConfig(r=8, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    measured = _adamw_step(model, bnb.optim.PagedAdamW32bit(trainable, lr=1e-3))
    report = estimate(model.config, "lora", r=8, optimizer="paged_adamw", weight_bytes=2, adapter_bytes=4)
    assert report.base_weights == measured["frozen"]
    assert report.lora_params == measured["trainable"]
    assert report.gradients == measured["gradients"]
    assert report.optimizer_state == measured["optimizer_state"]
    assert optimizer_state_bytes(100, 3, "adamw", param_bytes=2) == 2 * 2 * 100 + 4 * 3


ADALORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _one_step(model):
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(trainable, lr=1e-3).step()
    return sum(p.numel() for p in trainable)


def test_adalora_scores_exact_vs_minilora_allocator():
    # minilora's RankAllocator keeps Ī and Ū in fp32 for every element of P, Λ, Q, plus a copy of every Λ.
    from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora
    model = tiny_llama()
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=ADALORA_TARGETS)
    add_adalora(model, config)
    allocator = RankAllocator(model, config)
    n = _one_step(model)
    allocator.update_and_allocate(0)
    report = estimate(model.config, "adalora", r=6, adapter_bytes=4, allocator="minilora")
    assert report.num_trainable == n
    assert report.importance_scores == held_tensor_bytes(allocator) == 8 * n + 4 * 6 * 7 * 2


def test_adalora_scores_exact_vs_peft_allocator():
    # peft's RankAllocator keeps three tensors like each lora_A, lora_E, lora_B: I, Ī and Ū.
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=ADALORA_TARGETS)
    model = get_peft_model(tiny_llama(), config)  # fp32 adapters on the fp32 tiny model
    n = _one_step(model)
    model.base_model.update_and_allocate(0)
    report = estimate(model.config, "adalora", r=6, adapter_bytes=4, allocator="peft")
    assert report.num_trainable == n
    assert report.importance_scores == held_tensor_bytes(model.base_model.rankallocator) == 3 * 4 * n


def test_adalora_7b_costs_more_than_lora():
    lora, adalora = estimate("llama-7b", "lora"), estimate("llama-7b", "adalora")
    n = adalora.num_trainable
    assert n == 159_907_840 + 64 * 7 * 32
    assert adalora.importance_scores == 3 * 2 * n  # peft's three bf16 tensors per adapter parameter
    # Λ adds 64 parameters per module (2 B weight + 2 B gradient + 8 B paged AdamW state each), the scores 6n.
    assert adalora.total - lora.total == adalora.importance_scores + (2 + 2 + 8) * (n - lora.num_trainable)
    assert importance_score_bytes(10, 2, 3, "minilora", adapter_bytes=2) == 80 + 12
    with pytest.raises(ValueError, match="allocator='bnb'"):
        importance_score_bytes(10, 2, 3, "bnb")


def test_optimizer_state_rules():
    assert optimizer_state_bytes(10, 2, "adamw", param_bytes=2, master_weights=True) == 4 * 10 + 8 * 10 + 8
    assert optimizer_state_bytes(10, 2, "paged_adamw") == 80
    assert optimizer_state_bytes(512, 1, "adamw_8bit") == 2 * 512 + 2 * 4 * 2
    assert optimizer_state_bytes(10, 2, "sgd") == 0
    with pytest.raises(ValueError, match="optimizer='adam'"):
        optimizer_state_bytes(10, 2, "adam")


# ------------------------------------------------------------------------------------------------ 4-bit bytes

@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_storage_bytes_equal_bitsandbytes(double_quant):
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(300, 1000)  # 300,000 weights: 4,688 blocks of 64, the last one partial
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    constants = state.absmax.nbytes
    if double_quant:
        constants += state.state2.absmax.nbytes + state.offset.nbytes
    assert packed.nbytes == math.ceil(weight.numel() / 2)
    assert quant_constant_bytes(weight.numel(), 64, double_quant) == constants


def test_bits_per_parameter():
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(64, double_quant=True, dq_blocksize=256) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits_per_parameter(), 3) == 4.127
    packed, constants = quantized_weight_bytes("llama-65b")  # whole-model average agrees to 4 digits
    bits = 8 * (packed + constants) / parameter_counts("llama-65b")["linear"]
    assert bits == pytest.approx(4.127, abs=5e-4)


# -------------------------------------------------------------------------------------------- the QLoRA paper

def test_paper_65b_full_finetuning_exceeds_780_gb():
    # 16-bit weights + 16-bit grads + fp32 Adam m, v = 12 bytes/param = 783 GB: the paper's "> 780 GB" ...
    pure16 = estimate("llama-65b", "full", optimizer="paged_adamw", master_weights=False)
    states = pure16.base_weights + pure16.gradients + pure16.optimizer_state
    assert states == 12 * 65_285_660_672
    assert 780 * GB < states < 790 * GB
    # ... and with the usual fp32 master copy, 16 bytes/param: more than a terabyte.
    assert estimate("llama-65b", "full").total > 1040 * GB


def test_paper_qlora_fits_65b_in_48gb_and_33b_in_24gb():
    # The paper's setting: batch 1, seq 512, gradient checkpointing, r = 64 on all linears, paged 32-bit
    # AdamW.
    q65 = estimate("llama-65b", "qlora", batch_size=1, seq_len=512)
    q33 = estimate("llama-33b", "qlora", batch_size=1, seq_len=512)
    assert q65.fits(48) and 44 * GB < q65.total < 46 * GB
    assert q33.fits(24) and 23 * GB < q33.total < 24 * GB
    # Neither fits with a 16-bit base, nor without checkpointing at 65B.
    assert not estimate("llama-65b", "lora").fits(80)
    assert not estimate("llama-33b", "lora").fits(48)
    assert not estimate("llama-65b", "qlora", gradient_checkpointing=False, seq_len=2048).fits(48)


def test_paper_double_quant_saves_3gb_at_65b():
    saved = estimate("llama-65b", double_quant=False).quant_constants - estimate("llama-65b").quant_constants
    assert 2.95 * GB < saved < 3.1 * GB


def test_paper_7b_4bit_weights_vs_measured_5048mb():
    # The model predicts 3,866 MB (4-bit linears + constants + 16-bit embeddings/lm_head/norms) - 77 % of the
    # 5,048 MB the paper measured on a GPU, which also holds CUDA context, allocator slack and other buffers.
    report = estimate("llama-7b", "qlora")
    weights = report.base_weights + report.quant_constants
    assert 3_860 * MB < weights < 3_870 * MB
    assert 0.7 < weights / (5_048 * MB) < 0.8


# ------------------------------------------------------------------------------------------------ activations

def _measure(method, target="all-linear", dropout=0.0, checkpointing=False, adapters="peft-bf16"):
    model = tiny_llama(torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model.enable_input_require_grads()  # as gradient checkpointing with a frozen embedding requires
    if adapters == "peft-bf16" and method != "full":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, target_modules=target, lora_dropout=dropout),
                               autocast_adapter_dtype=False)
    elif adapters == "minilora-fp32":  # minilora.lora keeps A, B in fp32 and casts x to fp32 per module
        from minilora.lora import LoraConfig, add_lora
        add_lora(model, LoraConfig(r=8, target_modules=target, lora_dropout=dropout))
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return measure_saved_bytes(model, input_ids=ids, labels=ids, use_cache=False)


@pytest.mark.parametrize("method,target,dropout,adapters", [
    ("full", "all-linear", 0.0, None),
    ("lora", "all-linear", 0.0, "peft-bf16"),
    ("lora", "all-linear", 0.1, "peft-bf16"),
    ("lora", ["q_proj", "v_proj"], 0.0, "peft-bf16"),
    ("lora", "all-linear", 0.1, "minilora-fp32"),
])
def test_activation_formula_equals_saved_bytes(method, target, dropout, adapters):
    # On CPU dropout multiplies by a mask of x's dtype (2 bytes in bf16); on CUDA the mask is bool (1 byte).
    adapter_bytes = 4 if adapters == "minilora-fp32" else 2
    parts = activation_breakdown(TINY, BATCH, SEQ, method, target, r=8, lora_dropout=dropout,
                                 dropout_mask_bytes=2, adapter_bytes=adapter_bytes)
    L = TINY["num_hidden_layers"]
    measured = _measure(method, target, dropout, adapters=adapters)
    assert measured == L * parts["per_layer"] + parts["head"] + parts["rope"]
    # With checkpointing autograd keeps only each block's input (recomputation happens inside backward).
    measured = _measure(method, target, dropout, checkpointing=True, adapters=adapters)
    assert measured == L * parts["layer_input"] + parts["head"]


def test_checkpointing_shrinks_activations():
    report = estimate("llama-7b", "qlora", seq_len=2048)
    assert report.activations < report.activations_without_checkpointing / 5
    assert report.total == sum(report.components().values())
    assert "| total |" in report.table()


# ------------------------------------------------------------------------------------------------- throughput

def test_flops_per_token():
    assert training_flops_per_token(10, "full", gradient_checkpointing=False) == 60
    assert training_flops_per_token(10, "qlora", gradient_checkpointing=False) == 40
    assert training_flops_per_token(10, "qlora", gradient_checkpointing=True) == 60
    assert memory.mfu(1000, 6e9, 1e15) == pytest.approx(0.006)


# -------------------------------------------------------------------------------------------------- bad input

def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="llama-8b"):
        estimate("llama-8b")
    with pytest.raises(ValueError, match="method='qlora4'"):
        estimate("llama-7b", "qlora4")
    with pytest.raises(ValueError, match="target"):
        lora_parameter_count("llama-7b", 8, ["q"])
    with pytest.raises(ValueError, match="r=0"):
        lora_parameter_count("llama-7b", 0)
    with pytest.raises(ValueError, match="missing"):
        estimate({"hidden_size": 8})
    with pytest.raises(TypeError):
        estimate(42)
