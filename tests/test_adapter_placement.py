"""Where an adapter lives, peft's two options (minilora/peft_layer.py), side by side with peft 0.21:

* autocast_adapter_dtype: adapters in float32 on a 16-bit base (the default), or in the base's own dtype
  (False): the dtype chosen, outputs, gradients, an optimizer step, files both ways, the memory model and
  the command-line option;
* low_cpu_mem_usage: adapter tensors on the meta device, then the file's tensors themselves: one copy.

Tolerance: LoRA's bypass runs the same float operations as peft's in every dtype (x Aᵀ, then Bᵀ, times s, added
to the base output), so outputs and gradients are compared bit for bit, in bf16 and fp16 too. DoRA's norm and
rescale factor are computed in float32 here and in the adapter's dtype by peft: see the DoRA test.
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from minilora import adapters, memory
from minilora.adalora import AdaLoraConfig, add_adalora, svd_layers
from minilora.adapters import load_adapter, save_adapter
from minilora.family import add_dora
from minilora.lora import LoraConfig, add_lora, lora_layers
from minilora.measure import measure_training_bytes
from minilora.options import HELP, make_config
from minilora.paged import PagedAdamW
from minilora.peft_layer import adapter_dtype
from minilora.qlora import quantize_model
from minilora.switching import set_adapter

TARGETS = ("q_proj", "v_proj")
CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
HALF = [torch.bfloat16, torch.float16]


def peft_lora(base, autocast: bool, dora: bool = False, targets=TARGETS, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets if isinstance(targets, str) else list(targets),
                             use_dora=dora, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config, autocast_adapter_dtype=autocast, **kwargs)


def paired(tiny_llama, dtype, autocast: bool, dora: bool = False, targets=TARGETS):
    """(ours, peft's) on a `dtype` tiny Llama with the same adapter weights, B moved off zero."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    ours = (add_dora if dora else add_lora)(tiny_llama(dtype=dtype), config, autocast_adapter_dtype=autocast)
    pm = peft_lora(tiny_llama(dtype=dtype), autocast, dora, targets).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = pm.base_model.model.get_submodule(name)
            B = theirs.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=gen) * 0.1)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(B)
            if dora:
                layer.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    return ours, pm


def peft_params(pm, name):
    layer = pm.base_model.model.get_submodule(name)
    return {key: getattr(layer, key)["default"].weight for key in ("lora_A", "lora_B")}


# ----------------------------------------------------------------------------------------------------
# autocast_adapter_dtype: which dtype
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_adapter_dtype_is_peft_s(tiny_llama, dtype, autocast):
    """peft: the base's dtype, then 16-bit floats upcast to float32 unless autocast_adapter_dtype=False; float64
    stays float64 either way (minilora kept float32 there before)."""
    name = "model.layers.0.self_attn.q_proj"
    ours = add_lora(tiny_llama(dtype=dtype), CONFIG, autocast_adapter_dtype=autocast)
    theirs = peft_lora(tiny_llama(dtype=dtype), autocast)
    expected = peft_params(theirs, name)["lora_A"].dtype
    assert expected == (torch.float32 if autocast and dtype in HALF else dtype)
    layer = ours.get_submodule(name)
    assert layer.lora_A.dtype == layer.lora_B.dtype == expected
    dora = add_dora(tiny_llama(dtype=dtype), CONFIG, autocast_adapter_dtype=autocast).get_submodule(name)
    theirs = peft_lora(tiny_llama(dtype=dtype), autocast, dora=True).base_model.model.get_submodule(name)
    assert dora.lora_magnitude_vector.dtype == theirs.lora_magnitude_vector["default"].weight.dtype == expected
    svd = add_adalora(tiny_llama(dtype=dtype), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                           target_modules=TARGETS),
                      autocast_adapter_dtype=autocast).get_submodule(name)
    theirs = peft.get_peft_model(tiny_llama(dtype=dtype), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=list(TARGETS)), autocast_adapter_dtype=autocast)
    theirs = theirs.base_model.model.get_submodule(name)
    for kind in ("lora_A", "lora_E", "lora_B"):
        assert getattr(svd, kind).dtype == getattr(theirs, kind)["default"].dtype == expected
    assert svd.ranknum.dtype == theirs.ranknum["default"].dtype == expected     # 1/(ranknum + 1e-5) in it too


def test_a_4_bit_base_gives_its_compute_dtype():
    """peft reads a bitsandbytes 4-bit layer's compute_dtype; ours reads the same attribute of our Linear4bit."""
    model = quantize_model(nn.Sequential(nn.Linear(64, 64)), compute_dtype=torch.bfloat16, skip=())
    assert adapter_dtype(model[0], autocast_adapter_dtype=False) == torch.bfloat16
    assert adapter_dtype(model[0]) == torch.float32
    layer = add_lora(model, LoraConfig(target_modules=("0",)), autocast_adapter_dtype=False)[0]
    assert layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    assert layer(x).dtype == torch.float32                              # the input's dtype, as before


# ----------------------------------------------------------------------------------------------------
# autocast_adapter_dtype=False: the numbers against peft
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_16_bit_adapters_outputs_gradients_and_a_step_equal_peft(tiny_llama, token_ids, dtype):
    ours, pm = paired(tiny_llama, dtype, autocast=False, targets="all-linear")
    ours.train(), pm.train()
    mine, theirs = ours(token_ids).logits, pm(token_ids).logits
    assert mine.dtype == dtype and torch.equal(mine, theirs)
    mine.float().square().mean().backward()
    theirs.float().square().mean().backward()
    for name, layer in lora_layers(ours).items():
        for key, param in peft_params(pm, name).items():
            assert getattr(layer, key).grad.dtype == dtype                   # gradients in 16 bits too
            assert torch.equal(getattr(layer, key).grad, param.grad), (name, key)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, foreach=False)
                  for m in (ours, pm)]
    for optimizer in optimizers:
        optimizer.step()
    finite = []
    for name, layer in lora_layers(ours).items():
        for key, param in peft_params(pm, name).items():
            mine = getattr(layer, key)
            assert torch.equal(mine.view(torch.int16), param.view(torch.int16)), (name, key)   # NaN too
            state = optimizers[0].state[mine]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == dtype   # torch keeps the param's dtype
            finite.append(bool(torch.isfinite(mine).all()))
    # fp16: AdamW's eps = 1e-8 is below fp16's smallest number (6e-8), so √v + eps is 0 wherever v underflowed
    # and the step is m / 0: inf or NaN after one step, in peft as here. bf16 has float32's range.
    assert all(finite) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF)
def test_16_bit_dora_is_closer_to_exact_than_peft(tiny_llama, token_ids, dtype):
    """peft computes DoRA's row norms and m / ‖W0 + sBA‖ in the adapter's dtype, so the factor − 1 that
    rescales W0 x is rounded to steps of 2^-8 (bf16) or 2^-11 (fp16); ours computes them in float32 from the
    same 16-bit weights. Against an exact reference (the same weights, float64 adapters on a float64 copy of
    the base) our outputs and gradients are at least as close as peft's, and both within 16-bit rounding."""
    ours, pm = paired(tiny_llama, dtype, autocast=False, dora=True)
    exact = add_dora(tiny_llama(dtype=dtype).double(), CONFIG)
    with torch.no_grad():
        for name, layer in lora_layers(exact).items():
            for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
                getattr(layer, key).copy_(getattr(ours.get_submodule(name), key))
    runs = [model(token_ids).logits for model in (ours, pm, exact)]
    for logits in runs:
        logits.double().square().mean().backward()
    error = {who: (logits.double() - runs[2]).abs().max().item() for who, logits in zip(("ours", "peft"), runs)}
    assert error["ours"] <= error["peft"]
    scale = runs[2].abs().max().item()
    assert error["ours"] < 16 * torch.finfo(dtype).eps * scale                # a few roundings of the result
    grad_error = {"ours": 0.0, "peft": 0.0}
    for name, layer in lora_layers(exact).items():
        for key, theirs in peft_params(pm, name).items():
            reference = getattr(layer, key).grad
            grad_error["ours"] += (getattr(ours.get_submodule(name), key).grad.double() - reference).norm().item()
            grad_error["peft"] += (theirs.grad.double() - reference).norm().item()
    assert grad_error["ours"] <= grad_error["peft"], grad_error


def test_16_bit_adalora_equals_peft(tiny_llama, token_ids):
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS)
    ours = add_adalora(tiny_llama(dtype=torch.bfloat16), config, autocast_adapter_dtype=False)
    pm = peft.get_peft_model(tiny_llama(dtype=torch.bfloat16), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=list(TARGETS)), autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():
            theirs = pm.base_model.model.get_submodule(name)
            theirs.lora_E["default"].copy_(torch.randn(4, 1, generator=gen))
            for kind in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, kind).copy_(getattr(theirs, kind)["default"])
    ours.eval(), pm.eval()
    mine, theirs = ours(token_ids).logits, pm(token_ids).logits
    assert torch.equal(mine, theirs)
    mine.float().square().mean().backward(), theirs.float().square().mean().backward()
    for name, layer in svd_layers(ours).items():
        for kind in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(layer, kind).grad,
                               getattr(pm.base_model.model.get_submodule(name), kind)["default"].grad)


def test_16_bit_adapter_files_both_ways(tiny_llama, token_ids, tmp_path):
    """peft writes the tensors in their dtype and no option in adapter_config.json; whoever loads picks the
    adapter dtype with autocast_adapter_dtype (a bf16 file loads as float32 adapters by default)."""
    ours, pm = paired(tiny_llama, torch.bfloat16, autocast=False)
    save_adapter(ours, tmp_path / "ours", CONFIG)
    pm.save_pretrained(tmp_path / "peft")
    for folder in ("ours", "peft"):
        assert {t.dtype for t in load_file(tmp_path / folder / "adapter_model.safetensors").values()} == \
            {torch.bfloat16}
        assert "autocast" not in (tmp_path / folder / "adapter_config.json").read_text()
    expected = ours(token_ids).logits
    for autocast in (False, True):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), tmp_path / "ours",
                                                autocast_adapter_dtype=autocast)
        mine = load_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path / "peft", autocast_adapter_dtype=autocast)
        wanted = torch.bfloat16 if not autocast else torch.float32
        assert lora_layers(mine)["model.layers.0.self_attn.q_proj"].lora_A.dtype == wanted
        assert peft_params(theirs, "model.layers.0.self_attn.q_proj")["lora_A"].dtype == wanted
        assert torch.equal(theirs(token_ids).logits, mine(token_ids).logits)
        if not autocast:
            assert torch.equal(mine(token_ids).logits, expected)


def test_bad_options_are_refused_before_anything_changes(tiny_llama, tmp_path):
    model = tiny_llama()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="autocast_adapter_dtype must be True or False, got "
                                         "autocast_adapter_dtype='no'"):
        add_lora(model, CONFIG, autocast_adapter_dtype="no")
    with pytest.raises(ValueError, match="low_cpu_mem_usage must be True or False, got low_cpu_mem_usage=1"):
        add_adalora(model, AdaLoraConfig(total_step=10, target_modules=TARGETS), low_cpu_mem_usage=1)
    save_adapter(add_lora(tiny_llama(), CONFIG), tmp_path, CONFIG)
    with pytest.raises(ValueError, match="low_cpu_mem_usage must be True or False"):
        load_adapter(model, tmp_path, low_cpu_mem_usage=None)
    assert not lora_layers(model) and not svd_layers(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------
# The memory model and the command line count it
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast, optimizer", [(False, "adamw"), (False, "paged_adamw"), (True, "adamw")])
def test_memory_model_counts_the_adapter_dtype_byte_for_byte(tiny_llama, autocast, optimizer):
    """One step on a bf16 tiny Llama: adapter, gradient and optimizer bytes measured equal the estimate with
    adapter_bytes = memory.adapter_bytes(bf16, autocast). torch's AdamW keeps m and v in the parameter's dtype
    (2 + 2 bytes for bf16 adapters); minilora's PagedAdamW keeps them in float32 (8 bytes) whatever it is."""
    model = add_lora(tiny_llama(dtype=torch.bfloat16), LoraConfig(r=8, target_modules="all-linear"),
                     autocast_adapter_dtype=autocast)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_ = torch.optim.AdamW(trainable, lr=1e-3) if optimizer == "adamw" else PagedAdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer_.step()
    measured = measure_training_bytes(model, optimizer_)
    per_parameter = memory.adapter_bytes(torch.bfloat16, autocast)
    assert per_parameter == (4 if autocast else 2)
    report = memory.estimate(model.config, "lora", r=8, optimizer=optimizer, weight_bytes=2,
                             adapter_bytes=per_parameter)
    assert report.lora_params == measured["trainable"] and report.gradients == measured["gradients"]
    if optimizer == "adamw":   # minilora's PagedAdamW holds its state in pages, not in optimizer.state
        assert report.optimizer_state == measured["optimizer_state"]


def test_a_run_s_options_reach_the_memory_model():
    """The 7B QLoRA recipe at r 64 (159.9 M adapter parameters): 0.64 GB of float32 adapters, 0.32 GB with
    --no-autocast-adapter-dtype, and as much again for the gradients; paged AdamW's state is float32 either way."""
    default = memory.estimate_run(make_config(recipe="qlora-7b", model="llama-7b"))
    half = memory.estimate_run(make_config(recipe="qlora-7b", model="llama-7b", autocast_adapter_dtype=False))
    n = memory.lora_parameter_count("llama-7b", 64)
    assert (default.lora_params, half.lora_params) == (4 * n, 2 * n) == (639_631_360, 319_815_680)
    assert (default.gradients, half.gradients) == (4 * n, 2 * n)
    assert default.optimizer_state == half.optimizer_state == 8 * n
    assert half.total == memory.estimate("llama-7b", "qlora", r=64, lora_dropout=0.1).total   # the paper's setting
    assert memory.adapter_bytes(torch.float32, False) == memory.adapter_bytes(torch.float32) == 4


def test_command_line_option():
    assert make_config(autocast_adapter_dtype=False).autocast_adapter_dtype is False
    assert "--no-autocast-adapter-dtype" in HELP["autocast_adapter_dtype"]
    with pytest.raises(ValueError, match="--autocast-adapter-dtype must be True or False, got 'no'"):
        make_config(autocast_adapter_dtype="no")
    with pytest.raises(ValueError, match="--autocast-adapter-dtype False: only --method lora or qlora or adalora"):
        make_config(method="full", autocast_adapter_dtype=False)
    from minilora.train import parse_args
    assert parse_args(["--no-autocast-adapter-dtype"]).autocast_adapter_dtype is False


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_the_command_line_option_reaches_the_adapters(method):
    from minilora.build import apply_method
    from minilora.data import build_tiny_llama

    config = make_config(method=method, autocast_adapter_dtype=False)
    model = build_tiny_llama().to(torch.bfloat16)
    apply_method(model, config)
    layers = {**lora_layers(model), **svd_layers(model)}
    assert layers and {layer.lora_A.dtype for layer in layers.values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# low_cpu_mem_usage: built on the meta device, filled by the file's own tensors
# ----------------------------------------------------------------------------------------------------


def adapter_tensors(model):
    return {f"{name}.{key}": param for name, layer in {**lora_layers(model), **svd_layers(model)}.items()
            for key, param in layer.named_parameters(recurse=False) if key.startswith("lora_")}


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_low_cpu_mem_usage_builds_nothing_and_loads_the_file_s_tensors_themselves(tiny_llama, token_ids,
                                                                                 tmp_path, monkeypatch, kind):
    """Before the load the adapter tensors are meta (no memory); after it each parameter *is* a tensor read
    from the file (same storage): the adapter exists once. The model equals one loaded the ordinary way."""
    if kind == "adalora":
        config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS)
        source = add_adalora(tiny_llama(), config)
        with torch.no_grad():
            for layer in svd_layers(source).values():
                layer.lora_E.normal_()
            source.model.layers[0].self_attn.q_proj.rank_mask[1:3] = False   # a pruned layer: 2 triplets kept
        built = add_adalora(tiny_llama(), config, low_cpu_mem_usage=True)
    else:
        config = replace(CONFIG, use_dora=kind == "dora")
        source = (add_dora if kind == "dora" else add_lora)(tiny_llama(), config)
        with torch.no_grad():
            for layer in lora_layers(source).values():
                layer.lora_B.normal_()
        built = (add_dora if kind == "dora" else add_lora)(tiny_llama(), config, low_cpu_mem_usage=True)
        theirs = peft_lora(tiny_llama(), True, dora=kind == "dora", low_cpu_mem_usage=True)
        assert all(p.is_meta for n, p in theirs.named_parameters() if "lora_" in n)   # peft's does the same
    assert adapter_tensors(built) and all(p.is_meta for p in adapter_tensors(built).values())
    save_adapter(source, tmp_path, config)
    read = {}
    original = adapters.read_adapter_tensors

    def recording(folder):
        tensors = original(folder)
        read.update({key: tensor.data_ptr() for key, tensor in tensors.items()})
        return tensors

    monkeypatch.setattr(adapters, "read_adapter_tensors", recording)
    loaded = load_adapter(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    monkeypatch.undo()
    ordinary = load_adapter(tiny_llama(), tmp_path)
    pointers = {param.data_ptr() for param in adapter_tensors(loaded).values()}
    assert pointers == set(read.values())                       # every parameter is a tensor read from the file
    for key, param in adapter_tensors(loaded).items():
        assert not param.is_meta and param.device.type == "cpu", key
        assert param.requires_grad == adapter_tensors(ordinary)[key].requires_grad
        assert torch.equal(param, adapter_tensors(ordinary)[key]), key
    loaded.eval(), ordinary.eval()
    assert torch.equal(loaded(token_ids).logits, ordinary(token_ids).logits)


def test_low_cpu_mem_usage_beside_another_adapter_and_in_16_bits(tiny_llama, token_ids, tmp_path):
    """A second adapter loaded beside the first waits parked, filled; a float32 file loads into bf16
    adapters (cast one tensor at a time)."""
    source = add_lora(tiny_llama(dtype=torch.bfloat16), CONFIG)                   # float32 adapters
    with torch.no_grad():
        for layer in lora_layers(source).values():
            layer.lora_B.normal_()
    save_adapter(source, tmp_path, CONFIG)
    model = add_lora(tiny_llama(dtype=torch.bfloat16), LoraConfig(r=2, target_modules=("v_proj",)), "first")
    load_adapter(model, tmp_path, "second", autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    parked = model.model.layers[0].self_attn.v_proj.parked["second"]
    assert parked.lora_A.dtype == torch.bfloat16 and not parked.lora_A.is_meta and not parked.lora_A.requires_grad
    set_adapter(model, "second")
    expected = load_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert torch.equal(model(token_ids).logits, expected(token_ids).logits)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    from minilora.adapters import load_adapter

    def status(field):   # kB in /proc/self/status
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
    with open("/proc/self/clear_refs", "w") as f:   # "5": the peak (VmHWM) starts again from the current RSS
        f.write("5")
    before = status("VmRSS:")
    load_adapter(model, sys.argv[1], low_cpu_mem_usage=sys.argv[2] == "1")
    sum(float(p.sum()) for p in model.parameters())   # read every value, as training would (a mapped file's
    print(json.dumps({"peak_growth": status("VmHWM:") - before}))   # pages count once they are read)
""")


def test_peak_memory_while_loading_is_one_adapter_not_two(tmp_path):
    """A 64 MiB adapter (r 1024 on eight 1024 x 1024 layers, float32), loaded in a fresh process and then
    read: the peak resident memory grows by one adapter with low_cpu_mem_usage (the parameters are the file's
    tensors, which safetensors maps from the file, copied on write) and by two without (the new adapter's own
    tensors, then the file's, copied in). glibc is told to return freed blocks (mmap threshold 64 KiB), so the
    peak counts only what is held at once. Measured: 1.06 and 2.04."""
    config = LoraConfig(r=1024, lora_alpha=8, target_modules=tuple(str(i) for i in range(8)))
    model = add_lora(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]), config)
    save_adapter(model, tmp_path, config)
    adapter = sum(p.nbytes for p in adapter_tensors(model).values())
    assert adapter == 64 * 2**20
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    growth = {}
    for low in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), low], capture_output=True,
                             text=True, env=env, check=True)
        growth[low] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"] / adapter
    assert 0.9 < growth["1"] < 1.25 and growth["0"] > 1.75, growth
