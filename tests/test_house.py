"""The house rule: every module imports only from the floors below it — no upward import, no cycle,
not even a lazy import inside a function. Read from the source with `ast`, so nothing is executed.

The lowest floors are the core (minilora/core/): one file per chapter, each importing only torch, the standard
library and the core files of earlier chapters, and short enough to read in one sitting."""

import ast
from pathlib import Path

import pytest

import minilora

PACKAGE = Path(minilora.__file__).resolve().parent

FLOORS = {
    # The core, below everything: chapter N's file may use the core files of chapters before it, nothing else.
    "core.lora": -7,  # chapter 1: LoRALinear, add_lora
    "core.adalora": -6,  # chapter 2: SVDLinear, the allocator (on core.lora)
    "core.nf4": -5,  # chapter 3: the levels, packing, blockwise quantize/dequantize
    "core.double_quant": -4,  # chapter 4: the dynamic map, double_quantize/double_dequantize
    "core.paged": -3,  # chapter 5: adamw_update_page, LRUPool, PagedAdamW
    "core.qlora": -2,  # chapter 6: MatMul4bit, Linear4bit, quantize_model, train_step (on lora, nf4, double_quant)
    "core.memory": -1,  # chapter 7: parameter counts and the memory estimate
    "files": 0,  # the ground floor: atomic file writes, which every floor may use
    "machine": 0,  # where a number was measured; the filter for known harmless log lines
    "checks": 0,  # the shared checks of public arguments
    "codes": 0,  # the three 4-bit data types by name (their levels are built in core.nf4), checked once
    "kernels": 0,  # the fast encode/decode kernels: tables are handed in, nothing of ours imported
    "native": 0,  # the optional compiled AVX2 decode (C++ compiled on first use), beside the eager one
    "frozen_linear": 0,  # a frozen base's matmul, with the input gradient in the layout that is fast here
    "targets": 0,  # peft's rules for which modules get an adapter, by name only
    "page_pool": 0,  # the paged optimizer's counters (its LRU pool is the core's)
    "adapter_files": 0,  # peft's adapter folder: names, plain settings, strict reading
    "peft_layer": 0,  # peft's options for where an adapter lives, and its layer-level names (enable_adapters, ...)
    "checkpoint_files": 0,  # a checkpoint folder's safetensors: headers checked, one tensor at a time; no pickle
    "bypass": 1,  # what LoRA and AdaLoRA layers share; which layers get one; merging
    "nf4": 1,
    "architecture": 1,  # model shapes, presets and parameter counts (the memory model's first step)
    "measure": 1,  # bytes a real model saves for backward and holds while training
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


def module_name(dotted: str) -> str:
    """"minilora.lora.LoRALinear" -> "lora", "minilora.core.lora" -> "core.lora" (the name FLOORS uses)."""
    parts = dotted.split(".")[1:]
    return ".".join(parts[:2]) if parts[0] == "core" else parts[0]


def minilora_imports(path: Path) -> set[str]:
    """Names of the minilora modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minilora":
            if node.module in ("minilora", "minilora.core"):  # `from minilora import lora`, `from minilora.core ...`
                found.update(module_name(f"{node.module}.{alias.name}") for alias in node.names)
            else:
                found.add(module_name(node.module))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minilora" and "." in alias.name:
                    found.add(module_name(alias.name))
    return found


MODULES = sorted([p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
                 + [f"core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"])
CORE = [module for module in MODULES if module.startswith("core.")]
CORE_MAY_IMPORT = {"__future__", "collections", "dataclasses", "math", "torch", "typing"}  # and earlier core files


def test_every_module_has_a_floor():
    assert set(MODULES) <= set(FLOORS), f"give these modules a floor: {set(MODULES) - set(FLOORS)}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_go_down(module):
    floor = FLOORS[module]
    upward = {name: FLOORS.get(name) for name in minilora_imports(PACKAGE / f"{module.replace('.', '/')}.py")
              if FLOORS.get(name, 99) >= floor and name != module}
    assert not upward, f"minilora/{module}.py (floor {floor}) imports from the same floor or above: {upward}"


def test_the_rule_catches_a_lazy_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from minilora.adalora import SVDLinear\n    return SVDLinear\n")
    assert minilora_imports(bad) == {"adalora"}


def test_the_rule_reads_core_imports():
    assert module_name("minilora.core.nf4") == "core.nf4" and module_name("minilora.nf4") == "nf4"
    assert minilora_imports(PACKAGE / "core" / "qlora.py") == {"core.lora", "core.nf4", "core.double_quant"}
    assert "core.lora" in minilora_imports(PACKAGE / "lora.py")  # `from minilora.core import lora as core`


@pytest.mark.parametrize("module", CORE)
def test_core_files_import_only_torch_and_earlier_core_files(module):
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    outside = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        outside |= {name for name in names if name.split(".")[0] not in CORE_MAY_IMPORT
                    and not name.startswith("minilora.core.")}
    assert not outside, f"minilora/{module.replace('.', '/')}.py imports {outside}: the core imports only torch"


def test_core_files_are_read_in_one_sitting():
    """One chapter's idea per file, about 150 lines each and about 1,100 in all (non-blank lines)."""
    lines = {module: sum(1 for line in (PACKAGE / f"{module.replace('.', '/')}.py").read_text().splitlines()
                         if line.strip()) for module in CORE}
    assert len(lines) == 7 and all(n <= 170 for n in lines.values()), lines
    assert sum(lines.values()) <= 1100, lines
