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
    "kernels": 0,  # the fast encode/decode kernels: tables are handed in, nothing of ours imported
    "lora": 1, "nf4": 1, "paged": 1, "memory": 1, "data": 1,
    "checkpoints": 1,
    "adalora": 2, "double_quant": 2, "plots": 2,
    "instructions": 2,
    "qlora": 3, "adapters": 3,
    "distributed": 3,
    "train": 4, "__main__": 5,
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
