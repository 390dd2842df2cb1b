"""Consistency checks across the book's chapters (chapters/*.md).

Chapters are read as plain text; each check is parametrized over every chapter file, so a chapter that lands
later is checked too:

* every code reference `minilora.<module>` or `minilora.<module>.<name>[.<attribute>...]` names something that
  exists (the module imports, each further name is an attribute of what comes before it);
* every path into the repository's code, exercises, notebooks, tests, benchmarks or scripts (`minilora/lora.py`,
  `exercises/test_01_lora.py`, `notebooks/01-lora.ipynb`, ...) is a file that exists;
* the chapter ends with a "Summary" section followed by an "Exercises" section, and points its reader at its
  exercise tests (`exercises/test_NN_*.py`).
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.md"))

# `minilora.lora.LoRALinear.merge`: the package, then one or more dotted identifiers.
CODE_REFERENCE = re.compile(r"(?<![\w/.])minilora((?:\.[A-Za-z_]\w*)+)")
# `exercises/learner/lora.py`: a path that starts in one of these folders and ends in a file suffix.
# Patterns such as `exercises/test_NN_*.py` stop at the `*` and never reach a suffix, so they are not matched.
FILE_REFERENCE = re.compile(
    r"(?<![\w/.])((?:minilora|exercises|notebooks|tests|benchmarks|scripts)/[\w./-]*\w\.(?:py|ipynb|md|sh))\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def chapter_id(path: Path) -> str:
    return path.name


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def level2_headings(text: str) -> list[str]:
    """The `## ` headings outside fenced code blocks, in order."""
    headings, in_fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = HEADING.match(line)
        if match and not in_fence and len(match.group(1)) == 2:
            headings.append(match.group(2))
    return headings


def resolve(dotted: str):
    """Import `minilora.<module>` and walk the remaining names with getattr; raise if any step is missing."""
    first, *rest = dotted.split(".")
    try:
        obj = importlib.import_module(f"minilora.{first}")
    except ModuleNotFoundError as error:
        if error.name != f"minilora.{first}":
            raise  # the module exists but one of its own imports failed: show that error
        obj = getattr(importlib.import_module("minilora"), first)  # a name re-exported by the package
    for name in rest:
        obj = getattr(obj, name)
    return obj


def test_there_are_chapters():
    assert len(CHAPTERS) >= 1, f"no chapters found under {ROOT / 'chapters'}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_code_references_exist(chapter):
    missing = []
    for number, line in enumerate(read(chapter).splitlines(), start=1):
        for match in CODE_REFERENCE.finditer(line):
            dotted = match.group(1).lstrip(".")
            try:
                resolve(dotted)
            except (AttributeError, ImportError) as error:
                missing.append(f"line {number}: minilora.{dotted} ({type(error).__name__}: {error})")
    assert not missing, f"{chapter.name} names code that does not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_file_references_exist(chapter):
    missing = []
    for number, line in enumerate(read(chapter).splitlines(), start=1):
        for match in FILE_REFERENCE.finditer(line):
            if not (ROOT / match.group(1)).is_file():
                missing.append(f"line {number}: {match.group(1)}")
    assert not missing, f"{chapter.name} points at files that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_ends_with_summary_then_exercises(chapter):
    headings = level2_headings(read(chapter))
    assert headings[-2:] == ["Summary", "Exercises"], (
        f"{chapter.name}: the last two '## ' sections must be 'Summary' and 'Exercises', found {headings[-2:]}")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_points_at_its_exercise_tests(chapter):
    number = re.match(r"(\d+)-", chapter.name)
    assert number, f"{chapter.name}: chapter files are named NN-topic.md"
    tests = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "exercises").glob(f"test_{number.group(1)}_*.py"))
    assert tests, f"{chapter.name}: no exercises/test_{number.group(1)}_*.py exists for this chapter"
    text = read(chapter)
    assert any(path in text for path in tests), f"{chapter.name} does not mention its exercise tests {tests}"


def test_reference_pattern_sees_what_the_chapters_write():
    """The checks above must not pass by matching nothing: the patterns find the forms the chapters use."""
    text = "See `minilora.lora.LoRALinear.merge()`, run `python -m minilora.train`, open `exercises/test_01_lora.py`."
    assert [m.group(1) for m in CODE_REFERENCE.finditer(text)] == [".lora.LoRALinear.merge", ".train"]
    assert [m.group(1) for m in FILE_REFERENCE.finditer(text)] == ["exercises/test_01_lora.py"]
    assert not list(FILE_REFERENCE.finditer("the tests in `exercises/test_NN_*.py`"))
    with pytest.raises(AttributeError):
        resolve("lora.no_such_function")
    assert level2_headings("## A\n```\n## not a heading\n```\n## Summary\n## Exercises\n") == [
        "A", "Summary", "Exercises"]
