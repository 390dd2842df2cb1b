"""minilora.family (rsLoRA, DoRA, PiSSA, LoRA+) against peft 0.21 as the oracle.

Tolerances: everything runs in float32 (eps = 2^-23 ≈ 1.2e-7). Ours and peft's compute the same sums in a
different order (peft forms B A through lora_B(lora_A(I)), subtracts the bias from the base output in another
place, multiplies s into B before B @ A), so each value can differ by a few ulp per operation. Through the
two-layer tiny Llama (dot products of length ≤ 64, logits of size ~1) that stays far below 1e-5, the bound
tests/test_lora.py uses; gradients of O(1e-2) entries get atol 1e-6; a weight built from an SVD gets
1e-6 · (its largest entry, ~0.2 here) plus rounding.
"""

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.adapters import load_adapter, save_adapter
from minilora.family import (
    DoRALinear,
    add_dora,
    apply_rslora,
    dora_layers,
    loraplus_param_groups,
    pissa_init_,
    rslora_scaling,
)
from minilora.lora import LoraConfig, LoRALinear, add_lora, lora_layers, merge_lora
from minilora.qlora import Linear4bit

TARGETS = ("q_proj", "v_proj")
DORA_RSLORA = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, use_rslora=True)


def peft_model(model, **settings):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM", **settings)
    return peft.get_peft_model(model, config)


def peft_layers(pm):
    return {name.removeprefix("base_model.model."): m for name, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def randomize_peft(pm, seed=3):
    """B = 0 and m = ‖W0‖ after init; move both so that every part of the layer matters."""
    gen = torch.Generator().manual_seed(seed)
    for layer in peft_layers(pm).values():
        layer.lora_B["default"].weight.data.normal_(0, 0.1, generator=gen)
        if "default" in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector["default"].weight.data.mul_(1 + 0.2 * torch.rand(
                layer.out_features, generator=gen))


def copy_peft_into_ours(pm, ours):
    with torch.no_grad():
        for name, theirs in peft_layers(pm).items():
            layer = ours.get_submodule(name)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)
            if isinstance(layer, DoRALinear):
                layer.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)


def paired(tiny_llama, dora=True, rslora=False):
    """(ours, peft's): the same tiny Llama with the same A, B (and m) on q_proj and v_proj."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora)
    ours = (add_dora if dora else add_lora)(tiny_llama(), config)
    pm = peft_model(tiny_llama(), use_dora=dora, use_rslora=rslora)
    randomize_peft(pm)
    copy_peft_into_ours(pm, ours)
    return ours, pm


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


# ----------------------------------------------------------------------------------------------------
# rsLoRA
# ----------------------------------------------------------------------------------------------------


def test_rslora_scaling_is_alpha_over_root_r():
    assert rslora_scaling(16, 4) == 8.0 and rslora_scaling(8, 1) == 8.0
    with pytest.raises(ValueError, match="r=0"):
        rslora_scaling(8, 0)


def test_rslora_logits_equal_peft(tiny_llama, token_ids):
    ours, pm = paired(tiny_llama, dora=False, rslora=True)
    assert {layer.scaling for layer in lora_layers(ours).values()} == {4.0}   # 8 / √4, not 8 / 4
    assert torch.allclose(logits(ours, token_ids), logits(pm, token_ids), atol=1e-5, rtol=0)
    plain, _ = paired(tiny_llama, dora=False, rslora=False)
    assert (logits(plain, token_ids) - logits(ours, token_ids)).abs().max() > 1e-3   # the scale matters


def test_apply_rslora_refuses_merged_layers(tiny_llama):
    model = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        apply_rslora(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        apply_rslora(tiny_llama())


# ----------------------------------------------------------------------------------------------------
# DoRA: outputs, gradients, merging
# ----------------------------------------------------------------------------------------------------


def test_dora_starts_as_the_base_model(tiny_llama, token_ids):
    model = add_dora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(layer.lora_magnitude_vector, layer.base.weight.norm(dim=1), atol=1e-6)
    trainable = [n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(set(trainable)) == ["lora_A", "lora_B", "lora_magnitude_vector"] and len(trainable) == 12
    assert len(dora_layers(model)) == 4
    assert torch.allclose(logits(model, token_ids), logits(tiny_llama(), token_ids), atol=1e-5, rtol=0)


def test_dora_logits_equal_peft(tiny_llama, token_ids):
    ours, pm = paired(tiny_llama, dora=True)
    assert torch.allclose(logits(ours, token_ids), logits(pm, token_ids), atol=1e-5, rtol=0)
    lora, _ = paired(tiny_llama, dora=False)          # same A, B without the magnitude: a different model
    assert (logits(lora, token_ids) - logits(ours, token_ids)).abs().max() > 1e-3


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(12, 7)


def dora_layer_pair(dropout):
    """Our DoRALinear and peft's on the same nn.Linear (with a bias), same A, B, m."""
    pm = peft.get_peft_model(OneLayer(), peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout,
                                                         target_modules=["proj"], use_dora=True))
    theirs = pm.base_model.model.proj
    ours = nn.Module()
    ours.proj = DoRALinear(OneLayer().proj, r=3, lora_alpha=6, lora_dropout=dropout)
    randomize_peft(pm)
    copy_peft_into_ours(pm, ours)
    return ours.proj, theirs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_outputs_and_gradients_equal_peft(dropout):
    """Also in training mode with dropout, where peft recomputes W0 dropout(x): same seed, same mask."""
    ours, theirs = dora_layer_pair(dropout)
    ours.train(), theirs.train()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    results = []
    for layer, params in ((ours, (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector)),
                          (theirs, (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                    theirs.lora_magnitude_vector["default"].weight))):
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = layer(x_in)
        out.pow(2).sum().backward()
        results.append((out, x_in.grad, *[p.grad for p in params]))
    for name, a, b in zip(("output", "x", "A", "B", "m"), *results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (name, (a - b).abs().max())
    assert results[0][4].abs().max() > 1e-3        # m really gets a gradient


def test_dora_merge_equals_peft_merge_and_unload(tiny_llama, token_ids):
    ours, pm = paired(tiny_llama, dora=True)
    before = logits(ours, token_ids)
    layer = ours.model.layers[1].self_attn.v_proj
    w0 = layer.base.weight.clone()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    layer.unmerge()                               # the kept norm undoes the merge
    assert torch.allclose(layer.base.weight, w0, atol=1e-6, rtol=0)
    merged_ours = merge_lora(ours)
    merged_peft = pm.merge_and_unload()
    for name in peft_layers(pm):
        assert torch.allclose(merged_ours.get_submodule(name).weight, merged_peft.get_submodule(name).weight,
                              atol=1e-6, rtol=0), name
    assert torch.allclose(logits(merged_ours, token_ids), before, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# DoRA: adapter files both ways
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_adapter_loads_into_ours(tiny_llama, token_ids, tmp_path, rslora):
    _, pm = paired(tiny_llama, dora=True, rslora=rslora)
    pm.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    assert all(isinstance(layer, DoRALinear) for layer in lora_layers(ours).values())
    assert torch.allclose(logits(ours, token_ids), logits(pm, token_ids), atol=1e-5, rtol=0)


def test_our_dora_adapter_loads_into_peft(tiny_llama, token_ids, tmp_path):
    ours, _ = paired(tiny_llama, dora=True, rslora=True)
    save_adapter(ours, tmp_path, DORA_RSLORA)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert pm.peft_config["default"].use_dora and pm.peft_config["default"].use_rslora
    assert torch.allclose(logits(pm, token_ids), logits(ours, token_ids), atol=1e-5, rtol=0)
    assert torch.allclose(logits(load_adapter(tiny_llama(), tmp_path), token_ids), logits(ours, token_ids),
                          atol=1e-5, rtol=0)   # and back into ours


def test_saving_dora_refuses_mixed_scales(tiny_llama, tmp_path):
    ours, _ = paired(tiny_llama, dora=True)
    ours.model.layers[0].self_attn.q_proj.scaling = rslora_scaling(8, 4)   # one layer α/√r, the rest α/r
    with pytest.raises(ValueError, match=r"q_proj' has r=4, lora_alpha=8, scaling=4.*scaling=2"):
        save_adapter(ours, tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    assert not any(tmp_path.iterdir())          # no half-written adapter


@pytest.mark.parametrize("damage, message", [("drop", "missing"), ("reshape", "has shape"),
                                             ("rename", "unexpected key")])
def test_a_dora_file_that_does_not_fit_is_refused(tiny_llama, tmp_path, damage, message):
    _, pm = paired(tiny_llama, dora=True)
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("lora_magnitude_vector"))[0]
    if damage == "reshape":
        tensors[key] = tensors[key][:-1]
    elif damage == "rename":     # a wrong prefix: peft would drop the key and load an adapter that does nothing
        tensors[key.replace("base_model.model.", "base_model.")] = tensors[key]
    if damage != "reshape":
        del tensors[key]
    save_file(tensors, weights)
    model = tiny_llama()
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(model, tmp_path)
    assert key.removeprefix("base_model.model.") in str(error.value)
    if damage != "rename":
        assert "unexpected" not in str(error.value)
    assert not lora_layers(model)                 # nothing half-done


# ----------------------------------------------------------------------------------------------------
# DoRA on a 4-bit base (QLoRA + DoRA)
# ----------------------------------------------------------------------------------------------------


def test_dora_on_a_4bit_base_uses_the_dequantized_weight():
    """Linear4bit in fp32 compute equals nn.Linear holding dequantize(W4): so must DoRA over each."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    quantized = Linear4bit(linear, compute_dtype=torch.float32)
    plain = nn.Linear(64, 32)
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantized_weight(torch.float32))
        plain.bias.copy_(linear.bias)
    ours4, ours = DoRALinear(quantized, r=4), DoRALinear(plain, r=4)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.1)
        ours4.lora_B.copy_(ours.lora_B)
        ours4.lora_A.copy_(ours.lora_A)
    assert torch.allclose(ours4.lora_magnitude_vector, ours.lora_magnitude_vector, atol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(ours4(x), ours(x), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="merge_lora"):
        ours4.merge()
    model = nn.Sequential(ours4)
    with pytest.warns(UserWarning, match="quantized base"):
        merge_lora(model, dtype=torch.float32)   # a new nn.Linear from dequantize(W4) + delta_weight()
    assert torch.allclose(model[0](x), ours(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# PiSSA
# ----------------------------------------------------------------------------------------------------


def test_pissa_equals_peft_given_the_same_svd(tiny_llama, token_ids):
    """Both call torch.linalg.svd on the same float32 W0 in one process, so U, S, Vh, signs included, are
    the same; A and B are then products with diag(sqrt(S_r / s)) (exact), the residual differs by rounding."""
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for layer in lora_layers(model).values():
        pissa_init_(layer)
    pm = peft_model(tiny_llama(), init_lora_weights="pissa")
    for name, theirs in peft_layers(pm).items():
        layer = model.get_submodule(name)
        assert torch.allclose(layer.lora_A, theirs.lora_A["default"].weight, atol=1e-6, rtol=0), name
        assert torch.allclose(layer.lora_B, theirs.lora_B["default"].weight, atol=1e-6, rtol=0), name
        assert torch.allclose(layer.base.weight, theirs.base_layer.weight, atol=1e-6, rtol=0), name
    # The output at init is the pretrained model's: W_res + s B A = W0 up to rounding.
    assert torch.allclose(logits(model, token_ids), logits(tiny_llama(), token_ids), atol=1e-5, rtol=0)
    # What PiSSA moved into the adapter is W0's principal part: rank 4, holding its largest singular values.
    layer = model.model.layers[0].self_attn.q_proj
    top = torch.linalg.svdvals(tiny_llama().model.layers[0].self_attn.q_proj.weight)[:4]
    assert torch.allclose(torch.linalg.svdvals(layer.scaling * layer.lora_B @ layer.lora_A)[:4], top, atol=1e-5)


def test_pissa_refuses_a_4bit_base():
    layer = LoRALinear(Linear4bit(nn.Linear(64, 32)), r=4)
    with pytest.raises(ValueError, match="quantize the residual"):
        pissa_init_(layer)


# ----------------------------------------------------------------------------------------------------
# LoRA+
# ----------------------------------------------------------------------------------------------------


def test_loraplus_groups_equal_peft(tiny_llama):
    ours, pm = paired(tiny_llama, dora=True)
    groups = loraplus_param_groups(ours, lr=1e-3, lr_ratio=16)
    names = {id(p): n for n, p in ours.named_parameters()}
    by_lr_ours = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    optimizer = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_names = {id(p): n.removeprefix("base_model.model.").replace(".default.weight", "")
                  .replace(".default", "") for n, p in pm.named_parameters()}
    by_lr_peft = {}
    for group in optimizer.param_groups:
        by_lr_peft.setdefault(group["lr"], []).extend(peft_names[id(p)] for p in group["params"])
    by_lr_peft = {lr: sorted(n) for lr, n in by_lr_peft.items() if n}
    assert by_lr_ours == by_lr_peft
    assert len(by_lr_ours[1e-3]) == 4 and len(by_lr_ours[16e-3]) == 8   # A | B and the magnitudes


def test_loraplus_refuses_bad_arguments(tiny_llama):
    model = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="lr_ratio=0"):
        loraplus_param_groups(model, lr=1e-3, lr_ratio=0)
    with pytest.raises(ValueError, match="no trainable"):
        loraplus_param_groups(tiny_llama().requires_grad_(False), lr=1e-3)
