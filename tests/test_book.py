"""The book's website: how scripts/book.py lays the repository out as pages, and book/hooks.py's links.

These need neither MkDocs nor a browser (a fraction of a second); `make book-check` builds the site and reads
every page in headless Chromium.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tomllib")  # standard library from Python 3.11 on (the book extra brings tomli for 3.10)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import book  # noqa: E402  (scripts/book.py)

_spec = importlib.util.spec_from_file_location("book_hooks", ROOT / "book" / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

REPO = "https://github.com/someone/minilora"


def write(root, path, text):
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text, encoding="utf-8")


def notebook(*markdown_cells):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [text]} for text in markdown_cells]
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


@pytest.fixture
def repo(tmp_path):
    """A small repository: chapters 1, 2 and 9 (2 without a notebook), one module, exercises, a glossary."""
    write(tmp_path, "pyproject.toml", f'[project]\nname = "x"\n[project.urls]\nRepository = "{REPO}/"\n')
    write(tmp_path, "README.md", "# Home\n\n[one](chapters/01-lora.md) · [nb](notebooks/01-lora.ipynb) · "
                                 "[ex](exercises/README.md)\n")
    write(tmp_path, "chapters/01-lora.md",
          "# Chapter 1 — LoRA: a bypass\n\nSee [the module](../minilora/lora.py#L3), [the stubs](../exercises/"
          "learner/), [home](../README.md), [a figure](figures/01-lora-bypass.png), [gone](../nowhere.py) and "
          "[the paper](https://arxiv.org/abs/2106.09685).\n\n```python\n# not a heading [x](../minilora/lora.py)\n"
          "```\n")
    write(tmp_path, "chapters/02-adalora.md", "# Chapter 2 — AdaLoRA\n\n## 4. Glossary (English / 中文)\n\n"
                                              "| a | b |\n\n### Terms\n\nrank\n\n```\n# code\n```\n\n## Summary\n")
    write(tmp_path, "chapters/09-forgetting.md", "# Chapter 9 — Evaluation and forgetting\n")
    write(tmp_path, "chapters/figures/01-lora-bypass.png", "png")
    write(tmp_path, "notebooks/01-lora.ipynb", notebook("# 01\n\nRead [the test](../tests/test_lora.py), "
                                                        "[the text](../chapters/01-lora.md#3-the-bypass) and "
                                                        "[the exercises](../exercises/README.md)."))
    write(tmp_path, "notebooks/09-forgetting.ipynb", notebook("# 09"))
    write(tmp_path, "minilora/lora.py", '"""LoRA."""\nx = "```"\n')
    write(tmp_path, "tests/test_lora.py", "def test(): pass\n")
    write(tmp_path, "exercises/README.md", "# Exercises\n")
    write(tmp_path, "exercises/learner/lora.py", "stub\n")
    write(tmp_path, "exercises/test_01_lora.py", "def test_stub(): pass\n")
    return tmp_path


def test_repository_url_is_the_one_setting(repo, tmp_path):
    assert book.repository_url(repo / "pyproject.toml") == REPO
    write(tmp_path, "bare.toml", '[project]\nname = "x"\n')
    with pytest.raises(SystemExit, match=r"\[project.urls\] has no 'Repository'"):
        book.repository_url(tmp_path / "bare.toml")


def test_nav_lists_each_chapter_in_order_with_its_notebook(repo):
    nav, _ = book.stage(root=repo, docs=repo / "docs")
    assert nav[0] == {"Home": "index.md"}
    assert nav[1] == {"Chapters": [{"1. LoRA": "chapters/01-lora.md"},
                                   {"1. LoRA · notebook": "notebooks/01-lora.ipynb"},
                                   {"2. AdaLoRA": "chapters/02-adalora.md"},
                                   {"9. Evaluation and forgetting": "chapters/09-forgetting.md"},
                                   {"9. Evaluation and forgetting · notebook": "notebooks/09-forgetting.ipynb"}]}
    assert nav[2:5] == [{"Exercises": "exercises/README.md"}, {"Glossary": "chapters/glossary.md"},
                        {"Source": [{"minilora/lora.py": "minilora/lora.py.md"}]}]
    assert nav[5] == {"Other files": [{"exercises/learner/lora.py": "exercises/learner/lora.py.md"},
                                      {"exercises/test_01_lora.py": "exercises/test_01_lora.py.md"},
                                      {"tests/test_lora.py": "tests/test_lora.py.md"}]}


def test_link_bars_tie_chapter_notebook_and_exercise(repo):
    _, bars = book.stage(root=repo, docs=repo / "docs")
    assert bars["chapters/01-lora.md"] == {"Notebook": "notebooks/01-lora.ipynb",
                                           "Exercise": "exercises/learner/lora.py.md",
                                           "Exercise tests": "exercises/test_01_lora.py.md"}
    assert bars["notebooks/01-lora.ipynb"]["Chapter"] == "chapters/01-lora.md"
    assert bars["chapters/02-adalora.md"] == {}  # no notebook, no exercise
    assert bars["notebooks/09-forgetting.ipynb"] == {"Chapter": "chapters/09-forgetting.md"}
    assert (repo / "docs/exercises/test_01_lora.py.md").exists()


def test_relative_links_point_where_the_target_is_on_the_site(repo):
    book.stage(root=repo, docs=repo / "docs")
    docs = repo / "docs"
    assert (docs / "index.md").read_text() == (repo / "README.md").read_text()  # those links already work
    chapter = (docs / "chapters/01-lora.md").read_text()
    assert "[the module](../minilora/lora.py.md#L3)" in chapter
    assert f"[the stubs]({REPO}/tree/main/exercises/learner)" in chapter  # a folder: the repository online
    assert "[home](../index.md)" in chapter and "[a figure](figures/01-lora-bypass.png)" in chapter
    assert "[gone](../nowhere.py)" in chapter  # left broken, for the browser check to report
    assert "[the paper](https://arxiv.org/abs/2106.09685)" in chapter
    assert "# not a heading [x](../minilora/lora.py)\n" in chapter  # code is left alone
    cell = json.loads((docs / "notebooks/01-lora.ipynb").read_text())["cells"][0]["source"]
    assert cell == ("# 01\n\nRead [the test](../tests/test_lora.py.html), [the text](../chapters/01-lora.html"
                    "#3-the-bypass) and [the exercises](../exercises/index.html).")  # nbconvert's HTML: final URLs
    source = (docs / "minilora/lora.py.md").read_text()
    assert f"[View `minilora/lora.py` in the repository]({REPO}/blob/main/minilora/lora.py)" in source
    assert '````python\n"""LoRA."""\nx = "```"\n````\n' in source  # a fence longer than any ``` inside
    assert (docs / "chapters/figures/01-lora-bypass.png").read_text() == "png"


def test_code_blocks_are_not_read_as_headings():
    text = "````markdown\n```python\n# inside\n```\n# still inside\n````\n# Title\n"
    assert [in_code for _, in_code in book.lines_outside_code(text.splitlines())] == [True] * 6 + [False]
    assert book.title_of(text) == "Title"


def test_glossary_is_its_own_page(repo):
    book.stage(root=repo, docs=repo / "docs")
    assert (repo / "docs/chapters/glossary.md").read_text() == (
        "# Glossary (English / 中文)\n\n*From [2. AdaLoRA](02-adalora.md).*\n\n| a | b |\n\n## Terms\n\nrank\n\n"
        "```\n# code\n```\n\n")


def test_colab_and_binder_links():
    assert hooks.launch_links(REPO, "notebooks/01-lora.ipynb") == {
        "Open in Colab": "https://colab.research.google.com/github/someone/minilora/blob/main/notebooks/01-lora.ipynb",
        "Open in Binder": "https://mybinder.org/v2/gh/someone/minilora/HEAD?labpath=notebooks%2F01-lora.ipynb"}
    assert hooks.launch_links("https://gitlab.com/someone/minilora", "notebooks/01-lora.ipynb") == {}


def test_the_real_book_has_every_chapter(tmp_path):
    nav, _ = book.stage(root=ROOT, docs=tmp_path / "docs")
    chapters = [page for item in nav[1]["Chapters"] for page in item.values()]
    on_disk = sorted(f"chapters/{p.name}" for p in (ROOT / "chapters").glob("[0-9][0-9]-*.md"))
    assert [page for page in chapters if page.startswith("chapters/")] == on_disk
    assert {"Glossary": "chapters/glossary.md"} in nav
    for page in chapters:
        assert (tmp_path / "docs" / page).exists(), page
