"""Exercise 8 tests: the interview self-test, checked against what minilora computes.

Run against your answers (exercises/learner/interview.py):   .venv/bin/python -m pytest exercises/test_08_interview.py
Run against the book's answers:                             ... --impl=reference

Chapter 8 has no module of its own in minilora, so `--impl=reference` loads exercises/solutions/interview.py
(which computes each answer with minilora) instead of `minilora.interview`; the learner's file is found as
for every other chapter (`--learner-dir` works too).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import minilora.memory as memory
from minilora.double_quant import QuantizedWeight
from minilora.lora import LoRALinear

SOLUTIONS = Path(__file__).resolve().parent / "solutions" / "interview.py"


@pytest.fixture(scope="module")
def interview(request, implementation):
    if request.config.getoption("--impl") == "reference":
        spec = importlib.util.spec_from_file_location("exercise_solutions_interview", SOLUTIONS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return implementation("interview")


def lora_layer_params(d, k, r):
    """The oracle: trainable parameters of minilora's LoRALinear on a d x k (out x in) layer."""
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(k, d, bias=False), r=r)
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("d, k, r", [(4096, 4096, 8), (11008, 4096, 16), (48, 64, 3), (1024, 1024, 8)])
def test_lora_parameter_count(interview, d, k, r):
    assert interview.lora_parameter_count(d, k, r) == lora_layer_params(d, k, r)


def test_lora_parameter_count_whole_models(interview):
    assert interview.lora_parameter_count(4096, 4096, 8) == 65_536
    # LLaMA-7B, r = 8 on q_proj and v_proj (32 layers, 4096 x 4096 each), as the memory model counts it
    assert 32 * 2 * interview.lora_parameter_count(4096, 4096, 8) == memory.lora_parameter_count(
        "llama-7b", 8, ["q_proj", "v_proj"])
    # OPT-350m, r = 8 on q_proj and v_proj: 24 layers x 2 modules of 1024 x 1024 -> peft's 786,432
    assert 24 * 2 * interview.lora_parameter_count(1024, 1024, 8) == 786_432


@pytest.mark.parametrize("d, k, r", [(4096, 4096, 8), (11008, 4096, 64), (64, 48, 4)])
def test_lora_fraction(interview, d, k, r):
    assert interview.lora_fraction(d, k, r) == pytest.approx(lora_layer_params(d, k, r) / (d * k), rel=1e-12)
    assert interview.lora_fraction(4096, 4096, 8) == pytest.approx(0.00390625, rel=1e-12)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_param_formula(interview, blocksize, double_quant):
    assert interview.bits_per_param(blocksize, double_quant) == pytest.approx(
        memory.bits_per_parameter(blocksize, double_quant), rel=1e-12)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_param_matches_stored_bytes(interview, double_quant):
    torch.manual_seed(0)
    stored = QuantizedWeight.from_float(torch.randn(256, 4096), blocksize=64, double_quant=double_quant)
    # a 1M-weight tensor: the per-tensor extras (one offset, a partial second-level block) are < 1e-4 bit
    assert interview.bits_per_param(64, double_quant) == pytest.approx(stored.bits_per_param, abs=1e-4)
    assert interview.bits_per_param(64, False) == pytest.approx(4.5)
    assert interview.bits_per_param(64, True) == pytest.approx(4.126953125)


def test_dq_saving_bits(interview):
    assert interview.dq_saving_bits(64) == pytest.approx(0.373046875)
    assert interview.dq_saving_bits(128, 256) == pytest.approx(
        memory.bits_per_parameter(128, False) - memory.bits_per_parameter(128, True), rel=1e-12)
    # over LLaMA-65B's block linears, tensor by tensor: about 3 GB, not the "0.5 bit" 4 GB
    _, plain = memory.quantized_weight_bytes("llama-65b", double_quant=False)
    _, dq = memory.quantized_weight_bytes("llama-65b", double_quant=True)
    linear = memory.parameter_counts("llama-65b")["linear"]
    assert interview.dq_saving_bits(64) == pytest.approx(8 * (plain - dq) / linear, rel=1e-4)


def test_weight_gb(interview):
    n65 = memory.parameter_counts("llama-65b")["total"]
    assert interview.weight_gb(n65, 16) == pytest.approx(2 * n65 / memory.GB, rel=1e-12)
    assert round(interview.weight_gb(n65, 16), 2) == 130.57
    # the 4-bit block linears of 65B with double quantization, as the memory model stores them tensor by tensor
    linear = memory.parameter_counts("llama-65b")["linear"]
    packed, constants = memory.quantized_weight_bytes("llama-65b", double_quant=True)
    assert interview.weight_gb(linear, interview.bits_per_param(64, True)) == pytest.approx(
        (packed + constants) / memory.GB, rel=1e-6)


@pytest.mark.parametrize("master_weights", [False, True])
def test_adam_state_bytes_per_param(interview, master_weights):
    assert interview.adam_state_bytes_per_param(master_weights) == memory.optimizer_state_bytes(
        10**6, 0, "paged_adamw", master_weights=master_weights) // 10**6


def test_adam_state_matches_torch_adamw(interview):
    layer = nn.Linear(64, 32, bias=False)  # fp32 parameters: torch's AdamW keeps fp32 m and v
    layer(torch.randn(4, 64)).sum().backward()
    optimizer = torch.optim.AdamW(layer.parameters())
    optimizer.step()
    state = optimizer.state[layer.weight]
    moments = state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
    assert interview.adam_state_bytes_per_param(False) * layer.weight.numel() == moments


@pytest.mark.parametrize("master_weights", [False, True])
def test_full_finetune_gb(interview, master_weights):
    report = memory.estimate("llama-65b", "full", master_weights=master_weights)
    expected = (report.base_weights + report.gradients + report.optimizer_state) / memory.GB
    assert interview.full_finetune_gb(report.num_parameters, master_weights) == pytest.approx(expected, rel=1e-9)
    if not master_weights:
        assert round(interview.full_finetune_gb(report.num_parameters, False), 2) == 783.43  # the paper's > 780 GB


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_training_flops_per_token(interview, method):
    n7 = memory.parameter_counts("llama-7b")["total"]
    assert interview.training_flops_per_token(n7, method) == memory.training_flops_per_token(
        n7, method, gradient_checkpointing=False)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_flops_counted_by_torch(interview, method):
    tokens, layer = 8, nn.Linear(64, 32, bias=False)
    layer.weight.requires_grad_(method == "full")  # LoRA: the base weight is frozen
    x = torch.randn(tokens, 64, requires_grad=True)  # lower layers still need the input gradient
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert interview.training_flops_per_token(layer.weight.numel(), method) == counter.get_total_flops() // tokens


# --- The PEFT family and bitsandbytes' rules, checked against peft and bitsandbytes themselves ----------------

def small_llama(num_key_value_heads=4):
    """A Llama shape small enough to build in a blink on the meta device (no memory allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=num_key_value_heads, vocab_size=100)
    with torch.device("meta"):
        return config, LlamaForCausalLM(config)


def peft_trainable(peft_config, num_key_value_heads=4):
    from peft import get_peft_model
    config, model = small_llama(num_key_value_heads)
    with torch.device("meta"):
        model = get_peft_model(model, peft_config)
    return config, sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("r", [4, 16, 64])
def test_rslora_scaling_is_peft_s(interview, r):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=r, lora_alpha=16, target_modules=["0"],
                                                                      use_rslora=True))
    assert interview.rslora_scaling(16, r) == pytest.approx(model.base_model.model[0].scaling["default"])
    assert interview.rslora_scaling(16, 64) == pytest.approx(2.0)


@pytest.mark.parametrize("tokens", [1, 20])
def test_prompt_tuning_parameter_count(interview, tokens):
    from peft import PromptTuningConfig
    config, trainable = peft_trainable(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    assert interview.prompt_tuning_parameter_count(tokens, config.hidden_size) == trainable


@pytest.mark.parametrize("tokens", [1, 20])
def test_prefix_tuning_parameter_count(interview, tokens):
    from peft import PrefixTuningConfig
    config, trainable = peft_trainable(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens),
                                       num_key_value_heads=4)  # no grouped-query attention: kv width = hidden
    assert interview.prefix_tuning_parameter_count(tokens, config.num_hidden_layers, config.hidden_size) == trainable


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_ia3_parameter_count(interview, kv_heads):
    from peft import IA3Config
    config, trainable = peft_trainable(IA3Config(task_type="CAUSAL_LM"), num_key_value_heads=kv_heads)
    kv_dim = kv_heads * config.hidden_size // config.num_attention_heads
    assert interview.ia3_parameter_count(config.num_hidden_layers, kv_dim, config.intermediate_size) == trainable


@pytest.mark.parametrize("numel", [8 * 4096, 8 * 11008, 99_999, 100_000, 64 * 4096])
def test_is_paged_by_bitsandbytes(interview, numel, monkeypatch):
    # Ask bitsandbytes' own rule (Optimizer8bit.get_state_buffer) for a parameter on the meta device, which is
    # not a CPU tensor; the CUDA allocation it would make for a paged state is replaced by a recording stub.
    import bitsandbytes.functional as F
    from bitsandbytes.optim import PagedAdamW32bit
    paged = []
    monkeypatch.setattr(F, "get_paged", lambda *shape, **kw: paged.append(shape) or torch.empty(0))
    monkeypatch.setattr(F, "fill", lambda *args, **kw: None)
    param = nn.Parameter(torch.empty(numel, device="meta"))
    PagedAdamW32bit([param]).get_state_buffer(param)
    assert interview.is_paged_by_bitsandbytes(numel) == bool(paged)


@pytest.mark.parametrize("shape", [(64, 64), (256, 1000), (1000, 1000)])
def test_adam_8bit_state_bytes(interview, shape):
    import bitsandbytes as bnb
    param = nn.Parameter(torch.randn(*shape))
    param.grad = torch.randn_like(param)
    optimizer = bnb.optim.AdamW8bit([param])
    optimizer.step()
    state = optimizer.state[param]
    held = sum(state[k].nbytes for k in ("state1", "state2", "absmax1", "absmax2"))  # without the code tables
    assert interview.adam_8bit_state_bytes(param.numel()) == held
