"""Adapter files: minilora and peft 0.21 load each other's adapters; bad files fail naming file and key."""

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora.adapters as adapters
from minilora.adapters import load_adapter, save_adapter
from minilora.lora import LoraConfig, add_lora, lora_layers


def trained_ours(tiny_llama, **config_kwargs):
    """A tiny Llama with LoRA whose B is nonzero (as after training), and its config."""
    config = LoraConfig(**{"r": 4, "lora_alpha": 16, **config_kwargs})
    model = add_lora(tiny_llama(), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    return model, config


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


@pytest.mark.parametrize("config_kwargs", [
    {},
    {"target_modules": "all-linear", "init": "gaussian", "lora_dropout": 0.1},
    {"target_modules": r"model\.layers\.0\..*_proj", "r": 2, "lora_alpha": 3},
])
def test_minilora_adapter_loads_in_peft(config_kwargs, tiny_llama, token_ids, tmp_path):
    ours, config = trained_ours(tiny_llama, **config_kwargs)
    save_adapter(ours, tmp_path / "adapter", config)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    assert sorted(theirs.base_model.targeted_module_names) == sorted(lora_layers(ours))
    assert torch.allclose(logits(theirs, token_ids), logits(ours, token_ids), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(tiny_llama(), token_ids), logits(ours, token_ids), atol=1e-3)


def test_file_format(tiny_llama, tmp_path):
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    # no temporary files left behind
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    v = "base_model.model.model.layers.1.self_attn.v_proj"
    assert len(tensors) == 8   # 2 layers x (q, v) x (A, B)
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32) and tensors[f"{q}.lora_B.weight"].shape == (32, 4)
    assert tensors[f"{v}.lora_A.weight"].shape == (4, 32) and tensors[f"{v}.lora_B.weight"].shape == (16, 4)
    assert torch.equal(tensors[f"{v}.lora_B.weight"], ours.model.layers[1].self_attn.v_proj.lora_B.detach())
    config_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config_json[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                        "task_type", "bias")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "bias": "none"}


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapter_loads_in_minilora(target_modules, tiny_llama, token_ids, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), peft_config)
    gen = torch.Generator().manual_seed(7)
    for name, param in theirs.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, token_ids)

    injected = load_adapter(tiny_llama(), tmp_path)          # plain model: layers come from the config
    assert sorted(lora_layers(injected)) == sorted(theirs.base_model.targeted_module_names)
    assert torch.allclose(logits(injected, token_ids), expected, atol=1e-6, rtol=0)
    assert [n for n, p in injected.named_parameters() if p.requires_grad] == \
        [n for n, _ in injected.named_parameters() if "lora_" in n]

    prepared = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=target_modules))
    assert load_adapter(prepared, tmp_path) is prepared      # model that already has the layers: just load
    assert torch.allclose(logits(prepared, token_ids), expected, atol=1e-6, rtol=0)


def test_round_trip_and_overwrite(tiny_llama, token_ids, tmp_path):
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    other, _ = trained_ours(tiny_llama)
    with torch.no_grad():
        for layer in lora_layers(other).values():
            layer.lora_B.mul_(-2)
    save_adapter(other, tmp_path, config)                   # overwrite in place
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path), token_ids), logits(other, token_ids))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_failed_write_keeps_old_files(tiny_llama, tmp_path, monkeypatch):
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ours, tmp_path, config)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------------------------------
# Broken files: every one is an error naming the file and what is wrong
# ----------------------------------------------------------------------------------------------------

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _drop_key(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[Q_A]
    save_file(tensors, folder / "adapter_model.safetensors")


def _extra_key(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, folder / "adapter_model.safetensors")


def _wrong_prefix(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.", ""): v for k, v in tensors.items()},
              folder / "adapter_model.safetensors")


def _wrong_shape(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A] = torch.zeros(4, 31)
    save_file(tensors, folder / "adapter_model.safetensors")


def _int_tensor(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A] = torch.zeros(4, 32, dtype=torch.int64)
    save_file(tensors, folder / "adapter_model.safetensors")


def _truncate(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        for key, value in changes.items():
            if value is KeyError:
                del config[key]
            else:
                config[key] = value
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("corrupt, error, match", [
    (lambda f: os.remove(f / "adapter_model.safetensors"), FileNotFoundError, "adapter_model.safetensors"),
    (lambda f: os.remove(f / "adapter_config.json"), FileNotFoundError, "adapter_config.json"),
    (_truncate, ValueError, "adapter_model.safetensors.*truncated or corrupt"),
    (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LO'), ValueError,
     "adapter_config.json.*not valid JSON"),
    (_drop_key, ValueError, "adapter_model.safetensors.*missing.*layers.0.self_attn.q_proj.lora_A"),
    (_extra_key, ValueError, "adapter_model.safetensors.*unexpected.*k_proj.lora_A"),
    (_wrong_prefix, ValueError, "missing"),
    (_wrong_shape, ValueError, r"q_proj.lora_A.weight' has shape \(4, 31\).*expects \(4, 32\)"),
    (_int_tensor, ValueError, "q_proj.lora_A.weight' has dtype torch.int64"),
    (_edit_config(r=8), ValueError, r"lora_A.weight' has shape \(4, 32\).*expects \(8, 32\)"),
    (_edit_config(r=KeyError), ValueError, "adapter_config.json.*'r' is missing"),
    (_edit_config(r=0), ValueError, "adapter_config.json.*r=0"),
    (_edit_config(peft_type=KeyError), ValueError, "peft_type"),
    (_edit_config(peft_type="IA3"), ValueError, "peft_type='IA3' is not supported"),
    (_edit_config(fan_in_fan_out=True), ValueError, "fan_in_fan_out=True is not supported"),
    (_edit_config(use_dora=True), ValueError, "missing.*lora_magnitude_vector"),   # a DoRA file has m
    (_edit_config(bias="some"), ValueError, "bias='some'"),
    (_edit_config(target_modules=["nope"]), ValueError, "adapter_config.json.*matched no module"),
])
def test_broken_files_fail_loudly(corrupt, error, match, tiny_llama, tmp_path):
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    corrupt(tmp_path)
    model = tiny_llama()
    with pytest.raises(error, match=match):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)   # a failed load leaves the model as it was


def test_mismatched_model_and_bad_calls(tiny_llama, tmp_path):
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    with pytest.raises(ValueError, match=r"adapts other layers .*mlp.up_proj"):        # model adapted elsewhere
        load_adapter(add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["up_proj"])), tmp_path)
    with pytest.raises(ValueError, match=r"load_adapter: .*q_proj' has r=2.*config says r=4"):   # another rank
        load_adapter(add_lora(tiny_llama(), LoraConfig(r=2)), tmp_path)
    merged = add_lora(tiny_llama(), config)
    lora_layers(merged)["model.layers.0.self_attn.q_proj"].merge()
    with pytest.raises(ValueError, match="merged"):
        load_adapter(merged, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'default'"):
        save_adapter(tiny_llama(), tmp_path / "x", config)
    with pytest.raises(ValueError, match="r=4.*config says r=8"):
        save_adapter(ours, tmp_path / "x", LoraConfig(r=8, lora_alpha=16))
    with pytest.raises(TypeError, match="LoraConfig"):
        save_adapter(ours, tmp_path / "x", {"r": 4})


# ----------------------------------------------------------------------------------------------------
# Defects found by trying the API as a new user (issue 13)
# ----------------------------------------------------------------------------------------------------


def test_encoder_adapter_leaves_task_type_unset_and_loads_in_peft(tmp_path):
    """A BertModel cannot generate: a CAUSAL_LM task type made peft fail with 'BertModel' object has no
    attribute 'prepare_inputs_for_generation'. The task type is inferred from the model now."""
    from transformers import BertConfig, BertModel

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64)).eval()

    config = LoraConfig(r=4, target_modules=("query", "value"))
    ours = add_lora(bert(), config)
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B)
    save_adapter(ours, tmp_path, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state)


def test_causal_lm_task_type_is_inferred_and_can_be_given(tiny_llama, tmp_path):
    model, config = trained_ours(tiny_llama)
    save_adapter(model, tmp_path / "a", config)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    save_adapter(model, tmp_path / "b", config, task_type=None)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] is None


def test_config_that_does_not_describe_the_layers_is_refused(tiny_llama, tmp_path):
    model, _ = trained_ours(tiny_llama)   # q_proj and v_proj
    with pytest.raises(ValueError, match=r"the config does not select the model's LoRA layers"):
        save_adapter(model, tmp_path, LoraConfig(r=4, lora_alpha=16, target_modules=("k_proj",)))
    with pytest.raises(ValueError, match="does not select"):
        save_adapter(model, tmp_path, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    assert not (tmp_path / "adapter_config.json").exists()


def test_save_adapter_refuses_a_config_that_does_not_say_what_the_layers_are(tiny_llama, tmp_path):
    """DoRA layers saved with use_dora=False, or α/√r layers with use_rslora=False: peft would load another
    model from the file, so the config must say it."""
    from minilora.family import add_dora, apply_rslora

    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"DoRA=True, but the config says .*DoRA=False"):
        save_adapter(add_dora(tiny_llama(seed=0), config), tmp_path / "dora", config)
    with pytest.raises(ValueError, match=r"use_rslora=False"):
        save_adapter(apply_rslora(add_lora(tiny_llama(seed=0), config)), tmp_path / "rslora", config)
    assert not (tmp_path / "dora").exists() and not (tmp_path / "rslora").exists()


# ----------------------------------------------------------------------------------------------------
# Hostile files: refused before they cost time or memory (issue 26)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    (dict(target_modules=5), "target_modules must be a list of module names or a regex string, got 5"),
    (dict(target_modules=["q_proj", 7]), "target_modules must be a list"),
    (dict(target_modules="(.*)*X"), r"repeat only single characters .* not a group"),    # 2^n steps
    (dict(target_modules="(a+)+X"), "not a group"),
    (dict(target_modules="(q|qq)*X"), "not a group"),                                    # overlapping branches
    (dict(target_modules=".*.*.*.*.*X"), "at most 4 times"),                             # n^5 steps
    (dict(target_modules=r"(q)\1"), "backreferences"),
    (dict(target_modules="q_proj|" * 40 + "v_proj"), "at most 200 characters"),
    (dict(exclude_modules="(.*)*X"), "exclude_modules '.*not a group"),
    (dict(rank_pattern={"(.*)*X": 2}), "rank_pattern key"),
    (dict(alpha_pattern={"(.+)+X": 2}), "alpha_pattern key"),
    (dict(modules_to_save=["(.*)*X"]), "modules_to_save entries must be module names"),
])
def test_hostile_configs_are_refused_before_matching(changes, match, tiny_llama, tmp_path):
    """`target_modules: "(.*)*X"` hung load_adapter (Python's re backtracks: 2^n steps on an n-character
    name; peft hangs the same way), and `target_modules: 5` was a bare TypeError. The config is checked
    before any name is matched, so each of these is a ValueError naming the file."""
    from minilora.adapter_files import check_adapter_config

    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    _edit_config(**changes)(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    if "target_modules" not in changes:   # checked without matching anything: this cannot hang
        with pytest.raises(ValueError, match=match):
            check_adapter_config(json.loads(config_file.read_text()), config_file)
    model = tiny_llama()
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, tmp_path)
    assert str(config_file) in str(err.value) and len(str(err.value)) < 1000
    assert not lora_layers(model)


def test_peft_style_regexes_still_load(tiny_llama, token_ids, tmp_path):
    """The bound leaves the regexes people write: peft's examples, a lookahead, a digit class."""
    for pattern in (r".*\.(q_proj|v_proj)", r"^(?!.*layers\.1\.).*\.(q|v)_proj$",
                    r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r".*decoder.*|.*layers.*(q|v)_proj"):
        ours, config = trained_ours(tiny_llama, target_modules=pattern)
        save_adapter(ours, tmp_path / "a", config)
        assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path / "a"), token_ids), logits(ours, token_ids))


def test_deeply_nested_json_is_an_error_naming_the_file(tiny_llama, tmp_path):
    """A config of 100 000 nested brackets raised RecursionError."""
    ours, config = trained_ours(tiny_llama)
    save_adapter(ours, tmp_path, config)
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"adapter_config.json: JSON nested too deeply"):
        load_adapter(tiny_llama(), tmp_path)


def test_a_huge_adalora_init_r_is_refused_before_allocating(tiny_llama, tmp_path):
    """`init_r: 100000000` built a list of init_r booleans per module (0.8 GB each) before the file was
    refused. The rank is checked against the layers' shapes first; Python's allocator (tracemalloc) sees
    under 10 MB on the way to the error."""
    import tracemalloc

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADALORA", "init_r": 100_000_000, "lora_alpha": 8, "target_modules": ["q_proj"],
         "total_step": 10}))
    save_file({}, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"adapter_config.json: .*init_r=100000000 do not fit.*max\(32, 32\)"):
            load_adapter(model, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20
    assert not lora_layers(model)


def test_adapter_files_follow_the_umask(tiny_llama, tmp_path):
    """Adapters were written 0600 (mkstemp's mode), so a collaborator could not read them; peft and Hugging
    Face write with the umask (0644 under 022)."""
    ours, config = trained_ours(tiny_llama)
    old = os.umask(0o022)
    try:
        save_adapter(ours, tmp_path / "a", config)
        os.umask(0o002)
        save_adapter(ours, tmp_path / "b", config)
    finally:
        os.umask(old)
    for folder, mode in (("a", 0o644), ("b", 0o664)):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (tmp_path / folder / name).stat().st_mode & 0o777 == mode, (folder, name)
