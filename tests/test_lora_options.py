"""LoraConfig's peft options against peft 0.21 as the oracle: which modules, which rank and scale, what else
trains (bias, modules_to_save), files both ways, safe_merge.

Tolerance: everything runs in float32. Ours and peft's compute the same sums in another order (peft adds
the bypass through nn.Linear modules), a few ulp per operation; through these small models (dot products of
length <= 32, outputs ~1) that stays far below the 1e-5 tests/test_lora.py uses.
"""

import json

import peft
import pytest
import torch
from torch import nn

from minilora.adapters import load_adapter, save_adapter
from minilora.lora import LoraConfig, ModulesToSave, add_lora, lora_layers, merge_lora
from minilora.switching import disable_adapter
from minilora.targets import layer_index

ATOL = 1e-5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.up = nn.Linear(16, 16), nn.Linear(16, 12), nn.Linear(12, 16, bias=False)

    def forward(self, x):
        return torch.tanh(self.q(x) + self.up(self.v(x)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))


class Classifier(nn.Module):
    """Three blocks with biases and a classification head: what bias and modules_to_save are for."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.model = Inner()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for block in self.model.layers:
            x = block(x)
        return self.head(x)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))


def peft_of(model, config: LoraConfig):
    """peft's model for the same settings as our `config`."""
    fields = ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "rank_pattern",
              "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save")
    settings = {key: getattr(config, key) for key in fields}
    targets = config.target_modules
    settings["target_modules"] = targets if isinstance(targets, str) else list(targets)
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def peft_layers(pm):
    return {name.removeprefix("base_model.model."): m for name, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def randomize(pm, seed=3):
    """Move B, the biases and the saved modules' copies away from their start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def copy_into_ours(pm, ours):
    """Our model gets peft's trained values: A, B, biases and saved modules (peft's names mapped to ours)."""
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            peft_name = (name.replace(".lora_A", ".lora_A.default.weight").replace(".lora_B", ".lora_B.default.weight")
                         .replace(".base.", ".base_layer.").replace(".modules_to_save.", ".modules_to_save.default."))
            param.copy_(theirs[peft_name])


def paired(config, seed=0):
    ours = add_lora(Classifier(seed), config)
    pm = peft_of(Classifier(seed), config)
    randomize(pm)
    copy_into_ours(pm, ours)
    return ours, pm


def trainable(model, peft_names=False):
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return names


@pytest.mark.parametrize("settings", [
    dict(target_modules=["q", "v"], exclude_modules=["model.layers.1.v"]),
    dict(target_modules=["q", "v", "up"], exclude_modules=r".*\.1\..*"),
    dict(target_modules=["q", "v"], layers_to_transform=[0, 2]),
    dict(target_modules=["q", "v"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q", "v"], rank_pattern={"v": 2, r"layers\.0\.q": 6}, alpha_pattern={"q": 32}),
    dict(target_modules=["q", "v"], rank_pattern={"q": 2}, use_rslora=True),
    dict(target_modules=["q", "v", "up", "head"], modules_to_save=["head"]),
])
def test_selection_ranks_and_scales_equal_peft(settings):
    config = LoraConfig(r=4, lora_alpha=8, **settings)
    ours, pm = paired(config)
    theirs = peft_layers(pm)
    assert sorted(lora_layers(ours)) == sorted(theirs)
    for name, layer in lora_layers(ours).items():
        assert (layer.r, layer.scaling) == (theirs[name].r["default"], theirs[name].scaling["default"]), name
    torch.testing.assert_close(ours(X), pm(X), rtol=0, atol=ATOL)


def test_layer_index_follows_peft_rules():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("model.layers.1.experts.0.w1") == 1          # the first index, not an expert's
    assert layer_index("layers.3.q") is None                          # peft needs a component before
    assert layer_index("layers.3.q", "layers") == 3
    assert layer_index("transformer.h.7.attn.c_attn", ["blocks", "h"]) == 7
    assert layer_index("model.embed_tokens") is None


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_option_trains_what_peft_trains(bias):
    config = LoraConfig(r=4, target_modules=["q", "v"], bias=bias)
    ours, pm = paired(config)
    peft_names = {name.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer.", ".base.")
                  .replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
                  for name, p in pm.named_parameters() if p.requires_grad}
    assert trainable(ours) == peft_names
    assert sum("bias" in name for name in peft_names) == {"none": 0, "all": 7, "lora_only": 6}[bias]
    torch.testing.assert_close(ours(X), pm(X), rtol=0, atol=ATOL)


def test_modules_to_save_trains_a_copy_and_disabling_gives_the_original_back():
    config = LoraConfig(r=4, target_modules=["q", "v"], modules_to_save=["head"])
    ours, pm = paired(config)
    assert isinstance(ours.head, ModulesToSave)
    assert trainable(ours) >= {"head.modules_to_save.weight", "head.modules_to_save.bias"}
    assert not ours.head.original_module.weight.requires_grad
    torch.testing.assert_close(ours(X), pm(X), rtol=0, atol=ATOL)
    with disable_adapter(ours), pm.disable_adapter():
        torch.testing.assert_close(ours(X), Classifier(0)(X), rtol=0, atol=0)   # the pretrained model, exactly
        torch.testing.assert_close(pm(X), Classifier(0)(X), rtol=0, atol=ATOL)
    merged = merge_lora(ours)
    assert isinstance(merged.head, nn.Linear)
    torch.testing.assert_close(merged(X), pm(X), rtol=0, atol=ATOL)


def test_modules_to_save_refuses_tied_weights_and_unknown_names(tiny_llama):
    with pytest.raises(ValueError, match="lm_head' shares its weights with 'model.embed_tokens.weight'"):
        add_lora(tiny_llama(tie_word_embeddings=True), LoraConfig(modules_to_save=["lm_head"]))
    model = Classifier()
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\] matched no module"):
        add_lora(model, LoraConfig(target_modules=["q"], modules_to_save=["classifier"]))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())   # untouched


EVERYTHING = dict(target_modules=["q", "v", "up"], rank_pattern={"v": 2}, alpha_pattern={r"layers\.0\.q": 16},
                  layers_to_transform=[0, 2], exclude_modules=["model.layers.2.up"], bias="lora_only",
                  modules_to_save=["head"])


@pytest.mark.parametrize("use_rslora, use_dora", [(False, False), (True, False), (False, True)])
def test_files_with_every_option_load_both_ways(tmp_path, use_rslora, use_dora):
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, use_dora=use_dora, **EVERYTHING)
    pm = peft_of(Classifier(), config)
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_adapter(Classifier(), tmp_path / "peft")            # peft's file into ours
    torch.testing.assert_close(ours(X), pm(X), rtol=0, atol=ATOL)
    save_adapter(ours, tmp_path / "ours", config)                     # and ours into peft
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {key: written[key] for key in ("use_rslora", "use_dora", "bias", "modules_to_save")} == \
        dict(use_rslora=use_rslora, use_dora=use_dora, bias="lora_only", modules_to_save=["head"])
    theirs = peft.PeftModel.from_pretrained(Classifier(), tmp_path / "ours")
    torch.testing.assert_close(theirs(X), pm(X), rtol=0, atol=ATOL)
    assert not torch.allclose(theirs(X), Classifier()(X), atol=1e-3)   # the adapter does something


def test_safe_merge_refuses_a_diverged_adapter_and_changes_nothing():
    ours, _ = paired(LoraConfig(r=4, target_modules=["q", "v"]))
    layer = ours.model.layers[1].q
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    before = layer.base.weight.clone()
    with pytest.raises(ValueError, match=r"16 non-finite value\(s\).*Nothing was merged"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base.weight, before) and not layer.merged
    with pytest.raises(ValueError, match="layer 'model.layers.1.q'"):
        merge_lora(ours, safe_merge=True)
    assert len(lora_layers(ours)) == 6                                # no layer was merged or replaced
    layer.merge()                                                     # without the check: NaN goes in
    assert torch.isnan(layer.base.weight).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(bias="some"), r"bias must be one of .*'none', 'all', 'lora_only'.*got bias='some'"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be an integer >= 1"),
    (dict(alpha_pattern={"q": -1}), r"alpha_pattern\['q'\] must be a number in \(0, ∞\)"),
    (dict(rank_pattern=[("q", 2)]), "rank_pattern must be a dict"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform must be a block index >= 0"),
    (dict(exclude_modules="(unclosed"), "exclude_modules='\\(unclosed' is not a valid regular expression"),
    (dict(modules_to_save="head"), "modules_to_save must be None or a non-empty list"),
    (dict(use_dora=1), "use_dora must be True or False"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "need target_modules as a list"),
    (dict(layers_pattern="layers"), "layers_pattern='layers' needs layers_to_transform"),
    (dict(bias="all", modules_to_save=["head"]), "bias='all' with modules_to_save"),
])
def test_config_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_use_dora_needs_add_dora():
    with pytest.raises(ValueError, match="minilora.family.add_dora"):
        add_lora(Classifier(), LoraConfig(target_modules=["q"], use_dora=True))


def test_a_saved_module_with_submodules_goes_both_ways(tmp_path):
    """modules_to_save=["head"] on a head that is itself several layers: keys "head.0.weight", ... in peft."""
    def deep_head():
        model = Classifier()
        model.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
        return model

    config = LoraConfig(r=4, target_modules=["q"], modules_to_save=["head"])
    pm = peft_of(deep_head(), config)
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_adapter(deep_head(), tmp_path / "peft")
    torch.testing.assert_close(ours(X), pm(X), rtol=0, atol=ATOL)
    save_adapter(ours, tmp_path / "ours", config)
    theirs = peft.PeftModel.from_pretrained(deep_head(), tmp_path / "ours")
    torch.testing.assert_close(theirs(X), pm(X), rtol=0, atol=ATOL)
