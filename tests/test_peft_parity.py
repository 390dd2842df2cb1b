"""peft 0.21's behaviour where readers meet it (issue 25), side by side with peft: a merged model disabled,
a refused deletion, AdaLoRA's oversized ranks, peft's layer-level names, load_adapter(config=...), the words
of peft's errors, and the differences minilora keeps on purpose, each pinned against what peft does.

The adapters' dtype and the meta device (peft's autocast_adapter_dtype and low_cpu_mem_usage) are
tests/test_adapter_placement.py.

Tolerance: float32 throughout. Where both libraries run the same float operations (merging is W += ΔW with
ΔW = (B @ A) * s in both) the results are compared bit for bit. Unmerging gives W0 back up to the two
roundings of W0 + ΔW − ΔW, bounded exactly per entry below; through the tiny Llama (logits ~1) that moves
the logits by far less than the ATOL = 1e-5 the other peft comparisons use (tests/test_lora.py).
"""

import warnings

import peft
import pytest
import torch
from bitwise import bits
from safetensors.torch import load_file
from torch import nn

from minilora.adalora import AdaLoraConfig, add_adalora, orthogonal_penalty, svd_layers
from minilora.adapters import load_adapter, save_adapter
from minilora.family import add_dora
from minilora.lora import LoraConfig, LoRALinear, adapter_names, add_lora, lora_layers
from minilora.switching import active_adapter, add_weighted_adapter, delete_adapter, disable_adapter, set_adapter

ATOL = 1e-5
TARGETS = ("q_proj", "v_proj")


def peft_config(config: LoraConfig, dora: bool = False) -> peft.LoraConfig:
    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                           use_dora=dora, modules_to_save=config.modules_to_save, task_type="CAUSAL_LM")


def paired(tiny_llama, dora: bool = False, config: LoraConfig | None = None):
    """(ours, peft's) on the same tiny Llama with the same A, B (B moved off zero) and DoRA magnitudes."""
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    ours = (add_dora if dora else add_lora)(tiny_llama(), config)
    pm = peft.get_peft_model(tiny_llama(), peft_config(config, dora)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = peft_layer(pm, name)
            theirs.lora_B["default"].weight.normal_(0, 0.1, generator=gen)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)
            if dora:
                theirs.lora_magnitude_vector["default"].weight.mul_(1.1)
                layer.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    return ours, pm


def peft_layer(pm, name: str):
    return pm.base_model.model.get_submodule(name)


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: every tensor bit for bit, every module's type, which
    parameters train, the adapters and the active one."""
    return dict(tensors={key: bits(value) if value.dtype == torch.float32 else value.clone()
                         for key, value in model.state_dict().items()},
                types={name: type(module) for name, module in model.named_modules()},
                trainable={name for name, p in model.named_parameters() if p.requires_grad},
                adapters=adapter_names(model), active=active_adapter(model),
                flags={name: (m.merged, m.disabled) for name, m in lora_layers(model).items()})


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key in ("types", "trainable", "adapters", "active", "flags"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at |x|."""
    return torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs()


# ----------------------------------------------------------------------------------------------------
# 1. disable_adapter() on a merged model: the pretrained model (peft's test_disable_adapters_with_merging)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_disable_adapter_on_a_merged_model_gives_the_pretrained_model(tiny_llama, token_ids, dora):
    """Before: the merged ΔW stayed in W0 and `with disable_adapter(model)` was off the pretrained logits by ~3.
    Now the merged layers are unmerged for the duration (peft too) and merged again on exit (peft leaves
    them unmerged)."""
    ours, pm = paired(tiny_llama, dora)
    pretrained, adapted = logits(tiny_llama(), token_ids), logits(ours, token_ids)
    assert (adapted - pretrained).abs().max() > 0.1                       # the adapter really contributes
    W0 = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(ours).items()}
    for layer in lora_layers(ours).values():
        layer.merge()
    W1 = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(ours).items()}
    pm.merge_adapter()
    merged = logits(ours, token_ids)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=ATOL)
    # LoRA merges and unmerges with the same float operations as peft: equal bit for bit. DoRA's unmerge,
    # W' ‖W0 + sBA‖ / m − sBA, is written with other operations in peft: a few float32 roundings of weights
    # |w| < 1 apart, each under 2^-24, so 1e-6 bounds them with room (measured 7.5e-9).
    exact = dict(rtol=0, atol=1e-6 if dora else 0)
    with disable_adapter(ours), pm.disable_adapter():
        assert active_adapter(ours) is None and not any(layer.merged for layer in lora_layers(ours).values())
        disabled, peft_disabled = logits(ours, token_ids), logits(pm, token_ids)
        for name, layer in lora_layers(ours).items():
            unmerged = layer.base.weight.detach()
            torch.testing.assert_close(unmerged, peft_layer(pm, name).base_layer.weight, **exact)
            if not dora:   # W0' = fl(fl(W0 + ΔW) − ΔW): two roundings, each at most half a unit of its result
                assert ((unmerged - W0[name]).abs() <= (ulp(W1[name]) + ulp(unmerged)) / 2).all()
    torch.testing.assert_close(disabled, peft_disabled, rtol=0, atol=ATOL if dora else 0)
    torch.testing.assert_close(disabled, pretrained, rtol=0, atol=ATOL)
    assert all(layer.merged for layer in lora_layers(ours).values())     # merged again ...
    torch.testing.assert_close(logits(ours, token_ids), merged, rtol=0, atol=ATOL)
    assert not any(peft_layer(pm, name).merged for name in lora_layers(ours))   # ... where peft's stay unmerged


def test_disable_adapter_restores_the_merge_after_an_error(tiny_llama, token_ids):
    ours, _ = paired(tiny_llama)
    ours.model.layers[1].self_attn.v_proj.merge()                        # one layer merged, the others not
    with pytest.raises(RuntimeError, match="inside"), disable_adapter(ours):
        raise RuntimeError("inside")
    assert [layer.merged for layer in lora_layers(ours).values()] == [False, False, False, True]
    assert not any(layer.disabled for layer in lora_layers(ours).values())


# ----------------------------------------------------------------------------------------------------
# 2. delete_adapter: every layer checked first, then changed
# ----------------------------------------------------------------------------------------------------


def test_delete_adapter_refused_leaves_the_model_exactly_as_it_was(tiny_llama, token_ids):
    """Before: with only the second adapted layer merged, delete_adapter stripped the first layer's adapter,
    then refused on the second. Now it refuses first, in peft's words, and nothing has changed."""
    ours, pm = paired(tiny_llama)
    merged = "model.layers.1.self_attn.v_proj"
    ours.get_submodule(merged).merge()
    peft_layer(pm, merged).merge()
    before = snapshot(ours)
    with pytest.raises(ValueError) as theirs:
        pm.delete_adapter("default")
    with pytest.raises(ValueError, match=r"cannot delete adapter\(s\) \['default'\] while they are merged: "
                                         r"layers \['model.layers.1.self_attn.v_proj'\].*unmerge them first"):
        delete_adapter(ours, "default")
    assert str(theirs.value) == "Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first."
    assert_unchanged(ours, before)
    ours.get_submodule(merged).unmerge()
    peft_layer(pm, merged).unmerge()
    delete_adapter(ours, "default")                                      # now it goes through, as peft's does
    pm.delete_adapter("default")
    assert not lora_layers(ours) and all(type(ours.get_submodule(name)) is nn.Linear
                                         for name in before["flags"])
    torch.testing.assert_close(logits(ours, token_ids), logits(pm.base_model.model, token_ids), rtol=0, atol=0)


def test_delete_adapter_with_another_merged_and_an_unknown_name(tiny_llama):
    ours, pm = paired(tiny_llama)
    add_lora(ours, LoraConfig(r=2, target_modules=("v_proj",)), "b")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    for layer in lora_layers(ours).values():
        layer.merge()                                                    # "default" merged; "b" waits, parked
    delete_adapter(ours, "b")
    pm.delete_adapter("b")
    assert adapter_names(ours) == ["default"] and all(layer.merged for layer in lora_layers(ours).values())
    before = snapshot(ours)
    with pytest.raises(ValueError) as theirs:
        pm.delete_adapter("nope")
    with pytest.raises(ValueError, match=r"delete_adapter: adapter 'nope' does not exist: .* \(it has \['default'\]"):
        delete_adapter(ours, "nope")
    assert str(theirs.value) == "Adapter nope does not exist"                # the words ours contains
    assert_unchanged(ours, before)


# ----------------------------------------------------------------------------------------------------
# 4. AdaLoRA's init_r above min(in, out): accepted with a warning, as LoRA's r and as peft
# ----------------------------------------------------------------------------------------------------

ADALORA = dict(init_r=24, target_r=4, total_step=10, lora_alpha=8)   # q_proj is 32 x 32, v_proj 16 x 32


def test_adalora_accepts_an_init_r_above_min_in_out_like_peft(tiny_llama, token_ids, tmp_path):
    config = AdaLoraConfig(target_modules=TARGETS, **ADALORA)
    with pytest.warns(UserWarning) as record:
        ours = add_adalora(tiny_llama(), config)
    oversized = [str(w.message) for w in record if "rank larger than their weight allows" in str(w.message)]
    assert len(oversized) == 1                                            # one warning, naming the layers
    assert "2 layer(s)" in oversized[0] and "model.layers.0.self_attn.v_proj (r=24 > min(32, 16))" in oversized[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(target_modules=list(TARGETS),
                                                                  task_type="CAUSAL_LM", **ADALORA))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():
            theirs = peft_layer(pm, name)
            theirs.lora_E["default"].normal_(0, 0.5, generator=gen)
            for kind in ("lora_A", "lora_E", "lora_B"):
                assert getattr(layer, kind).shape == getattr(theirs, kind)["default"].shape
                getattr(layer, kind).copy_(getattr(theirs, kind)["default"])
    pm.eval(), ours.eval()
    torch.testing.assert_close(logits(ours, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)
    # Files both ways, at the oversized rank.
    save_adapter(ours, tmp_path / "ours", config)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, token_ids), logits(ours, token_ids), rtol=0, atol=ATOL)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="rank larger than their weight allows"):
        loaded = load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)


def test_an_oversized_adalora_rank_puts_a_floor_under_the_penalty():
    """What the chapter says it costs: P (out x r) has rank <= out, so Pᵀ P (r x r) has at least r − out zero
    eigenvalues and ||Pᵀ P − I||_F >= √(r − out); likewise ||Q Qᵀ − I||_F >= √(r − in). The penalty, their
    mean, can never reach 0, however long it trains. For a 16 x 32 layer at r = 24: √8 for P, 0 for Q."""
    with pytest.warns(UserWarning, match=r"0 \(r=24 > min\(32, 16\)\)"):
        model = add_adalora(nn.Sequential(nn.Linear(32, 16)), AdaLoraConfig(target_modules=("0",), **ADALORA))
    layer = model[0]
    with torch.no_grad():                                     # the best P and Q can do: orthonormal where they can
        layer.lora_A.copy_(torch.eye(24, 32))
        layer.lora_B.copy_(torch.eye(16, 24))
    floor = (0 + 8 ** 0.5) / 2
    torch.testing.assert_close(orthogonal_penalty(model), torch.tensor(floor), rtol=1e-6, atol=0)
    with torch.no_grad():
        layer.lora_A.normal_(), layer.lora_B.normal_()
    assert orthogonal_penalty(model) > floor


def test_ranks_from_files_are_bounded_alike_for_lora_and_adalora(tiny_llama, tmp_path):
    """Above max(in, out) a factor holds more numbers than the weight: refused from a file for both, before
    anything of that size is built; between min and max both load, with the warning."""
    from safetensors.torch import save_file

    for kind, config in (("lora", {"peft_type": "LORA", "r": 40, "lora_alpha": 8}),
                         ("adalora", {"peft_type": "ADALORA", "init_r": 40, "lora_alpha": 8, "total_step": 10})):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "adapter_config.json").write_text(__import__("json").dumps(
            {**config, "target_modules": ["v_proj"]}))                  # v_proj: 16 x 32, max 32 < 40
        save_file({}, folder / "adapter_model.safetensors")
        model = tiny_llama()
        label = "r" if kind == "lora" else "init_r"
        with pytest.raises(ValueError, match=rf"{label}=40 is larger than max\(in_features, out_features\) = "
                                             r"max\(32, 16\)"):
            load_adapter(model, folder)
        assert not lora_layers(model) and not svd_layers(model)


# ----------------------------------------------------------------------------------------------------
# 6. peft's layer-level names, side by side with peft's layers
# ----------------------------------------------------------------------------------------------------


def layer_state(layer) -> tuple:
    """What peft's tuner-layer API says about a layer, in peft's names, and whether its adapter trains."""
    if isinstance(layer, LoRALinear):   # ours: the active adapter's own lora_A, lora_B (, magnitudes)
        own = [p for name, p in layer.named_parameters(recurse=False) if name.startswith("lora_")]
    else:                               # peft's: lora_A.default.weight, ...
        own = [p for name, p in layer.named_parameters() if name.startswith("lora_") and ".default." in name]
    return (layer.active_adapters, layer.merged, layer.merged_adapters, layer.disable_adapters,
            [p.requires_grad for p in own])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_layer_api_equals_peft_layer_by_layer(tiny_llama, dora):
    ours, pm = paired(tiny_llama, dora)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    name = "model.layers.0.self_attn.q_proj"
    mine, theirs = ours.get_submodule(name), peft_layer(pm, name)
    pretrained = theirs.get_base_layer()(x).detach().clone()
    assert mine.get_base_layer() is mine.base and isinstance(theirs.get_base_layer(), nn.Linear)

    def same(expected_output=None):
        assert layer_state(mine) == layer_state(theirs)
        torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=ATOL)
        if expected_output is not None:
            torch.testing.assert_close(mine(x), expected_output, rtol=0, atol=ATOL)

    same()
    assert layer_state(mine) == (["default"], False, [], False, [True] * (3 if dora else 2))
    mine.enable_adapters(False), theirs.enable_adapters(False)
    same(pretrained)
    mine.enable_adapters(True), theirs.enable_adapters(True)
    same()
    adapted = mine(x).detach()
    mine.merge(adapter_names=["default"]), theirs.merge(adapter_names=["default"])
    same(adapted)
    assert mine.merged_adapters == ["default"] and mine.merged
    mine.enable_adapters(False), theirs.enable_adapters(False)           # a merged layer, disabled: W0 x
    theirs(x)                                                            # (peft unmerges in this forward)
    same(pretrained)
    mine.enable_adapters(True), theirs.enable_adapters(True)             # neither merges again
    same(adapted)
    assert not mine.merged
    with pytest.raises(AttributeError):
        mine.disable_adapters = True                                     # read-only, as peft's
    with pytest.raises(ValueError, match=r"merges its active adapter only \('default'\).*one adapter active"):
        mine.merge(adapter_names=["default", "other"])
    with pytest.raises(TypeError, match="enabled must be True or False"):
        mine.enable_adapters(0)


def test_a_script_written_against_peft_layers_runs_on_ours(tiny_llama, token_ids):
    """The loop several training scripts run to get the reference model's logits (DPO, KTO): switch every
    tuner layer off, compute, switch them on again. The same function on both models."""

    def reference_logits(model):
        # peft's tuner layers (BaseTunerLayer, and AuxiliaryTrainingWrapper for modules_to_save) have the
        # property disable_adapters; a transformers model has a method of that name, and is skipped.
        layers = [m for m in model.modules() if isinstance(getattr(type(m), "disable_adapters", None), property)]
        for module in layers:
            module.enable_adapters(False)
        try:
            return logits(model, token_ids)
        finally:
            for module in layers:
                module.enable_adapters(True)

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    ours, pm = paired(tiny_llama, config=config)
    with torch.no_grad():
        ours.lm_head.modules_to_save.weight.mul_(1.5)
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    adapted = logits(ours, token_ids)
    torch.testing.assert_close(reference_logits(ours), reference_logits(pm), rtol=0, atol=ATOL)
    torch.testing.assert_close(reference_logits(ours), logits(tiny_llama(), token_ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, token_ids), adapted, rtol=0, atol=0)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in add_lora(tiny_llama(), config).named_parameters() if p.requires_grad}


def test_load_adapter_with_a_config_like_peft_from_pretrained(tiny_llama, token_ids, tmp_path):
    """PeftModel.from_pretrained(model, folder, config=...): the config given, not the folder's; the folder
    then needs only the weights."""
    ours, pm = paired(tiny_llama)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    save_adapter(ours, tmp_path, config)
    (tmp_path / "adapter_config.json").unlink()
    loaded = load_adapter(tiny_llama(), tmp_path, config=config)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=peft_config(config))
    torch.testing.assert_close(logits(loaded, token_ids), logits(theirs, token_ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(loaded, token_ids), logits(ours, token_ids), rtol=0, atol=0)
    model = tiny_llama()
    before = {key: bits(value) for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"load_adapter\(config=LoraConfig\(...\)\): the config does not fit.*"
                                         r"matched no module"):
        load_adapter(model, tmp_path, config=LoraConfig(r=4, target_modules=("nope",)))
    with pytest.raises(TypeError, match="config must be None .* or a minilora LoraConfig or AdaLoraConfig, got "
                                        "LoraConfig"):
        load_adapter(model, tmp_path, config=peft_config(config))       # peft's config class is not ours
    assert not lora_layers(model) and all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------
# 7. peft's words in our errors, where a user would search for them
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, peft_words, ours", [
    (dict(total_step=None), "AdaLoRA does not work when `total_step` is None, supply a value > 0.",
     r"total_step must be an integer >= 1 \(.*AdaLoRA does not work when total_step is None, supply a value "
     r"> 0\), got total_step=None"),
    (dict(total_step=10, orth_reg_weight=-0.5),
     "`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0.5",
     r"orth_reg_weight must be a number in \[0, ∞\) \(it should be greater than or equal to 0.*got "
     r"orth_reg_weight=-0.5"),
    (dict(total_step=10, tinit=6, tfinal=4),
     "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or increase "
     "`total_step`.",
     r"tinit \+ tfinal must be < total_step.*got tinit=6 \+ tfinal=4 >= total_step=10: the supplied schedule "
     r"values don't allow for a budgeting phase; decrease tfinal/tinit or increase total_step"),
])
def test_adalora_config_errors_carry_peft_words(settings, peft_words, ours):
    with pytest.raises(ValueError) as theirs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.AdaLoraConfig(target_modules=["q_proj"], **settings)
    assert str(theirs.value) == peft_words
    with pytest.raises(ValueError, match=ours):
        AdaLoraConfig(target_modules=("q_proj",), **settings)


# ----------------------------------------------------------------------------------------------------
# Deliberate differences: each refused here, with what peft does beside it (chapter 1 §12 states them)
# ----------------------------------------------------------------------------------------------------


def test_a_pickled_adapter_model_bin_is_refused_unread(tiny_llama, tmp_path, monkeypatch):
    ours, pm = paired(tiny_llama)
    pm.save_pretrained(tmp_path, safe_serialization=False)             # peft writes adapter_model.bin
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)               # peft unpickles it
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("minilora unpickled the file"))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"adapter_model.bin is a pickle \(torch.save\), and minilora never "
                                         r"unpickles a file it is handed.*safe_serialization=True"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_one_active_adapter_at_a_time(tiny_llama, token_ids):
    ours, pm = paired(tiny_llama)
    add_lora(ours, LoraConfig(r=2, target_modules=("v_proj",)), "b")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    pm.base_model.set_adapter(["default", "b"])                          # peft: both active, summed
    assert peft_layer(pm, "model.layers.0.self_attn.v_proj").active_adapters == ["default", "b"]
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"minilora keeps one adapter active at a time .*add_weighted_adapter"):
        set_adapter(ours, ["default", "b"])
    assert_unchanged(ours, before)
    add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "sum", "cat")   # what the message proposes
    set_adapter(ours, ["sum"])                                           # a list of one is peft's spelling too
    torch.testing.assert_close(logits(ours, token_ids), logits(pm, token_ids), rtol=0, atol=ATOL)


def test_a_second_adapter_beside_modules_to_save_is_refused(tiny_llama):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    ours, pm = paired(tiny_llama, config=config)
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))  # peft: ok
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"adapter 'b' cannot go beside \['default'\].*modules_to_save empty"):
        add_lora(ours, LoraConfig(r=2, target_modules=("v_proj",), modules_to_save=["lm_head"]), "b")
    assert_unchanged(ours, before)


def test_deleting_the_active_adapter_is_refused(tiny_llama):
    ours, pm = paired(tiny_llama)
    add_lora(ours, LoraConfig(r=2, target_modules=("v_proj",)), "b")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    pm.delete_adapter("default")                     # peft: allowed; the layers that hold "b" switch to it ...
    assert list(pm.peft_config) == ["b"]
    assert pm.base_model.model.get_submodule("model.layers.0.self_attn.v_proj").active_adapters == ["b"]
    assert pm.active_adapter == "default" and pm.base_model.active_adapter == []   # ... the model names neither
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"'default' is the active adapter; set_adapter to one of \['b'\] first"):
        delete_adapter(ours, "default")
    assert_unchanged(ours, before)


def test_a_second_merge_is_refused(tiny_llama):
    ours, pm = paired(tiny_llama)
    mine, theirs = ours.model.layers[0].self_attn.q_proj, peft_layer(pm, "model.layers.0.self_attn.q_proj")
    mine.merge(), theirs.merge()
    weight = bits(mine.base.weight).clone()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        theirs.merge()                                                   # peft: a warning, and nothing happens
    with pytest.raises(RuntimeError, match="already merged; call unmerge"):
        mine.merge()
    assert torch.equal(bits(mine.base.weight), weight) and mine.merged


def test_saved_files_carry_no_option_peft_does_not_write(tiny_llama, tmp_path):
    """autocast_adapter_dtype and low_cpu_mem_usage are peft's arguments of get_peft_model and from_pretrained,
    not config fields: neither library writes them into adapter_config.json; the tensors carry their dtype."""
    ours, pm = paired(tiny_llama)
    save_adapter(ours, tmp_path / "ours", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    pm.save_pretrained(tmp_path / "peft")
    for folder in ("ours", "peft"):
        text = (tmp_path / folder / "adapter_config.json").read_text()
        assert "autocast" not in text and "low_cpu" not in text
        assert {t.dtype for t in load_file(tmp_path / folder / "adapter_model.safetensors").values()} == {torch.float32}
