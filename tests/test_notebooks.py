"""The notebook rule (notebooks/README.md), checked on the committed notebooks without running them.

nbval runs with --nbval-lax: only cells marked `# NBVAL_CHECK_OUTPUT` are byte-compared, so these checks make
sure the other cells still have teeth (asserts) and print nothing that would differ from CPU to CPU unrounded.
"""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"

sys.path.insert(0, str(ROOT / "scripts"))
import notebook_setup_cell  # noqa: E402


def code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def text_of(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o["output_type"] == "stream")


def significant_digits(number: str) -> int:
    mantissa = number.lower().split("e")[0].replace(".", "").lstrip("-0")
    return len(mantissa)


def test_there_is_one_notebook_per_chapter():
    chapters = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]-*.md"))
    assert [p.stem for p in NOTEBOOKS] == chapters


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_with_clean_outputs(path):
    for i, cell in enumerate(code_cells(path)):
        assert cell["execution_count"] is not None, f"{path.name} code cell {i} was not executed"
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"{path.name} code cell {i} ended in an error"
            assert output.get("name") != "stderr", f"{path.name} code cell {i} wrote to stderr: {text_of(cell)!r}"
        text = text_of(cell)
        assert "\r" not in text and "it/s" not in text, f"{path.name} code cell {i} shows a progress bar"
        assert not re.search(r" at 0x[0-9a-f]{6,}", text), f"{path.name} code cell {i} prints a memory address"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_claims_are_asserted_and_float_prints_rounded(path):
    cells = code_cells(path)
    asserts = sum(len(re.findall(r"^\s*assert\b", "".join(c["source"]), re.M)) for c in cells)
    assert asserts >= 3, f"{path.name} asserts {asserts} claims; every notebook asserts what it shows"
    assert any("".join(c["source"]).startswith(CHECK) for c in cells), f"{path.name} compares no output at all"
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        assert "NBVAL_IGNORE_OUTPUT" not in source, f"{path.name} cell {i}: use the rule, not NBVAL_IGNORE_OUTPUT"
        if source.startswith(CHECK):
            continue
        # An unmarked cell's floats come from hardware-dependent arithmetic: at most 4 significant digits.
        for number in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text_of(cell)):
            assert significant_digits(number) <= 4, f"{path.name} cell {i} prints {number}: round it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_minilora_from_the_one_repository_url(path):
    notebook = json.loads(path.read_text())
    assert notebook_setup_cell.is_current(notebook, notebook_setup_cell.repository_url()), (
        f"{path.name}: run scripts/notebook_setup_cell.py")


def test_the_rounding_rule_catches_an_unrounded_loss():
    assert significant_digits("0.005894") == 4 and significant_digits("0.0058941") == 5
    assert significant_digits("1.069e-03") == 4 and significant_digits("-12.50") == 4
