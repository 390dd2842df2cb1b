"""Several adapters on one model (minilora.switching) against peft 0.21's methods of the same names.

Tolerance: float32 throughout; the same sums in another order differ by a few ulp per operation, far below
the 1e-5 of tests/test_lora.py on the tiny Llama's logits (~1). add_weighted_adapter's "svd" goes through an
SVD (LAPACK, whose last bits depend on the CPU's kernels), so its ΔW is compared to 1e-5 of its largest entry.
"""

import peft
import pytest
import torch

from minilora.adapters import load_adapter, save_adapter
from minilora.family import add_dora
from minilora.lora import LoraConfig, add_lora, lora_layers, merge_lora
from minilora.switching import (
    active_adapter,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    set_adapter,
)

ATOL = 1e-5
A = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
B = LoraConfig(r=2, lora_alpha=4, target_modules=("v_proj", "down_proj"), lora_dropout=0.1)   # other layers


def peft_config(config):
    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.target_modules), task_type="CAUSAL_LM")


def peft_pair(tiny_llama, adapters):
    """peft's model with the named adapters, their B moved off zero, and ours with the same numbers."""
    (first, config), *rest = adapters.items()
    pm = peft.get_peft_model(tiny_llama(), peft_config(config), adapter_name=first)
    ours = add_lora(tiny_llama(), config, first)
    for name, config in rest:
        pm.add_adapter(name, peft_config(config))
        add_lora(ours, config, name)
    pm.eval()   # peft's new dropout modules start in training mode; the base model is in eval mode
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            theirs = pm.base_model.model.get_submodule(path)
            for name in layer.adapter_names():
                theirs.lora_B[name].weight.normal_(0, 0.1, generator=gen)
                layer.adapter(name).lora_A.copy_(theirs.lora_A[name].weight)
                layer.adapter(name).lora_B.copy_(theirs.lora_B[name].weight)
    return ours, pm


def peft_layers(pm):
    return {name.removeprefix("base_model.model."): m for name, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def peft_trainable(pm, adapter):
    return {name.removeprefix("base_model.model.").replace(f".{adapter}.weight", "")
            for name, p in pm.named_parameters() if p.requires_grad}


def test_switching_adapters_equals_peft(tiny_llama, token_ids):
    ours, pm = peft_pair(tiny_llama, {"a": A, "b": B})
    assert adapter_names(ours) == ["a", "b"] and active_adapter(ours) == "a"   # a new adapter waits, inactive
    base = logits(tiny_llama(), token_ids)
    for name in ("b", "a", "b"):
        set_adapter(ours, name)
        pm.set_adapter(name)
        assert active_adapter(ours) == name
        torch.testing.assert_close(logits(ours, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)
        assert trainable(ours) == peft_trainable(pm, name)                       # only the active one trains
        assert not torch.allclose(logits(ours, token_ids), base, atol=1e-3)
    q_proj = ours.model.layers[0].self_attn.q_proj        # only "a" has it: with "b" active it is the base alone
    assert q_proj.disabled and q_proj.adapter_name == "a"


def test_disable_adapter_gives_the_base_model_and_restores_every_layer(tiny_llama, token_ids):
    ours, pm = peft_pair(tiny_llama, {"a": A, "b": B})
    set_adapter(ours, "b")
    before = [layer.disabled for layer in lora_layers(ours).values()]
    with disable_adapter(ours), pm.disable_adapter():
        assert active_adapter(ours) is None
        torch.testing.assert_close(logits(ours, token_ids), logits(tiny_llama(), token_ids), rtol=0, atol=0)
        torch.testing.assert_close(logits(pm, token_ids), logits(tiny_llama(), token_ids), rtol=0, atol=ATOL)
    assert [layer.disabled for layer in lora_layers(ours).values()] == before
    with pytest.raises(RuntimeError, match="inside"), disable_adapter(ours):
        raise RuntimeError("inside")                    # an error inside the block still restores the layers
    assert active_adapter(ours) == "b"


def test_switching_moves_the_same_parameters_so_optimizer_state_survives(tiny_llama, token_ids):
    ours, _ = peft_pair(tiny_llama, {"a": A, "b": B})
    v_proj = ours.model.layers[1].self_attn.v_proj
    a_params = (v_proj.lora_A, v_proj.lora_B)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ours(token_ids).logits.sum().backward()
    optimizer.step()
    set_adapter(ours, "b")
    assert v_proj.parked["a"].lora_A is a_params[0] and not a_params[0].requires_grad
    set_adapter(ours, "a")
    assert (v_proj.lora_A, v_proj.lora_B) == a_params and a_params[0].requires_grad
    assert a_params[0] in optimizer.state                 # Adam's moments for "a" are still there


def test_delete_adapter(tiny_llama, token_ids):
    ours, pm = peft_pair(tiny_llama, {"a": A, "b": B})
    with pytest.raises(ValueError, match="'a' is the active adapter; set_adapter to one of \\['b'\\] first"):
        delete_adapter(ours, "a")
    delete_adapter(ours, "b")
    pm.delete_adapter("b")
    assert adapter_names(ours) == ["a"]
    assert sorted(lora_layers(ours)) == sorted(path for path, layer in peft_layers(pm).items() if layer.lora_A)
    assert "model.layers.0.mlp.down_proj" not in lora_layers(ours)                      # plain again
    assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(ours, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="has no adapter 'b'"):
        set_adapter(ours, "b")


def test_load_adapter_beside_another_and_save_each(tiny_llama, token_ids, tmp_path):
    ours, pm = peft_pair(tiny_llama, {"a": A, "b": B})
    pm.save_pretrained(tmp_path / "peft")                  # one subfolder per adapter: a/ and b/
    model = load_adapter(tiny_llama(), tmp_path / "peft" / "a", "a")
    load_adapter(model, tmp_path / "peft" / "b", "b")
    assert active_adapter(model) == "a"
    set_adapter(model, "b")
    pm.set_adapter("b")
    torch.testing.assert_close(logits(model, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)
    save_adapter(model, tmp_path / "ours_a", A, adapter_name="a")   # the inactive one, by name
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours_a")
    pm.set_adapter("a")
    torch.testing.assert_close(logits(theirs, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="adapter_name='b' already exists"):
        add_lora(model, B, "b")


def delta(layer, name):
    slot = layer.adapter(name)
    return slot.scaling * slot.lora_B.detach() @ slot.lora_A.detach()


def peft_delta(pm, path, name):
    return pm.base_model.model.get_submodule(path).get_delta_weight(name).detach()


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_add_weighted_adapter_equals_peft(tiny_llama, token_ids, combination_type):
    second = LoraConfig(r=4, lora_alpha=16, target_modules=("v_proj", "o_proj"))   # same rank, for "linear"
    ours, pm = peft_pair(tiny_llama, {"a": A, "b": second})
    weights = [0.7, -0.4]
    add_weighted_adapter(ours, ["a", "b"], weights, "mix", combination_type)
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type)
    for path, layer in lora_layers(ours).items():
        if "mix" in layer.adapter_names():
            expected = peft_delta(pm, path, "mix")
            torch.testing.assert_close(delta(layer, "mix"), expected, rtol=0, atol=ATOL * expected.abs().max())
    set_adapter(ours, "mix")
    pm.set_adapter("mix")
    torch.testing.assert_close(logits(ours, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)


def test_cat_is_the_weighted_sum_and_linear_is_not(tiny_llama):
    """What the chapter says: "cat" gives ΔW = Σ w_i ΔW_i exactly; peft's "linear" adds the cross terms
    √(w_a s_a w_b s_b) (B_a A_b + B_b A_a) wherever two adapters share a layer."""
    second = LoraConfig(r=4, lora_alpha=16, target_modules=("v_proj",))
    ours, _ = peft_pair(tiny_llama, {"a": A, "b": second})
    add_weighted_adapter(ours, ["a", "b"], [0.7, 0.4], "cat", "cat")
    add_weighted_adapter(ours, ["a", "b"], [0.7, 0.4], "linear", "linear")
    v_proj = ours.model.layers[0].self_attn.v_proj
    wanted = 0.7 * delta(v_proj, "a") + 0.4 * delta(v_proj, "b")
    torch.testing.assert_close(delta(v_proj, "cat"), wanted, rtol=0, atol=1e-6)
    error = (delta(v_proj, "linear") - wanted).norm() / wanted.norm()
    assert error > 0.1                                          # the cross terms are not small
    q_proj = ours.model.layers[0].self_attn.q_proj             # only "a" here: no cross terms, both agree
    torch.testing.assert_close(delta(q_proj, "linear"), 0.7 * delta(q_proj, "a"), rtol=0, atol=1e-6)


def test_bad_calls(tiny_llama):
    ours, _ = peft_pair(tiny_llama, {"a": A, "b": B})
    with pytest.raises(ValueError, match="combination_type='linear' needs all adapters at one rank"):
        add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "linear")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "ties")
    with pytest.raises(ValueError, match="same, non-zero length"):
        add_weighted_adapter(ours, ["a", "b"], [1.0], "mix", "cat")
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string without '.'"):
        add_lora(ours, A, "a.b")
    with pytest.raises(ValueError, match="not an attribute of nn.ModuleDict.*'keys'"):
        add_lora(ours, A, "keys")
    with pytest.raises(ValueError, match="bias must be 'none'"):
        add_lora(ours, LoraConfig(target_modules=("k_proj",), bias="all"), "c")
    with pytest.raises(ValueError, match="DoRALinear adapters beside"):
        add_dora(ours, A, "c")
    ours.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        set_adapter(ours, "b")
    with pytest.raises(ValueError, match="are merged; unmerge them first"):
        add_lora(ours, LoraConfig(target_modules=("q_proj",)), "c")      # refused before any layer changes
    assert adapter_names(ours) == ["a", "b"]
    layer = ours.model.layers[1].self_attn.q_proj  # a layer's own add_adapter checks what it is given
    before = layer.adapter_names()
    with pytest.raises(ValueError, match="lora_alpha must be a number in"):
        layer.add_adapter("c", r=2, lora_alpha=-5)
    with pytest.raises(ValueError, match="init must be one of"):
        layer.add_adapter("c", r=2, lora_alpha=4, init="bogus")
    assert layer.adapter_names() == before == ["a"]
    with pytest.raises(ValueError, match="no adapter layers"):
        with disable_adapter(tiny_llama()):
            pass


def test_two_dora_adapters_switch_like_two_models(tiny_llama, token_ids):
    model = add_dora(tiny_llama(), A, "a")
    add_dora(model, B, "b")
    alone = add_dora(tiny_llama(), B, "b")
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            if "b" in layer.adapter_names():
                layer.adapter("b").lora_B.normal_(0, 0.1)
                layer.adapter("b").lora_magnitude_vector.mul_(1.1)
                target = alone.get_submodule(path)
                for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
                    getattr(target, key).copy_(getattr(layer.adapter("b"), key))
    set_adapter(model, "b")
    model.eval(), alone.eval()
    torch.testing.assert_close(logits(model, token_ids), logits(alone, token_ids), rtol=0, atol=0)
    merged = merge_lora(model)                        # folds "b" in, drops "a"
    torch.testing.assert_close(logits(merged, token_ids), logits(alone, token_ids), rtol=0, atol=ATOL)
