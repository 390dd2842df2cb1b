"""minilora.model_builder and minilora.checkpoint_files: one way to build a model, layer by layer.

Oracle: transformers' `from_pretrained` on folders its own `save_pretrained` wrote (single file and shards,
bf16 / fp16 / fp32, tied embeddings): our builder must give the same tensors bit for bit. Then the two promises
the builder makes at 7B, checked on small models: the 16-bit model never exists whole (at most one decoder
layer is unquantized at any time), and a bad checkpoint folder is refused before anything is built, with an
error that names the file and the tensor. Last, the process-memory measurement (minilora.measure.HostMemory).
"""

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from minilora import build
from minilora.build import build_model, plan_model
from minilora.checkpoint_files import read_header
from minilora.data import pretrained_tiny_llama
from minilora.instructions import ByteTokenizer
from minilora.measure import HostMemory, status_bytes
from minilora.model_builder import ModelPlan, plan_checkpoint, plan_random, preset_config, tensor_names
from minilora.options import make_config
from minilora.qlora import Linear4bit, quantize_model
from minilora.train import train

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def small_config(tie: bool = False, layers: int = 2, **overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, **overrides)


def save_checkpoint(folder: Path, dtype: torch.dtype, tie: bool = False, sharded: bool = True) -> Path:
    """A small Llama saved by transformers itself (60 KB shards: 5 files; or one model.safetensors)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config(tie)).to(dtype)
    model.save_pretrained(folder, max_shard_size="60KB" if sharded else "1GB")
    return folder


def tensors_of(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


# ----------------------------------------------------------------------------------------------------
# The builder equals transformers' from_pretrained
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
@pytest.mark.parametrize("saved", ["fp32", "bf16", "fp16"])
def test_the_builder_equals_from_pretrained_bit_for_bit(tmp_path, saved, sharded, tie):
    folder = save_checkpoint(tmp_path / "ckpt", DTYPES[saved], tie, sharded)
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    for dtype in (torch.float32, torch.bfloat16):  # cast on reading, as from_pretrained(dtype=...) casts
        theirs = tensors_of(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
        model = plan_checkpoint(folder, dtype).build(CPU)
        ours = tensors_of(model)
        assert ours.keys() == theirs.keys()  # parameters (the tied head too) and the rotary tables
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        assert not model.training  # in eval mode, as from_pretrained returns a model


def test_a_random_model_is_seeded_per_tensor_and_drawn_as_transformers_draws(tmp_path):
    config = small_config(pad_token_id=0)
    first = tensors_of(plan_random(config, torch.float32, seed=3).build(CPU))
    again = plan_random(config, torch.float32, seed=3)
    names = list(tensor_names(again.skeleton)[0])
    backwards = again.weights(names[::-1], torch.float32, CPU)  # any order: each tensor has its own generator
    assert all(torch.equal(backwards[n], first[n]) for n in names)
    other = tensors_of(plan_random(config, torch.float32, seed=4).build(CPU))
    assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"], first["model.layers.0.mlp.up_proj.weight"])
    # transformers' init for Llama: N(0, 0.02²) weights, norms 1, the padding row 0. The sample std of n draws
    # has a standard error of σ/√(2n): 0.02/√(2·8192) = 1.6e-4 for up_proj (128 × 64); 5 of them is 8e-4.
    assert abs(first["model.layers.0.mlp.up_proj.weight"].std().item() - 0.02) < 8e-4
    assert torch.equal(first["model.norm.weight"], torch.ones(64))
    assert torch.equal(first["model.embed_tokens.weight"][0], torch.zeros(64))


def test_a_written_random_checkpoint_is_the_random_model(tmp_path):
    """scripts/random_checkpoint.py writes, shard by shard, what --random-init builds (same seed and dtype)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import random_checkpoint

    config = preset_config("tiny-llama")
    written = random_checkpoint.write_checkpoint(config, tmp_path / "ckpt", torch.bfloat16, seed=5, shard_bytes=40_000)
    assert written == 2 * sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 2
    loaded = tensors_of(plan_checkpoint(tmp_path / "ckpt", torch.bfloat16).build(CPU))
    drawn = tensors_of(plan_random(config, torch.bfloat16, seed=5).build(CPU))
    assert all(torch.equal(loaded[n], drawn[n]) for n in drawn)


def test_the_running_example_is_built_as_before():
    """--model tiny goes through the same builder now; QLoRA quantizes it layer by layer. The result must be
    exactly what quantizing the whole pretrained model gave (fp32, the CPU's compute dtype)."""
    config = make_config(model="tiny")
    plan, _ = plan_model(config, torch.float32)
    ours = tensors_of(build_model(plan, config, CPU, torch.float32))
    before = tensors_of(quantize_model(pretrained_tiny_llama().to(torch.float32), compute_dtype=torch.float32))
    assert ours.keys() == before.keys()
    assert all(ours[n].dtype == before[n].dtype and torch.equal(ours[n], before[n]) for n in before)


# ----------------------------------------------------------------------------------------------------
# The 16-bit model never exists whole
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["random", "checkpoint"])
def test_at_most_one_decoder_layer_is_unquantized_at_any_time(tmp_path, source):
    config = small_config(layers=4)
    if source == "checkpoint":
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
        plan = plan_checkpoint(tmp_path / "ckpt", torch.bfloat16)
    else:
        plan = plan_random(config, torch.bfloat16, seed=0)
    model, layers = plan.skeleton, plan.skeleton.model.layers
    asked = []
    weights = plan.weights
    plan.weights = lambda names, dtype, device: asked.append(names) or weights(names, dtype, device)
    seen = []

    def quantize(layer):
        index = next(i for i, other in enumerate(layers) if other is layer)
        real = [i for i, other in enumerate(layers) if not other.input_layernorm.weight.is_meta]
        unquantized = [i for i in real if not isinstance(layers[i].mlp.up_proj, Linear4bit)]
        seen.append((index, real, unquantized, model.model.embed_tokens.weight.is_meta))
        return quantize_model(layer, compute_dtype=torch.bfloat16, skip=())

    built = plan.build(CPU, quantize)
    # When layer i is quantized: layers 0..i are real, and only layer i is still 16-bit; the embeddings (the
    # largest tensor) were built first.
    assert seen == [(i, list(range(i + 1)), [i], False) for i in range(4)]
    # Each read asks for the tensors outside the layers, then for one layer's nine tensors at a time.
    assert [len(names) for names in asked] == [3] + [9] * 4
    assert all(all(f"layers.{i}." in n for n in names) for i, names in enumerate(asked[1:]))
    assert sum(isinstance(m, Linear4bit) for m in built.modules()) == 7 * 4
    with pytest.raises(RuntimeError, match="built already"):
        plan.build(CPU, quantize)


# ----------------------------------------------------------------------------------------------------
# Bad checkpoint folders: refused before anything is built, naming the file and the tensor
# ----------------------------------------------------------------------------------------------------


class _Touch:
    """A pickle that, when unpickled, creates a file: proof that a file was (or was not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    small_config().save_pretrained(folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the plant works: unpickling creates the file
    assert marker.exists()
    marker.unlink()
    refused = r"pytorch_model\.bin.*never opens.*save_pretrained\(.*safe_serialization=True"
    with pytest.raises(ValueError, match=refused):
        train(model=str(folder), method="qlora", output_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    assert not marker.exists() and not (tmp_path / "run").exists()
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights: neither model.safetensors nor"):
        plan_checkpoint(folder, torch.float32)


def _rewrite_header(path: Path, change) -> None:
    """Apply `change(header)` to a safetensors file's JSON header, keeping its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


UP = "model.layers.1.mlp.up_proj.weight"


def _missing_shard(folder):
    shard = _shard_of(folder, UP)
    shard.unlink()
    return shard.name, r"a shard is missing"


def _truncated(folder):
    shard = _shard_of(folder, UP)
    shard.write_bytes(shard.read_bytes()[:-10])
    last = max(read_header_entries(shard), key=lambda item: item[1])[0]
    return shard.name, rf"tensor '{last}': the file is truncated"


def read_header_entries(shard):
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8:8 + header_len])
    return [(name, info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]


def _lying_header(folder):
    shard = _shard_of(folder, UP)
    _rewrite_header(shard, lambda h: h[UP].update(shape=[128, 32]))  # half the bytes its offsets span
    return shard.name, rf"tensor '{UP}': the header lies: F32 \[128, 32\] takes 16,384 bytes"


def _wrong_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    name = "model.layers.0.mlp.gate_proj.weight"
    return _shard_of(folder, name).name, rf"tensor '{name}' has shape \[128, 64\], the model .* needs \[96, 64\]"


def _wrong_dtype(folder):
    shard = _shard_of(folder, UP)
    _rewrite_header(shard, lambda h: h[UP].update(dtype="I32"))
    return shard.name, rf"tensor '{UP}' is stored as I32; model weights must be one of"


def _missing_tensor(folder):
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    del content["weight_map"][UP]
    index.write_text(json.dumps(content))
    return "model.safetensors.index.json", rf"tensor '{UP}' is missing"


def _index_lies(folder):
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    shard = _shard_of(folder, UP).name
    content["weight_map"]["model.layers.1.mlp.up_proj.bias"] = shard
    index.write_text(json.dumps(content))
    return shard, r"tensor 'model.layers.1.mlp.up_proj.bias' in .*header has no such tensor"


def _extra_tensor(folder):
    save_file({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, folder / "extra.safetensors")
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "extra.safetensors"
    index.write_text(json.dumps(content))
    return "extra.safetensors", r"tensor 'model.layers.9.mlp.up_proj.weight' is not a weight of the model"


@pytest.mark.parametrize("damage", [_missing_shard, _truncated, _lying_header, _wrong_shape, _wrong_dtype,
                                    _missing_tensor, _index_lies, _extra_tensor])
def test_a_bad_checkpoint_folder_names_the_file_and_the_tensor(tmp_path, damage, monkeypatch):
    folder = save_checkpoint(tmp_path / "ckpt", torch.float32)
    file, message = damage(folder)
    monkeypatch.setattr(ModelPlan, "build", lambda *a: pytest.fail("built a model from a bad folder"))
    with pytest.raises(ValueError, match=message) as error:
        train(model=str(folder), method="qlora", output_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    assert file in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_header_is_read_without_reading_the_weights(tmp_path):
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.zeros(1000, 1000)}, path)
    entries = read_header(path)
    assert entries["w"].shape == (1000, 1000) and entries["w"].dtype == "F32"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="one.safetensors: not a safetensors file, or truncated: 2 bytes"):
        read_header(path)


# ----------------------------------------------------------------------------------------------------
# Every check before the model is built
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(data="bad"), r"bad.jsonl:2: not valid JSON"),
    (dict(target="q_proj,v_prj"), r"--model llama-7b: entries \['v_prj'\] of target_modules"),
    (dict(r=100_000), r"--model llama-7b: --r=100000 is larger than max\(in_features, out_features\) = "
                      r"max\(4096, 4096\) of model.layers.0.self_attn.q_proj: .*add nothing\)$"),
    (dict(eval_data="missing"), r"--eval-data: no such file"),
])
def test_a_7b_run_checks_everything_before_building_the_model(tmp_path, monkeypatch, options, message):
    """The 7B CLI built the whole model (minutes, 22 GiB) before it read the data."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "Say hi.", "response": "hi"}\n')
    bad.write_text('{"prompt": "Say hi.", "response": "hi"}\n{"prompt": oops}\n')
    paths = {"bad": str(bad), "missing": str(tmp_path / "missing.jsonl")}
    options = {key: paths.get(value, value) for key, value in options.items()}
    monkeypatch.setattr(ModelPlan, "build", lambda *a: pytest.fail("built the model before checking"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(**{"recipe": "qlora-7b", "model": "llama-7b", "random_init": True, "data": str(good),
                 "output_dir": str(tmp_path / "run"), "progress": False, **options})
    assert not (tmp_path / "run").exists()


def test_a_target_error_on_the_command_line_names_the_model_and_a_rank_the_recipe_chose():
    err = ValueError("--r=64 is larger than ...")
    chosen = build.on_the_command_line(err, make_config(recipe="qlora-7b", model="tiny"))
    assert str(chosen) == ("--model tiny: --r=64 is larger than ... (--recipe qlora-7b chose r=64; give --r, or "
                           "a larger --model)")
    given = build.on_the_command_line(err, make_config(recipe="qlora-7b", model="tiny", r=8))
    assert str(given) == "--model tiny: --r=64 is larger than ..."  # the user's own --r: no recipe to blame


def test_a_preset_reads_jsonl_as_bytes():
    """A preset has random weights and no tokenizer; its JSONL text becomes Llama's byte tokens."""
    plan, tokenizer = plan_model(make_config(model="llama-7b", random_init=True), torch.bfloat16)
    assert isinstance(tokenizer, ByteTokenizer) and plan.skeleton.model.embed_tokens.weight.is_meta
    assert tokenizer.prompt_ids("hé") == [1, 3 + ord("h"), 3 + 0xC3, 3 + 0xA9]  # <s>, then UTF-8 bytes
    assert tokenizer.response_ids("!") == [3 + ord("!"), 2]  # ... and </s>
    _, none = plan_model(make_config(model="tiny-llama", random_init=True), torch.float32)
    assert none is None  # a vocabulary of 20 cannot hold 259 byte tokens
    with pytest.raises(ValueError, match="reads UTF-8 bytes if its vocabulary has 259 tokens or more"):
        build.load_data(make_config(model="tiny-llama", random_init=True, data="x.jsonl"), none)


def test_a_model_without_llama_style_layers_is_refused_before_anything_is_built():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: no decoder layers at 'transformer.layers'"):
        plan_random(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50), torch.float32, seed=0)


# ----------------------------------------------------------------------------------------------------
# What the process holds (minilora.measure.HostMemory)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not status_bytes(), reason="needs Linux's /proc/self/status")
def test_host_memory_sees_a_64_mib_tensor():
    before = status_bytes()
    with HostMemory(interval=0.005) as host:
        x = torch.ones(16 * 2**20)  # 64 MiB of fresh pages (torch allocates blocks this large with mmap)
        time.sleep(0.1)  # held for 20 sampling intervals
        del x
    # The process may give back a few pages between `before` and the tensor (Python frees its small-object
    # arenas, the allocator trims): 1 MiB of the 64 is left for that.
    mib = 2**20
    assert host.resident >= before["VmRSS"] + 63 * mib  # the kernel's exact high-water mark (or samples)
    assert host.anonymous >= before["RssAnon"] + 63 * mib
    assert host.resident < before["VmRSS"] + 64 * mib + 50 * mib  # and not much else: nothing else ran
