"""The chapters show their code from the core files, never a copy that can go stale.

A chapter asks for a listing with a marker, an HTML comment that GitHub and the MkDocs site both hide, on a line
of its own; the fenced block right after it is the listing:

    <!-- include: minilora/core/lora.py:LoRALinear.forward -->
    ```python
    # minilora/core/lora.py: LoRALinear.forward
    def forward(self, x): ...
    ```

The name is a top-level function or class, or Class.method; the listing is its source as it stands in the file
(decorators and docstring included, a method dedented), under one comment line that says where it comes from.
Both renderers show the block as it is written, so the rule here is that it must be the source: the tests
below fail as soon as a core file changes and a chapter still shows the old code. After changing a core file,

    .venv/bin/python tests/test_listings.py          # rewrites every listing in chapters/ from the source

Each chapter 1-7 also points its "Code:" line at its core file first, and shows at least one listing from it.
"""

import ast
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.md"))
INCLUDE = re.compile(r"^<!-- include: (?P<path>[\w/.]+\.py):(?P<name>[\w.]+) -->$")
CORE_OF = {"01": "lora", "02": "adalora", "03": "nf4", "04": "double_quant", "05": "paged", "06": "qlora",
           "07": "memory"}


def source_of(path: str, name: str) -> str:
    """The source of `name` (a function, a class, or Class.method) in the file at `path`, dedented."""
    text = (ROOT / path).read_text(encoding="utf-8")
    nodes = ast.parse(text).body
    for part in name.split("."):
        matches = [node for node in nodes if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part]
        if not matches:
            raise LookupError(f"{path} has no {name!r} (no {part!r} there)")
        node, nodes = matches[0], getattr(matches[0], "body", [])
    first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    lines = text.splitlines()[first - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines))


def listing(path: str, name: str) -> list[str]:
    """The fenced block that belongs under an include marker."""
    return ["```python", f"# {path}: {name}", *source_of(path, name).splitlines(), "```"]


def render(text: str) -> str:
    """`text` with the block under every include marker replaced by (or, if missing, given) its listing."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = INCLUDE.match(lines[i])
        i += 1
        if not match:
            continue
        if i < len(lines) and lines[i].startswith("```"):  # the old block: skip it up to its closing fence
            i += 1
            while i < len(lines) and lines[i] != "```":
                i += 1
            i += 1
        out.extend(listing(match["path"], match["name"]))
    return "\n".join(out)


def includes(text: str) -> list[tuple[str, str]]:
    return [(m["path"], m["name"]) for m in map(INCLUDE.match, text.split("\n")) if m]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_every_listing_is_the_source(chapter):
    text = chapter.read_text(encoding="utf-8")
    stale = [f"{path}:{name}" for path, name in includes(text)
             if "\n".join(listing(path, name)) not in text]
    assert text == render(text), (f"{chapter.name}: listings that differ from their source {stale}; run "
                                  f".venv/bin/python tests/test_listings.py to rewrite them")


@pytest.mark.parametrize("number, core", sorted(CORE_OF.items()))
def test_each_chapter_shows_its_core_file_and_points_there_first(number, core):
    chapter = next(path for path in CHAPTERS if path.name.startswith(number))
    text = chapter.read_text(encoding="utf-8")
    path = f"minilora/core/{core}.py"
    assert any(p == path for p, _ in includes(text)), f"{chapter.name} shows no listing from {path}"
    code_line = next(line for line in text.splitlines() if "Code:" in line)
    first = re.search(r"minilora/[\w/]+\.py", code_line)
    assert first and first.group() == path, f"{chapter.name}'s Code: line should name {path} first: {code_line}"


def test_render_replaces_a_stale_block_and_fills_a_missing_one():
    marker = "<!-- include: minilora/core/lora.py:LoRALinear.delta_weight -->"
    fresh = "\n".join([marker, *listing("minilora/core/lora.py", "LoRALinear.delta_weight")])
    assert render(f"a\n{marker}\n```python\nold code\n```\nb") == f"a\n{fresh}\nb"
    assert render(f"a\n{marker}\nb") == f"a\n{fresh}\nb"
    assert source_of("minilora/core/lora.py", "LoRALinear.delta_weight").startswith("def delta_weight(self)")
    with pytest.raises(LookupError):
        source_of("minilora/core/lora.py", "LoRALinear.no_such_method")


def main() -> int:
    for chapter in CHAPTERS:
        text = chapter.read_text(encoding="utf-8")
        if render(text) != text:
            chapter.write_text(render(text), encoding="utf-8")
            print(f"rewrote the listings of {chapter.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
