"""The contract between the core (minilora/core/: each chapter's idea, what the chapters show) and the package
built on it (minilora/*.py: peft's options, several adapters, fast kernels, checks): every core/production pair
computes the same numbers. Bit for bit where the operation is integer-defined or the same float operations run
(compared as raw bits, so -0.0 and NaN are not waved through); where the package deliberately runs other float
operations (a bf16 input gradient in another layout), with the tolerance derived in the test.

The package's own tests compare it with peft and bitsandbytes; these close the chain to the core, and test the
core against peft and bitsandbytes directly where that is cheap.
"""

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path

import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitwise import BF16_EPS, bits
from torch import nn

import minilora.core.adalora as core_adalora
import minilora.core.double_quant as core_dq
import minilora.core.lora as core_lora
import minilora.core.memory as core_memory
import minilora.core.nf4 as core_nf4
import minilora.core.paged as core_paged
import minilora.core.qlora as core_qlora
from minilora import adalora, architecture, codes, double_quant, loop, lora, memory, native, nf4, paged, qlora


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(bits(a), bits(b))


def assert_within_bf16_roundings(ours: torch.Tensor, core: torch.Tensor, grad_output, weight, roundings: int = 1):
    """x.grad = ∂L/∂y · W with the base's product in another layout (minilora.frozen_linear): both accumulate the
    same out_features products in float32, in another order (apart by at most out_features · 2⁻²⁴ · Σ|g·w|, the
    standard bound), and then round to bf16. Each of the two values moves by at most 2⁻⁸ (bf16's unit roundoff)
    of itself, so one rounding can part them by 2 · 2⁻⁸ = 2⁻⁷ of Σ|g·w| (two near-equal values may land on
    neighbouring bf16 numbers, one ulp apart). One rounding for a lone product; two when the base's share is
    then added to the bypass's."""
    k = grad_output.shape[-1]
    bound = (roundings * 2 * BF16_EPS + k * 2.0**-24) * (grad_output.abs().float() @ weight.abs().float())
    assert ((ours.float() - core.float()).abs() <= bound.reshape(ours.shape)).all()


# ----------------------------------------------------------------------------------------------------
# Chapter 1: LoRA
# ----------------------------------------------------------------------------------------------------


def test_lora_config_is_the_core_config_plus_peft_options():
    assert issubclass(lora.LoraConfig, core_lora.LoraConfig)
    core_fields = core_lora.LoraConfig.__dataclass_fields__
    fields = list(lora.LoraConfig.__dataclass_fields__)
    assert fields[:len(core_fields)] == list(core_fields)
    assert all(getattr(lora.LoraConfig(), f) == getattr(core_lora.LoraConfig(), f) for f in core_fields)


def lora_pair(r=4, lora_alpha=6, lora_dropout=0.0, dtype=torch.float32, init="kaiming"):
    """A core and a production LoRALinear on equal copies of one base, trained B (equal), same seed."""
    layers = []
    for make in (core_lora.LoRALinear, lora.LoRALinear):
        torch.manual_seed(0)
        base = nn.Linear(20, 12).to(dtype)
        torch.manual_seed(1)
        layer = make(base, r, lora_alpha, lora_dropout, init)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(12, r, generator=torch.Generator().manual_seed(2)))
        layers.append(layer)
    return layers


# lora_alpha 6 at r 4: scaling 1.5, the core's order; 4, 8, 1: scalings 1, 2, 1/4, which minilora.lora applies
# to the r-wide x Aᵀ instead (exact for a power of two): the same bits must come out.
@pytest.mark.parametrize("init, lora_alpha", [("kaiming", 6), ("gaussian", 6), ("kaiming", 4), ("kaiming", 8),
                                              ("gaussian", 1)])
def test_lora_layer_equals_core_bit_for_bit(init, lora_alpha):
    core, ours = lora_pair(init=init, lora_alpha=lora_alpha)
    assert isinstance(ours, core_lora.LoRALinear)
    for name in ("lora_A", "lora_B"):
        assert_same(getattr(ours, name), getattr(core, name))
    assert ours.scaling == core.scaling == lora_alpha / 4
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(3))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [layer(x_) for layer, x_ in zip((core, ours), xs)]
    assert_same(outs[1], outs[0])
    for out in outs:
        out.square().sum().backward()
    assert_same(xs[1].grad, xs[0].grad)
    for name in ("lora_A", "lora_B"):
        assert_same(getattr(ours, name).grad, getattr(core, name).grad)
    assert_same(ours.delta_weight(), core.delta_weight())
    for layer in (core, ours):
        layer.merge()
    assert_same(ours.base.weight, core.base.weight)
    with torch.no_grad():
        assert_same(ours(x), core(x))
    for layer in (core, ours):
        layer.unmerge()
    assert_same(ours.base.weight, core.base.weight)


@pytest.mark.parametrize("lora_alpha", [6, 8])
def test_lora_layer_bf16_forward_equal_and_input_gradient_within_two_roundings(lora_alpha):
    core, ours = lora_pair(dtype=torch.bfloat16, lora_alpha=lora_alpha)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grad = torch.randn(4, 12, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [layer(x_) for layer, x_ in zip((core, ours), xs)]
    assert_same(outs[1], outs[0])  # F.linear either way: the same float operations
    for out in outs:
        out.backward(grad)
    # The base's share of x.grad may take minilora.frozen_linear's layout; the bypass's share is the same ops.
    magnitude = core.base.weight.detach().float().abs() + core.delta_weight().detach().abs()
    assert_within_bf16_roundings(xs[1].grad, xs[0].grad, grad, magnitude, roundings=2)


def test_lora_dropout_draws_the_same_mask():
    core, ours = lora_pair(lora_dropout=0.5)
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(6))
    outs = []
    for layer in (core, ours):
        layer.train()
        torch.manual_seed(7)
        outs.append(layer(x))
    assert_same(outs[1], outs[0])


def test_target_rule_is_the_core_rule(tiny_llama):
    model = tiny_llama()
    for targets in (["q_proj", "v_proj"], ["mlp.up_proj", "o_proj"], ["layers.1.self_attn.k_proj"]):
        assert lora.find_target_modules(model, targets) == core_lora.find_target_modules(model, targets)
    assert lora.find_target_modules(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_add_lora_equals_core_and_trains_the_same(tiny_llama, token_ids):
    models = []
    for module, config in ((core_lora, core_lora.LoraConfig), (lora, lora.LoraConfig)):
        model = tiny_llama()
        torch.manual_seed(0)
        module.add_lora(model, config(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
        models.append(model)
    core, ours = models
    assert ours.state_dict().keys() == core.state_dict().keys()
    for (name, p), (_, q) in zip(ours.named_parameters(), core.named_parameters()):
        assert_same(p, q)
        assert p.requires_grad == q.requires_grad == ("lora_" in name), name
    for model in models:  # one AdamW step each on the same batch: B moves away from 0
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        model(input_ids=token_ids, labels=token_ids).loss.backward()
        optimizer.step()
        model.eval()
    for p, q in zip(ours.parameters(), core.parameters()):
        assert_same(p, q)
    with torch.no_grad():
        assert_same(ours(token_ids).logits, core(token_ids).logits)


def test_core_add_lora_trains_what_peft_trains(tiny_llama):
    import peft

    core = core_lora.add_lora(tiny_llama(), core_lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    count = sum(p.numel() for p in core.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad) == 896


# ----------------------------------------------------------------------------------------------------
# Chapter 2: AdaLoRA
# ----------------------------------------------------------------------------------------------------


def test_adalora_functions_and_config_are_the_core_ones():
    for name in ("budget_schedule", "update_importance", "triplet_score", "mask_to_budget"):
        assert getattr(adalora, name) is getattr(core_adalora, name)
    assert issubclass(adalora.AdaLoraConfig, core_adalora.AdaLoraConfig)
    assert issubclass(adalora.RankAllocator, core_adalora.RankAllocator)
    assert list(adalora.AdaLoraConfig.__dataclass_fields__) == list(core_adalora.AdaLoraConfig.__dataclass_fields__)


def test_svd_layer_equals_core_bit_for_bit():
    layers = []
    for make in (core_adalora.SVDLinear, adalora.SVDLinear):
        torch.manual_seed(0)
        layer = make(nn.Linear(20, 12), r=4, lora_alpha=8)
        with torch.no_grad():
            layer.lora_E.copy_(torch.randn(4, 1, generator=torch.Generator().manual_seed(1)))
        layers.append(layer)
    core, ours = layers
    for name in ("lora_A", "lora_E", "lora_B", "ranknum", "rank_mask"):
        assert_same(getattr(ours, name), getattr(core, name))
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    assert_same(ours(x), core(x))
    assert_same(ours.delta_weight(), core.delta_weight())


def test_rank_allocator_equals_core_step_by_step(tiny_llama, token_ids):
    config = adalora.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                                   target_modules=("q_proj", "v_proj"))
    runs = []
    for allocator_class in (core_adalora.RankAllocator, adalora.RankAllocator):
        torch.manual_seed(0)
        model = adalora.add_adalora(tiny_llama().train(), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        runs.append((model, allocator_class(model, config), optimizer))
    (core_model, core_alloc, _), (model, alloc, _) = runs
    penalty = core_adalora.orthogonal_penalty
    assert_same(adalora.orthogonal_penalty(model), penalty(core_model))
    for step in range(10):
        budgets = []
        for model_, allocator, optimizer in runs:
            loss = model_(input_ids=token_ids, labels=token_ids).loss + config.orth_reg_weight * penalty(model_)
            loss.backward()
            optimizer.step()
            budgets.append(allocator.update_and_allocate(step))
            optimizer.zero_grad()
        assert budgets[0] == budgets[1], step
        for (name, a), (_, b) in zip(core_alloc.layers.items(), alloc.layers.items()):
            assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(bits(a.lora_E), bits(b.lora_E)), (step, name)
    assert budgets == [8, 8] and core_alloc.pattern_fixed and alloc.pattern_fixed


# ----------------------------------------------------------------------------------------------------
# Chapter 3: NF4 and blockwise 4-bit quantization
# ----------------------------------------------------------------------------------------------------


def test_levels_are_the_core_levels():
    for name in ("nf4_code", "fp4_code", "int4_code", "code_midpoints"):
        assert getattr(nf4, name) is getattr(core_nf4, name)
    assert nf4.NF4_OFFSET == core_nf4.NF4_OFFSET
    for quant_type in codes.QUANT_TYPES:
        assert_same(codes.get_code(quant_type), core_nf4.get_code(quant_type))
    for quant_type in ("nf4", "fp4"):  # the core against bitsandbytes' tables, directly
        theirs = bnb_f.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(core_nf4.get_code(quant_type), theirs)  # fp4's -0.0 equals bitsandbytes' +0.0


def test_packing_equals_core():
    q = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert_same(nf4.pack_4bit(q), core_nf4.pack_4bit(q))
    assert_same(nf4.unpack_4bit(core_nf4.pack_4bit(q), 1001), core_nf4.unpack_4bit(core_nf4.pack_4bit(q), 1001))


QUANTIZE_CASES = [("nf4", torch.bfloat16, 64, 3 * 1001), ("fp4", torch.float32, 32, 4096 + 7),
                  ("int4", torch.float16, 256, 999), ("nf4", torch.float64, 4096, 5000),
                  ("nf4", torch.float32, 64, 2 * nf4.CHUNK_ELEMENTS + 64 * 3 + 1)]  # several kernel steps


@pytest.mark.parametrize("quant_type, dtype, blocksize, n", QUANTIZE_CASES)
def test_quantize_equals_core_bit_for_bit(quant_type, dtype, blocksize, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    expected = core_nf4.quantize_4bit(x, blocksize, quant_type)
    for quantize in (nf4.quantize_4bit, nf4.quantize_4bit_reference):
        produced = quantize(x, blocksize, quant_type)
        assert_same(produced[0], expected[0])
        assert_same(produced[1], expected[1])


def test_core_quantize_equals_bitsandbytes():
    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    packed, absmax = core_nf4.quantize_4bit(x, 64, "nf4")
    theirs, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert_same(packed, theirs.reshape(-1))
    assert_same(absmax, state.absmax)


@pytest.mark.parametrize("native_decode", [True, False])
@pytest.mark.parametrize("quant_type, dtype, blocksize, n", QUANTIZE_CASES)
def test_dequantize_equals_core_bit_for_bit(quant_type, dtype, blocksize, n, native_decode, monkeypatch):
    if not native_decode:  # the eager kernel, as on a machine without the compiled decode
        monkeypatch.setattr(native, "fused_decode", lambda *args: None)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, absmax = core_nf4.quantize_4bit(x, blocksize, quant_type)
    for shape in ((n,),) if n % 2 else ((n,), (2, n // 2)):
        expected = core_nf4.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
        assert_same(nf4.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype), expected)
        assert_same(nf4.dequantize_4bit_reference(packed, absmax, shape, blocksize, quant_type, dtype), expected)


# ----------------------------------------------------------------------------------------------------
# Chapter 4: double quantization
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_blocks", [1, 255, 3000])
def test_double_quantization_equals_core_bit_for_bit(n_blocks):
    assert double_quant.dynamic_map is core_dq.dynamic_map
    assert_same(core_dq.dynamic_map(), bnb_f.create_dynamic_map())  # the core against bitsandbytes
    weights = torch.randn(n_blocks, 64, generator=torch.Generator().manual_seed(n_blocks)) * 0.02
    absmax = weights.abs().amax(dim=1)
    ours, core = double_quant.double_quantize(absmax), core_dq.double_quantize(absmax)
    for a, b in zip(ours, core):
        assert_same(a, b)
    assert_same(double_quant.double_dequantize(*ours), core_dq.double_dequantize(*core))


# ----------------------------------------------------------------------------------------------------
# Chapter 5: paged AdamW
# ----------------------------------------------------------------------------------------------------


def core_moments(optimizer: core_paged.PagedAdamW, p: torch.Tensor) -> torch.Tensor:
    """(2, numel) m and v of `p`, gathered from the core optimizer's pool and host store."""
    state = optimizer.state[p]
    pages = []
    for page in range(state["first_page"], state["first_page"] + state["num_pages"]):
        in_pool = page in optimizer.pool
        pages.append(optimizer.slots[optimizer.pool.slot_of[page]] if in_pool else optimizer.host[page])
    return torch.cat(pages, dim=1)[:, : p.numel()]


def test_paged_adamw_equals_core_bit_for_bit():
    assert paged.adamw_update_page is core_paged.adamw_update_page and paged.LRUPool is core_paged.LRUPool
    shapes = [(40, 30), (7,), (3000,), (16, 64)]  # 1200 and 3000 elements: several 512-element pages each
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    settings = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, page_bytes=4096,
                    device_budget_bytes=3 * 4096)  # three pages: pages leave and come back every step
    runs = []
    for optimizer_class in (core_paged.PagedAdamW, paged.PagedAdamW):
        params = [nn.Parameter(t.clone()) for t in start]
        runs.append((params, optimizer_class(params, **settings)))
    reference = [nn.Parameter(t.clone()) for t in start]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                    foreach=False)
    for _ in range(4):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        for params, optimizer in [*runs, (reference, torch_adamw)]:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    (core_params, core_optimizer), (params, optimizer) = runs
    assert optimizer.stats.page_outs > 0  # the budget forced evictions
    saved = optimizer.state_dict()["state"]
    for i, (p, q, r) in enumerate(zip(params, core_params, reference)):
        assert_same(p, q)
        assert_same(q, r)  # the core against torch.optim.AdamW, directly
        moments = core_moments(core_optimizer, q)
        assert_same(saved[i]["exp_avg"].reshape(-1), moments[0])
        assert_same(saved[i]["exp_avg_sq"].reshape(-1), moments[1])


# ----------------------------------------------------------------------------------------------------
# Chapter 6: the 4-bit layer and the training step
# ----------------------------------------------------------------------------------------------------


def test_matmul4bit_equals_core():
    assert issubclass(qlora.MatMul4bit, core_qlora.MatMul4bit)
    qweight = double_quant.QuantizedWeight.from_float(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)))
    bias = torch.randn(24, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
        grad = torch.randn(4, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [f.apply(x_, qweight, bias.to(dtype)) for f, x_ in zip((core_qlora.MatMul4bit, qlora.MatMul4bit), xs)]
        assert_same(outs[1], outs[0])
        for out in outs:
            out.backward(grad)
        if dtype == torch.float32:
            assert_same(xs[1].grad, xs[0].grad)  # the same float32 product either way
        else:
            assert_within_bf16_roundings(xs[1].grad, xs[0].grad, grad, qweight.dequantize(dtype))


def test_linear4bit_equals_core():
    torch.manual_seed(0)
    base = nn.Linear(64, 40)
    core, ours = core_qlora.Linear4bit(base, 64, torch.float32), qlora.Linear4bit(base, compute_dtype=torch.float32)
    assert core.state_dict().keys() == ours.state_dict().keys()
    for key, value in core.state_dict().items():
        assert_same(ours.state_dict()[key], value)
    assert_same(ours.dequantized_weight(torch.bfloat16), core.dequantize(torch.bfloat16))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    assert_same(ours(x), core(x))
    assert core_qlora.model_nbytes(core) == qlora.model_nbytes(ours)


def test_quantize_model_equals_core(tiny_llama, token_ids):
    core = core_qlora.quantize_model(tiny_llama(), compute_dtype=torch.float32, skip=("lm_head", "down_proj"))
    ours = qlora.quantize_model(tiny_llama(), compute_dtype=torch.float32, skip=("lm_head", "down_proj"))
    assert ours.quantization_report == core.quantization_report
    assert ours.state_dict().keys() == core.state_dict().keys()
    for key, value in core.state_dict().items():
        assert_same(ours.state_dict()[key], value)
    with torch.no_grad():
        assert_same(ours(token_ids).logits, core(token_ids).logits)


def test_train_step_equals_core(tiny_llama):
    data = loop.TokenData(torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(0)),
                          torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(1)))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = lora.add_lora(qlora.quantize_model(tiny_llama(), compute_dtype=torch.float32),
                              lora.LoraConfig(r=4, target_modules="all-linear"))
        model.train()
        runs.append((model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                     loop.Batches(data, batch_size=2, seed=3)))
    (core_model, core_optimizer, core_batches), (model, optimizer, batches) = runs
    for step in range(3):
        core_loss = core_qlora.train_step(core_model, [core_batches.next() for _ in range(2)], core_optimizer,
                                          max_grad_norm=0.3)
        result = loop.train_step(model, batches, optimizer, step, grad_accum=2, max_grad_norm=0.3)
        assert result["loss"] == core_loss
    for p, q in zip(model.parameters(), core_model.parameters()):
        assert_same(p, q)


# ----------------------------------------------------------------------------------------------------
# Chapter 7: the memory model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(architecture.PRESETS))
def test_memory_estimate_equals_core_on_the_core_recipe(preset):
    a = architecture.architecture(preset)
    assert core_memory.parameter_counts(a) == architecture.parameter_counts(preset)
    assert core_memory.linear_shapes(a) == architecture.linear_shapes(preset)
    for method in architecture.METHODS:
        for checkpointing in (True, False):
            report = memory.estimate(preset, method, r=16, batch_size=2, seq_len=256,
                                     gradient_checkpointing=checkpointing)
            expected = core_memory.estimate(a, method, r=16, batch_size=2, seq_len=256,
                                            gradient_checkpointing=checkpointing)
            assert report.components() == expected, (method, checkpointing)
    for method in architecture.ADAPTER_METHODS:
        for target in ("all-linear", ["q_proj", "v_proj"]):
            assert architecture.lora_parameter_count(preset, 8, target, method) == \
                core_memory.lora_parameter_count(a, 8, target, method)


def test_memory_counts_equal_core_and_read_a_transformers_config(tiny_llama):
    model = tiny_llama()
    a = core_memory.architecture(model.config)
    assert core_memory.parameter_counts(a)["total"] == sum(p.numel() for p in model.parameters())
    assert core_memory.architecture(model.config.to_dict()) == a
    for n in (64, 4096 * 11008, 1001):
        for dq in (True, False):
            assert memory.quant_constant_bytes(n, 64, dq) == core_memory.quant_constant_bytes(n, 64, dq)
    for optimizer in ("adamw", "paged_adamw", "sgd"):
        for master in (True, False):
            assert memory.optimizer_state_bytes(10**6, 7, optimizer, 2, master) == \
                core_memory.optimizer_state_bytes(10**6, 7, optimizer, 2, master)
    assert math.isclose(4 + 8 * core_memory.quant_constant_bytes(4096 * 11008) / (4096 * 11008), 4.127,
                        abs_tol=5e-4)


# ----------------------------------------------------------------------------------------------------
# The exercises: each stub is its chapter's core file with bodies taken out
# ----------------------------------------------------------------------------------------------------

LEARNER = Path(__file__).resolve().parents[1] / "exercises" / "learner"
STUBBED = ("lora", "adalora", "nf4", "double_quant", "paged", "qlora", "memory")


def load_stub(name: str):
    spec = importlib.util.spec_from_file_location(f"stub_of_core_{name}", LEARNER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def shape_of(function) -> list:
    """What a caller sees of a signature: the parameters' names, kinds and defaults."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def body_removed_or_same(stub_function, core_function) -> bool:
    source = inspect.getsource(stub_function)
    return "raise NotImplementedError" in source or inspect.cleandoc(source) == inspect.cleandoc(
        inspect.getsource(core_function))


@pytest.mark.parametrize("name", STUBBED)
def test_each_exercise_stub_is_its_core_file_with_bodies_taken_out(name):
    """Every public name of the core file is in the stub, with the same parameters; whatever the stub defines
    itself either raises NotImplementedError (the exercise) or is the core's code unchanged (given)."""
    core, stub = importlib.import_module(f"minilora.core.{name}"), load_stub(name)
    own = [key for key, value in vars(core).items() if not key.startswith("_")
           and getattr(value, "__module__", core.__name__) == core.__name__ and not inspect.ismodule(value)]
    for key in own:
        assert hasattr(stub, key), f"exercises/learner/{name}.py lacks {key} (minilora/core/{name}.py has it)"
        ours, theirs = getattr(core, key), getattr(stub, key)
        if theirs is ours or not callable(ours):
            assert theirs is ours or theirs == ours, key  # given: the core's own object, or the same constant
        elif inspect.isclass(ours):
            for method, function in vars(ours).items():
                if inspect.isfunction(function) or isinstance(function, staticmethod):
                    function = inspect.unwrap(getattr(ours, method))
                    stub_function = inspect.unwrap(getattr(theirs, method))
                    if stub_function is function:
                        continue  # given: inherited from the core's class
                    assert shape_of(stub_function) == shape_of(function), f"{key}.{method}"
                    assert body_removed_or_same(stub_function, function), f"{key}.{method}"
        else:
            assert shape_of(theirs) == shape_of(ours), key
            assert body_removed_or_same(theirs, ours), key
