"""Consistency checks across the book's chapters (chapters/*.md).

Chapters are read as plain text; each check is parametrized over every chapter file, so a chapter that lands
later is checked too:

* every code reference `minilora.<module>` or `minilora.<module>.<name>[.<attribute>...]` names something that
  exists (the module imports, each further name is an attribute of what comes before it);
* every path into the repository's code, exercises, notebooks, tests, benchmarks or scripts (`minilora/lora.py`,
  `exercises/test_01_lora.py`, `notebooks/01-lora.ipynb`, ...) is a file that exists;
* every number marked `<!-- check: EXPR -->` (CONVENTIONS.md) equals EXPR, evaluated with minilora's
  modules, to the digits the chapter shows: the numbers a chapter quotes from the memory model or the code
  are computed, not typed;
* every image `![...](figures/NAME.png)` exists (`make figures` writes them), and each chapter shows at least
  one figure of its own number inline;
* the chapter opens with **Learning objectives.** and **Prerequisites.**, ends with the sections "Summary" and
  "Exercises", the latter closed by "### Further reading" (with arXiv ids), and points its reader at its
  exercise tests (`exercises/test_NN_*.py`).
"""

import importlib
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.md"))

# `minilora.lora.LoRALinear.merge`: the package, then one or more dotted identifiers.
CODE_REFERENCE = re.compile(r"(?<![\w/.])minilora((?:\.[A-Za-z_]\w*)+)")
# `exercises/learner/lora.py`: a path that starts in one of these folders and ends in a file suffix.
# Patterns such as `exercises/test_NN_*.py` stop at the `*` and never reach a suffix, so they are not matched.
FILE_REFERENCE = re.compile(
    r"(?<![\w/.])((?:minilora|exercises|notebooks|tests|benchmarks|scripts)/[\w./-]*\w\.(?:py|ipynb|md|sh))\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
# `15.69 GB<!-- check: memory.estimate("llama-7b", "lora").gb() -->`: the expression, and (below) the last number
# written before it on its line - digits with optional thousands commas, decimals and a (Unicode) minus sign.
CHECK = re.compile(r"<!--\s*check:\s*(.*?)\s*-->")
NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
IMAGE = re.compile(r"!\[[^\]]*\]\((figures/[^)\s]+)\)")
CHECK_MODULES = ("architecture", "activations", "memory", "measure", "lora", "nf4", "double_quant", "adalora",
                 "paged", "qlora", "data")


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


def check_namespace() -> dict:
    """What a check expression may use: torch, math, minilora and its modules by their short names."""
    import minilora
    names = {"torch": torch, "math": math, "minilora": minilora}
    names.update({name: importlib.import_module(f"minilora.{name}") for name in CHECK_MODULES})
    return names


def shown_number(text: str) -> tuple[float, int] | None:
    """(value, decimals) of the last number in `text` (what a reader sees just before a check marker)."""
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    written = numbers[-1].replace(",", "").replace("−", "-")
    decimals = len(written.split(".")[1]) if "." in written else 0
    return float(written), decimals


def wrong_numbers(text: str, namespace: dict) -> list[str]:
    """One line per check marker whose expression fails, or whose value differs from the number shown before
    it by more than half a unit of its last digit (6.08 stands for [6.075, 6.085])."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        start = 0  # the text a marker reads starts after the previous marker on the line
        for match in CHECK.finditer(line):
            shown, expression, start = shown_number(line[start:match.start()]), match.group(1), match.end()
            if shown is None:
                problems.append(f"line {number}: no number before <!-- check: {expression} -->")
                continue
            try:
                value = float(eval(expression, dict(namespace)))  # noqa: S307 - the book's own expressions
            except Exception as error:  # noqa: BLE001 - report any failure with its line
                problems.append(f"line {number}: {expression} raised {type(error).__name__}: {error}")
                continue
            written, decimals = shown
            if abs(value - written) > 0.5 * 10.0 ** -decimals * (1 + 1e-12):
                problems.append(f"line {number}: the text says {written:.{decimals}f}, {expression} = {value!r}")
    return problems


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
def test_checked_numbers_are_computed(chapter):
    problems = wrong_numbers(read(chapter), check_namespace())
    assert not problems, f"{chapter.name}: numbers that do not match their check:\n" + "\n".join(problems)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_figures_exist_and_the_key_figure_is_inline(chapter):
    images = IMAGE.findall(read(chapter))
    missing = [image for image in images if not (ROOT / "chapters" / image).is_file()]
    assert not missing, f"{chapter.name} shows figures that do not exist (run `make figures`): {missing}"
    own = chapter.name[:3]  # "06-"
    assert any(image.startswith(f"figures/{own}") for image in images), (
        f"{chapter.name}: no figure chapters/figures/{own}*.png shown inline")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_opens_with_objectives_and_prerequisites(chapter):
    text = read(chapter)
    opening = text.split("\n## ", 1)[0]  # everything before the first section
    for name in ("**Learning objectives.**", "**Prerequisites.**"):
        assert name in opening, f"{chapter.name}: the chapter must open with {name} (before its first '## ')"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_ends_with_summary_exercises_and_further_reading(chapter):
    text = read(chapter)
    headings = level2_headings(text)
    assert headings[-2:] == ["Summary", "Exercises"], (
        f"{chapter.name}: the last two '## ' sections must be 'Summary' and 'Exercises', found {headings[-2:]}")
    exercises = text[text.rindex("\n## Exercises"):]
    assert "\n### Further reading" in exercises, f"{chapter.name}: no '### Further reading' after '## Exercises'"
    reading = exercises[exercises.index("\n### Further reading"):]
    assert re.search(r"\b\d{4}\.\d{4,5}\b", reading), f"{chapter.name}: Further reading cites no arXiv id"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=chapter_id)
def test_points_at_its_exercise_tests(chapter):
    """Chapters 1-8 have exercise tests and name them; a later chapter without tests (chapter 9's exercises
    are experiments) names its notebook instead."""
    number = re.match(r"(\d+)-", chapter.name)
    assert number, f"{chapter.name}: chapter files are named NN-topic.md"
    tests = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "exercises").glob(f"test_{number.group(1)}_*.py"))
    text = read(chapter)
    if not tests and int(number.group(1)) > 8:
        notebook = f"notebooks/{chapter.stem}.ipynb"
        assert notebook in text, f"{chapter.name} has no exercise tests, so it must point at {notebook}"
        return
    assert tests, f"{chapter.name}: no exercises/test_{number.group(1)}_*.py exists for this chapter"
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


def test_the_number_check_catches_a_wrong_number():
    """A marker whose number is right passes; a typed number that is off, a marker without a number and an
    expression that fails are each reported."""
    namespace = check_namespace()
    right = ('LLaMA-7B has 6,738,415,616<!-- check: memory.estimate("llama-7b").num_parameters --> parameters; '
             'LoRA needs **15.69** GB<!-- check: memory.estimate("llama-7b", "lora").gb() -->, and −1<!-- check: '
             'nf4.nf4_code()[0] -->.')
    assert wrong_numbers(right, namespace) == []
    wrong = right.replace("15.69", "15.68")
    assert wrong_numbers(wrong, namespace) == [
        f'line 1: the text says 15.68, memory.estimate("llama-7b", "lora").gb() = '
        f'{namespace["memory"].estimate("llama-7b", "lora").gb()!r}']
    assert wrong_numbers("7B: 16.7 GB<!-- check: 16.65 -->", namespace) == []  # rounded as shown
    assert len(wrong_numbers("7B: 16.6 GB<!-- check: 16.66 -->", namespace)) == 1
    assert wrong_numbers("x<!-- check: 1 -->", namespace) == ["line 1: no number before <!-- check: 1 -->"]
    assert "raised AttributeError" in wrong_numbers("2<!-- check: memory.no_such -->", namespace)[0]
