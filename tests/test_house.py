"""The house rule: every module imports only from the floors below it — no upward import, no cycle,
not even a lazy import inside a function. Read from the source with `ast`, so nothing is executed."""

import ast
from pathlib import Path

import pytest

import minilora

PACKAGE = Path(minilora.__file__).resolve().parent

FLOORS = {
    "files": 0,  # the ground floor: atomic file writes, which every floor may use
    "machine": 0,  # where a number was measured; the filter for known harmless log lines
    "checks": 0,  # the shared checks of public arguments
    "codes": 0,  # the 16 levels of NF4, FP4 and Int4, and the midpoints between them
    "kernels": 0,  # the fast encode/decode kernels: tables are handed in, nothing of ours imported
    "native": 0,  # the optional compiled AVX2 decode (C++ compiled on first use), beside the eager one
    "frozen_linear": 0,  # a frozen base's matmul, with the input gradient in the layout that is fast here
    "targets": 0,  # peft's rules for which modules get an adapter, by name only
    "adapter_files": 0,  # peft's adapter folder: names, plain settings, strict reading
    "checkpoint_files": 0,  # a checkpoint folder's safetensors: headers checked, one tensor at a time; no pickle
    "bypass": 1,  # what LoRA and AdaLoRA layers share; which layers get one; merging
    "nf4": 1,
    "architecture": 1,  # model shapes, presets and parameter counts (the memory model's first step)
    "measure": 1,  # bytes a real model saves for backward and holds while training
    "page_pool": 1,  # the paged optimizer's pool bookkeeping (LRU) and counters
    "loop": 1,  # the one training step, sampler, evaluator and data class
    "lora_config": 1,  # LoraConfig: peft's options and their checks (on checks and targets)
    "lora": 2,
    "svd_adapter": 2,  # AdaLoRA's layer, config and penalty (the allocator is adalora's)
    "paged": 2, "double_quant": 2,
    "activations": 2,  # the activation model, tensor by tensor
    "data": 2,  # the running example (its finetune is a loop of loop.train_step)
    "options": 2,  # every option of a run
    "model_builder": 2,  # one way to build a model: skeleton on meta, then layer by layer (on architecture)
    "adalora": 3, "qlora": 3,
    "adalora_files": 3,  # AdaLoRA adapters in peft's files (adapters dispatches to it)
    "family": 3,  # LoRA's family: rsLoRA, DoRA, PiSSA, LoRA+ (on lora)
    "switching": 3,  # several adapters on one model: set, disable, delete, combine
    "instructions": 3,
    "distributed": 3,
    "memory": 3,  # the estimate: weights, adapters, gradients, optimizer state, scores, activations
    "adapters": 4,  # adapter files in peft's format, for every LoRA option, DoRA and AdaLoRA
    "checkpoints": 5,  # the run folder and checkpoints (they hold peft-format adapters)
    "build": 4,  # the pieces of a run, built from its options
    "plots": 4,  # the charts the chapters share (the memory chart draws memory's reports)
    "experiments": 4,  # the chapters' experiments: short real runs (chapters 6 and 9)
    "train": 6, "__main__": 7,
}


def minilora_imports(path: Path) -> set[str]:
    """Names of the minilora modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minilora":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # `from minilora import lora`
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "minilora" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_floor():
    assert set(MODULES) <= set(FLOORS), f"give these modules a floor: {set(MODULES) - set(FLOORS)}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_go_down(module):
    floor = FLOORS[module]
    upward = {name: FLOORS.get(name) for name in minilora_imports(PACKAGE / f"{module}.py")
              if FLOORS.get(name, 99) >= floor and name != module}
    assert not upward, f"minilora/{module}.py (floor {floor}) imports from the same floor or above: {upward}"


def test_the_rule_catches_a_lazy_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from minilora.adalora import SVDLinear\n    return SVDLinear\n")
    assert minilora_imports(bad) == {"adalora"}
