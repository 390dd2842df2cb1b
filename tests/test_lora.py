"""minilora.lora against peft 0.21 as the oracle: same weights -> same logits, same modules, same counts."""

import contextlib
import io
import math
import warnings

import peft
import pytest
import torch
from torch import nn

from minilora.lora import (
    LoraConfig,
    LoRALinear,
    add_lora,
    find_target_modules,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    replace_module,
    trainable_summary,
)


def peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj"), init=True):
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init,
                             target_modules=target_modules if isinstance(target_modules, str)
                             else list(target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def randomize_peft_B(pm, seed=3):
    """B = 0 after init; give it values so the bypass actually contributes."""
    gen = torch.Generator().manual_seed(seed)
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=gen).to(weight.dtype) * 0.1


def copy_peft_into_ours(pm, ours):
    for name, layer in lora_layers(ours).items():
        theirs = pm.base_model.model.get_submodule(name)
        layer.lora_A.data.copy_(theirs.lora_A["default"].weight.data)
        layer.lora_B.data.copy_(theirs.lora_B["default"].weight.data)


def paired(tiny_llama, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj"),
           init="kaiming", tie=False, dtype=torch.float32):
    """(ours, peft's) with identical base and adapter weights."""
    ours = add_lora(tiny_llama(tie_word_embeddings=tie, dtype=dtype),
                    LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               target_modules=target_modules, init=init))
    pm = peft_model(tiny_llama(tie_word_embeddings=tie, dtype=dtype), r, lora_alpha, lora_dropout,
                    target_modules, True if init == "kaiming" else "gaussian")
    randomize_peft_B(pm)
    copy_peft_into_ours(pm, ours)
    return ours, pm


def peft_summary(pm) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pm.print_trainable_parameters()
    return out.getvalue().strip()


# ----------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("target_modules", [("q_proj", "v_proj"), "all-linear"])
def test_logits_equal_peft(init, target_modules, token_ids, tiny_llama):
    ours, pm = paired(tiny_llama, r=4, lora_alpha=16, init=init, target_modules=target_modules)
    with torch.no_grad():
        ours_logits, peft_logits = ours(token_ids).logits, pm(token_ids).logits
        base_logits = tiny_llama()(token_ids).logits
    assert torch.allclose(ours_logits, peft_logits, atol=1e-5, rtol=0)
    assert (ours_logits - base_logits).abs().max() > 1e-3   # the bypass really contributes


def test_dropout_in_training_matches_peft(token_ids, tiny_llama):
    """Dropout acts on the bypass input only; same seed -> same masks as peft -> same logits."""
    ours, pm = paired(tiny_llama, lora_dropout=0.25)
    assert not any(layer.training for layer in lora_layers(ours).values())   # joined an eval-mode model
    ours.train()
    pm.train()
    torch.manual_seed(11)
    ours_logits = ours(token_ids).logits
    torch.manual_seed(11)
    peft_logits = pm(token_ids).logits
    assert torch.allclose(ours_logits, peft_logits, atol=1e-5, rtol=0)
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(ours(token_ids).logits, ours_logits, atol=1e-4)   # dropout did something


def test_bf16_base_matches_peft(token_ids, tiny_llama):
    ours, pm = paired(tiny_llama, dtype=torch.bfloat16)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.float32 == pm.base_model.model.model.layers[0].self_attn.q_proj \
        .lora_A["default"].weight.dtype
    with torch.no_grad():
        ours_logits, peft_logits = ours(token_ids).logits, pm(token_ids).logits
    assert ours_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, peft_logits)


def test_single_layer_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, lora_alpha=3)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 1.5
    assert layer.scaling == 1.5
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight(), 1.5 * layer.lora_B @ layer.lora_A)


# ----------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------


def test_kaiming_init_is_linear_default_uniform():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), r=64, init="kaiming")
    bound = 1 / math.sqrt(400)   # kaiming_uniform_(a=sqrt(5)) on fan_in 400
    A = layer.lora_A.detach()
    assert A.shape == (64, 400) and layer.lora_B.shape == (300, 64)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.01 * bound      # the std of U(-b, b)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_gaussian_init_std_one_over_r(tiny_llama):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), r=16, init="gaussian")
    A = layer.lora_A.detach()
    assert abs(A.std().item() - 1 / 16) < 0.02 / 16
    assert abs(A.mean().item()) < 0.005
    assert A.abs().max() > 3 / 16   # a bell curve has tails; a uniform of the same std would stop at 0.108
    assert torch.count_nonzero(layer.lora_B) == 0
    # peft draws from the same distribution
    pm = peft_model(tiny_llama(), r=16, target_modules=["gate_proj"], init="gaussian")
    peft_A = torch.cat([m.lora_A["default"].weight.flatten() for m in pm.modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer)])
    assert abs(peft_A.std().item() - 1 / 16) < 0.1 / 16


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_model_unchanged_at_start(init, token_ids, tiny_llama):
    ours = add_lora(tiny_llama(), LoraConfig(r=4, init=init, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(ours(token_ids).logits, tiny_llama()(token_ids).logits)


def test_only_lora_trains_and_gradients_flow(token_ids, tiny_llama):
    ours = add_lora(tiny_llama(), LoraConfig(r=4))
    ours(token_ids, labels=token_ids).loss.backward()
    for name, param in ours.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if "lora_" not in name:
            assert param.grad is None
    q = ours.model.layers[0].self_attn.q_proj
    assert q.lora_B.grad.abs().sum() > 0             # B gets gradient from the start ...
    assert torch.count_nonzero(q.lora_A.grad) == 0   # ... A none until B moves away from 0


# ----------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------


def test_merge_unmerge(token_ids, tiny_llama):
    ours, _ = paired(tiny_llama, lora_alpha=16)
    q = ours.model.layers[1].self_attn.q_proj
    w0 = q.base.weight.detach().clone()
    with torch.no_grad():
        before = ours(token_ids).logits
        for layer in lora_layers(ours).values():
            layer.merge()
        assert q.merged
        assert torch.allclose(q.base.weight, w0 + q.delta_weight(), atol=1e-7)
        merged = ours(token_ids).logits
        for layer in lora_layers(ours).values():
            layer.unmerge()
        after = ours(token_ids).logits
    assert torch.allclose(merged, before, atol=1e-5, rtol=0)
    assert torch.allclose(q.base.weight, w0, atol=1e-6)
    assert torch.allclose(after, before, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        q.unmerge()
    q.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        q.merge()


def test_merge_lora_equals_peft_merge_and_unload(token_ids, tiny_llama):
    ours, pm = paired(tiny_llama, lora_alpha=16, target_modules="all-linear")
    with torch.no_grad():
        before = ours(token_ids).logits
        merge_lora(ours)
        unloaded = pm.merge_and_unload()
        assert torch.allclose(ours(token_ids).logits, before, atol=1e-5, rtol=0)
        assert torch.allclose(ours(token_ids).logits, unloaded(token_ids).logits, atol=1e-5, rtol=0)
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    assert ours.state_dict().keys() == tiny_llama().state_dict().keys()
    for key, value in unloaded.state_dict().items():
        assert torch.allclose(ours.state_dict()[key], value, atol=1e-6), key
    with pytest.raises(ValueError, match="no LoRA or AdaLoRA layers"):
        merge_lora(ours)


class FakeQuantLinear(nn.Module):
    """Stands in for a 4-bit layer; follows the base-layer protocol: int8 codes times one scale per row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 7
        self.register_buffer("codes", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def dequantized_weight(self, dtype):
        return (self.codes.float() * self.scale).to(dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)


def test_protocol_base_forward_and_merge_lora():
    torch.manual_seed(0)
    quant = FakeQuantLinear(nn.Linear(16, 8))
    model = nn.Sequential(quant)
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, LoRALinear) and layer.base is quant
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    W = quant.dequantized_weight(torch.float32)
    expected = x @ (W + 2 * layer.lora_B @ layer.lora_A).T + quant.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(TypeError, match="merge_lora"):
        layer.merge()
    with pytest.warns(UserWarning, match="rounding"):
        merge_lora(model, dtype=torch.bfloat16)
    merged = model[0]
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, (W + layer.delta_weight()).detach().to(torch.bfloat16))
    assert torch.equal(merged.bias, quant.bias.detach().to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model32 = merge_lora(add_lora(nn.Sequential(FakeQuantLinear(nn.Linear(16, 8))),
                                      LoraConfig(r=2, target_modules=["0"])), dtype=torch.float32)
    assert model32[0].weight.dtype == torch.float32


def test_summary_counts_quantized_base_as_its_full_weight():
    model = add_lora(nn.Sequential(FakeQuantLinear(nn.Linear(16, 8)), nn.Linear(8, 4)),
                     LoraConfig(r=2, target_modules=["0"]))
    # int8 codes are buffers, yet the layer stands for 16 x 8 weights (+ 8 bias), as peft counts Linear4bit:
    # 128 + 8 + (8 x 4 + 4) + 2 x (16 + 8) = 220
    assert trainable_summary(model) == "trainable params: 48 || all params: 220 || trainable%: 21.8182"


# ----------------------------------------------------------------------------------------------------
# Choosing modules, counting parameters
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_modules", [
    ("q_proj", "v_proj"),
    ("self_attn.o_proj", "up_proj"),
    r"model\.layers\.1\..*_proj",
    r".*(q|k)_proj",
    "all-linear",
])
@pytest.mark.parametrize("tie", [False, True])
def test_target_matching_and_summary_equal_peft(target_modules, tie, tiny_llama):
    pm = peft_model(tiny_llama(tie_word_embeddings=tie), target_modules=target_modules)
    ours = tiny_llama(tie_word_embeddings=tie)
    assert find_target_modules(ours, target_modules) == pm.base_model.targeted_module_names
    add_lora(ours, LoraConfig(r=4, target_modules=target_modules))
    assert trainable_summary(ours) == peft_summary(pm)


def test_summary_counts_tied_weights_once(tiny_llama):
    ours = add_lora(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4))
    # embed 64*32, per layer: q 32*32, k 32*16, v 32*16, o 32*32, mlp 3*32*64, 2 norms of 32; final norm 32
    base = 64 * 32 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64) + 32
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    percent = 100 * lora / (base + lora)
    assert trainable_summary(ours) == \
        f"trainable params: {lora:,d} || all params: {base + lora:,d} || trainable%: {percent:.4f}"
    assert trainable_summary(ours) == "trainable params: 896 || all params: 21,536 || trainable%: 4.1605"


def test_helpers(tiny_llama):
    model = tiny_llama()
    replace_module(model, "model.layers.0.mlp.up_proj", nn.Identity())
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Identity)
    with pytest.raises(ValueError, match="no submodule"):
        replace_module(model, "model.layers.0.mlp.nope", nn.Identity())
    mark_only_lora_trainable(model)
    assert not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r=0"),
    ({"r": -2}, "r=-2"),
    ({"r": 2.0}, "r=2.0"),
    ({"lora_alpha": 0}, "lora_alpha=0"),
    ({"lora_alpha": -1.0}, "lora_alpha=-1.0"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout=-0.1"),
    ({"init": "xavier"}, "init='xavier'"),
])
def test_layer_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(16, 8), **{"r": 2, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r=0"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_dropout": 1}, "lora_dropout=1"),
    ({"init": "pissa"}, "init"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": "(unclosed"}, "regular expression"), ({"target_modules": 5}, "target_modules=5"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_bad_targets_and_bases(tiny_llama):
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        add_lora(tiny_llama(), LoraConfig(target_modules=["query"]))
    with pytest.raises(TypeError, match="Embedding"):
        add_lora(tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="LlamaMLP"):
        add_lora(tiny_llama(), LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="adapter_name='default' already exists"):
        add_lora(add_lora(tiny_llama(), LoraConfig()), LoraConfig())
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=1)
    int_linear = nn.Linear(4, 4)
    int_linear.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="float"):
        LoRALinear(int_linear, r=1)
    with pytest.raises(TypeError, match="LoraConfig"):
        add_lora(tiny_llama(), peft.LoraConfig(r=4))


def test_rank_larger_than_a_weight_warns_once_and_equals_peft(tiny_llama, token_ids):
    """peft accepts r > min(in, out); so do we, with one warning for the model that names the layers."""
    with pytest.warns(UserWarning) as caught:
        ours, pm = paired(tiny_llama, r=20)          # q_proj is 32x32 (fine), v_proj 32->16 is not
    oversized = [w for w in caught if "larger than their weight allows" in str(w.message)]
    assert len(oversized) == 1
    assert "model.layers.0.self_attn.v_proj (r=20 > min(32, 16))" in str(oversized[0].message)
    assert "q_proj" not in str(oversized[0].message)
    torch.testing.assert_close(ours(token_ids).logits, pm(token_ids).logits, rtol=1e-5, atol=1e-5)


def test_a_bad_rank_pattern_value_leaves_model_untouched(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"rank_pattern\['v_proj'\]"):
        add_lora(model, LoraConfig(rank_pattern={"v_proj": 0}))
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_summary_on_4bit_model_equals_peft_on_bitsandbytes(tiny_llama):
    """A QLoRA model (minilora.qlora.Linear4bit bases) counts as peft counts bitsandbytes' Linear4bit."""
    import bitsandbytes as bnb

    from minilora.qlora import quantize_model

    ours = tiny_llama()
    quantize_model(ours)
    add_lora(ours, LoraConfig(r=4, target_modules="all-linear"))
    theirs = tiny_llama()
    for name, module in list(theirs.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            replace_module(theirs, name, q.to("cpu"))   # .to() quantizes on CPU
    pm = peft_model(theirs, target_modules="all-linear")
    assert trainable_summary(ours) == peft_summary(pm) == \
        "trainable params: 4,096 || all params: 26,784 || trainable%: 15.2927"


# ----------------------------------------------------------------------------------------------------
# Defects found by trying the API as a new user (issue 13)
# ----------------------------------------------------------------------------------------------------


def test_a_target_entry_that_matches_nothing_is_an_error(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"entries \['v_prj'\] of target_modules=.*matched no module"):
        add_lora(model, LoraConfig(target_modules=("q_proj", "v_prj")))
    assert not lora_layers(model)


def test_merging_a_qlora_model_warns_once_and_runs_on_the_same_inputs(tiny_llama, token_ids):
    from minilora.qlora import quantize_model

    model = add_lora(quantize_model(tiny_llama()), LoraConfig(r=4, target_modules="all-linear"))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.02)
    with torch.no_grad():
        before = model(token_ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_lora(model)
    assert len([w for w in caught if "merge_lora" in str(w.message)]) == 1   # not one per layer (14 here)
    with torch.no_grad():
        after = model(token_ids).logits   # fp32 input ids, fp32 embeddings: merged fp32 weights
    assert after.dtype == before.dtype == torch.float32
    # Before: x rounded to bf16 (Linear4bit's compute dtype) times bf16 Ŵ; after: fp32 x times fp32 Ŵ + ΔW.
    # Logits of size ~1 then differ by bf16 rounding of the activations, a few 1e-3.
    torch.testing.assert_close(after, before, rtol=0, atol=3e-2)
