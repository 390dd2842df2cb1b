"""The book as a website: lay the repository out as pages, then let MkDocs render them into site/.

    python scripts/book.py            # build site/ (what `make book` runs)
    python scripts/book.py --strict   # the same, with exit status 1 if MkDocs warned

MkDocs (with the Material theme and mkdocs-jupyter, configured in book/mkdocs.yml) renders one folder of
pages. This script fills that folder, build/book/docs/, with the repository as a reader sees it:

    index.md               README.md: the chapter map is the home page
    chapters/*.md          every chapter, with chapters/figures/
    chapters/glossary.md   the chapter section headed "Glossary", as a page of its own
    notebooks/*.ipynb      shown from their committed outputs; nothing is executed
    exercises/README.md
    <path>.md              a source page for every module in minilora/ and for every other repository file
                           that a page links to (`../minilora/lora.py` -> `../minilora/lora.py.md`)

The layout is the repository's own, so the relative links that work on GitHub work here; a link to any
other part of the repository (a folder, a binary file) goes to the repository online. The navigation lists
whatever chapters exist, each followed by its notebook, so a new chapter appears when its file lands.
The repository's address is the one setting `[project.urls] Repository` in pyproject.toml.
"""

import argparse
import json
import logging
import posixpath
import re
import shutil
import sys
import time
from importlib.util import find_spec
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "book" / "mkdocs.yml"
DOCS = ROOT / "build" / "book" / "docs"
SITE = ROOT / "site"

CHAPTER = re.compile(r"^\d\d-[\w-]+\.md$")
# An inline Markdown link or image: [text](target "title") or ![alt](target). Group 2 is the target.
LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
# Files shown as source pages, and the language their code block is highlighted in.
SOURCE_LANGUAGES = {".py": "python", ".sh": "bash", ".toml": "toml", ".yml": "yaml", ".yaml": "yaml",
                    ".json": "json", ".jsonl": "json", ".txt": "text", ".cfg": "ini", "": "text"}


def repository_url(pyproject=ROOT / "pyproject.toml"):
    """The repository's public address, from pyproject.toml's [project.urls] Repository (no trailing slash)."""
    urls = tomllib.loads(Path(pyproject).read_text(encoding="utf-8")).get("project", {}).get("urls", {})
    if "Repository" not in urls:
        raise SystemExit(f"{pyproject}: [project.urls] has no 'Repository' entry (found {sorted(urls)}); "
                         "the notebook pages' Colab and Binder links are built from it")
    return urls["Repository"].rstrip("/")


def title_of(markdown):
    """The text of the first level-1 heading outside code blocks, or None."""
    for line, in_code in lines_outside_code(markdown.splitlines()):
        match = HEADING.match(line)
        if not in_code and match and len(match.group(1)) == 1:
            return match.group(2)
    return None


def lines_outside_code(lines):
    """Yield (line, in_code) for each line: in_code is True inside a fenced code block and on its fences."""
    fence = None
    for line in lines:
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            yield line, True
        elif fence is not None:
            if match and match.group(1).startswith(fence) and not line.strip()[len(match.group(1)):]:
                fence = None  # a closing fence: the same character, at least as long, nothing after it
            yield line, True
        else:
            yield line, False


def nav_label(title, fallback):
    """'Chapter 1 — LoRA: fine-tuning through ...' -> '1. LoRA' (the sidebar is narrow)."""
    match = re.match(r"Chapter\s+(\d+)\s*[—–-]+\s*([^:]+)", title or "")
    return f"{int(match.group(1))}. {match.group(2).strip()}" if match else (title or fallback)


def chapters(root=ROOT):
    """The chapters in order, as (chapters/NN-name.md, notebooks/NN-name.ipynb or None), from what exists."""
    pairs = []
    for path in sorted((root / "chapters").glob("*.md")):
        if CHAPTER.match(path.name):
            notebook = root / "notebooks" / (path.stem + ".ipynb")
            pairs.append((f"chapters/{path.name}", f"notebooks/{notebook.name}" if notebook.exists() else None))
    return pairs


def glossary(markdown):
    """The section headed 'Glossary' (its heading, a level-1 heading, and its body), or None.

    The section ends at the next heading of its level or above; its sub-headings move up with it.
    """
    lines, start, level = markdown.splitlines(), None, 0
    for i, (line, in_code) in enumerate(lines_outside_code(lines)):
        match = None if in_code else HEADING.match(line)
        if match and start is None and re.match(r"(\d+\.\s*)?Glossary\b", match.group(2)):
            start, level = i, len(match.group(1))
        elif match and start is not None and len(match.group(1)) <= level:
            lines = lines[:i]
            break
    if start is None:
        return None
    shifted = []
    for line, in_code in lines_outside_code(lines[start:]):
        match = None if in_code else HEADING.match(line)
        shifted.append("#" * (len(match.group(1)) - level + 1) + line[len(match.group(1)):] if match else line)
    shifted[0] = "# " + re.sub(r"^\d+\.\s*", "", HEADING.match(shifted[0]).group(2))
    return "\n".join(shifted) + "\n"


def source_page(path, text, repository):
    """A page that shows one repository file as highlighted code, with a link to it online.

    The page has no outline column ('hide: [toc]'), so that the code gets the width.
    """
    language = SOURCE_LANGUAGES.get(Path(path).suffix, "text")
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return (f"---\nhide: [toc]\n---\n\n# `{path}`\n\n"
            f"[View `{path}` in the repository]({repository}/blob/main/{path})\n\n"
            f"{fence}{language}\n{text.rstrip()}\n{fence}\n")


class Stage:
    """Copies pages into the docs folder, rewriting each relative link to where its target is on the site."""

    def __init__(self, root, docs, repository):
        self.root, self.docs, self.repository = root, docs, repository
        self.pages = {}  # repository path -> site path, for every file staged as a page or an image
        self.queue = []  # (repository path, site path) still to write

    def add(self, repo_path, site_path=None):
        """Stage a repository file (once) under site_path (default: the same path); return its site path."""
        if repo_path not in self.pages:
            self.pages[repo_path] = site_path or repo_path
            self.queue.append((repo_path, self.pages[repo_path]))
        return self.pages[repo_path]

    def write_all(self):
        while self.queue:
            repo_path, site_path = self.queue.pop(0)
            source, target = self.root / repo_path, self.docs / site_path
            target.parent.mkdir(parents=True, exist_ok=True)
            if site_path.endswith(".md") and not repo_path.endswith(".md"):
                text = source.read_text(encoding="utf-8")
                target.write_text(source_page(repo_path, text, self.repository), encoding="utf-8")
            elif site_path.endswith(".md"):
                target.write_text(self.rewrite(source.read_text(encoding="utf-8"), repo_path), encoding="utf-8")
            elif site_path.endswith(".ipynb"):  # MkDocs does not touch the links nbconvert renders: final URLs
                notebook = json.loads(source.read_text(encoding="utf-8"))
                for cell in notebook["cells"]:
                    if cell["cell_type"] == "markdown":
                        cell["source"] = self.rewrite("".join(cell["source"]), repo_path, as_html=True)
                target.write_text(json.dumps(notebook, ensure_ascii=False), encoding="utf-8")
            else:
                shutil.copyfile(source, target)

    def rewrite(self, markdown, repo_path, as_html=False):
        """Point every relative link in a page (at repo_path) at the target's place on the site."""
        out = []
        for line, in_code in lines_outside_code(markdown.split("\n")):
            out.append(line if in_code else LINK.sub(lambda m: m.group(1) + self.target(m.group(2), repo_path,
                                                                                         as_html) + m.group(3), line))
        return "\n".join(out)

    def target(self, link, repo_path, as_html=False):
        """Where a link written in repo_path must point on the site (unchanged when it already works).

        MkDocs turns a link to a page (.md, .ipynb) into one to its .html; with as_html, this does it.
        """
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", link, re.IGNORECASE):
            return link  # another site, an anchor on this page, or an absolute path
        path, hash_, fragment = link.partition("#")
        here = posixpath.dirname(repo_path)
        resolved = posixpath.normpath(posixpath.join(here, path))
        file = self.root / resolved
        if resolved.startswith("..") or not file.exists():
            return link  # nothing there: the browser check reports it as a broken link
        if resolved in self.pages:
            site_path = self.pages[resolved]
        elif file.is_file() and file.suffix in (".md", ".png"):
            site_path = self.add(resolved)
        elif file.is_file() and file.suffix in SOURCE_LANGUAGES:
            site_path = self.add(resolved, resolved + ".md")
        else:  # a folder, or a file a browser cannot show: the repository online shows it
            kind = "tree" if file.is_dir() else "blob"
            return f"{self.repository}/{kind}/main/{resolved}" + hash_ + fragment
        if as_html and site_path.endswith((".md", ".ipynb")):
            site_path = re.sub(r"(^|/)README\.html$", r"\1index.html", posixpath.splitext(site_path)[0] + ".html")
        site_here = posixpath.dirname(self.pages[repo_path])
        return posixpath.relpath(site_path, site_here or ".") + hash_ + fragment


def stage(root=ROOT, docs=DOCS, repository=None):
    """Fill the docs folder from the repository; return MkDocs' navigation and the pages' link bars."""
    repository = repository or repository_url(root / "pyproject.toml")
    if docs.exists():
        shutil.rmtree(docs)
    docs.mkdir(parents=True)
    staged = Stage(root, docs, repository)
    staged.add("README.md", "index.md")
    pairs = chapters(root)
    for chapter, notebook in pairs:
        staged.add(chapter)
        if notebook:
            staged.add(notebook)
    for figure in sorted((root / "chapters" / "figures").glob("*.png")):
        staged.add(f"chapters/figures/{figure.name}")
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        staged.add(f"notebooks/{notebook.name}")
    staged.add("exercises/README.md")
    modules = [f"minilora/{module.name}" for module in sorted((root / "minilora").glob("*.py"))]
    for module in modules:
        staged.add(module, module + ".md")
    bars = link_bars(root, pairs)
    for links in bars.values():
        for target in links.values():
            if target.endswith(".py.md"):
                staged.add(target[:-3], target)
    staged.write_all()
    glossary_page = write_glossary(root, docs, pairs)
    return navigation(root, pairs, staged.pages, modules, glossary_page), bars


def link_bars(root, pairs):
    """The bar of links under each chapter's and notebook's title: {page: {label: page it links to}}.

    Chapter NN's exercise is exercises/test_NN_<name>.py, testing the stub exercises/learner/<name>.py.
    """
    bars = {}
    for chapter, notebook in pairs:
        links = {"Chapter": chapter, "Notebook": notebook}
        for test in sorted((root / "exercises").glob(f"test_{Path(chapter).name[:2]}_*.py")):
            stub = f"exercises/learner/{test.stem.split('_', 2)[2]}.py"
            links.update({"Exercise": f"{stub}.md"} if (root / stub).exists() else {})
            links["Exercise tests"] = f"exercises/{test.name}.md"
        for page in filter(None, (chapter, notebook)):
            bars[page] = {label: target for label, target in links.items() if target and target != page}
    return bars


def write_glossary(root, docs, pairs):
    """Write the first chapter section headed 'Glossary' as chapters/glossary.md; return that path, or None."""
    for chapter, _ in pairs:
        text = (root / chapter).read_text(encoding="utf-8")
        section = glossary(text)
        if section:
            title, _, body = section.partition("\n")
            origin = f"*From [{nav_label(title_of(text), chapter)}]({Path(chapter).name}).*\n\n"
            (docs / "chapters" / "glossary.md").write_text(f"{title}\n\n{origin}{body.lstrip()}", encoding="utf-8")
            return "chapters/glossary.md"
    return None


def navigation(root, pairs, pages, modules, glossary_page):
    """The sidebar: home, each chapter followed by its notebook, exercises, glossary, then the source pages."""
    chapter_nav = []
    for chapter, notebook in pairs:
        label = nav_label(title_of((root / chapter).read_text(encoding="utf-8")), chapter)
        chapter_nav += [{label: chapter}] + ([{f"{label} · notebook": notebook}] if notebook else [])
    nav = [{"Home": "index.md"}, {"Chapters": chapter_nav}]
    paired = {notebook for _, notebook in pairs}
    others = [{Path(site).stem: site} for site in pages.values() if site.endswith(".ipynb") and site not in paired]
    if others:
        nav.append({"More notebooks": others})
    nav.append({"Exercises": "exercises/README.md"})
    if glossary_page:
        nav.append({"Glossary": glossary_page})
    nav.append({"Source": [{module: module + ".md"} for module in modules]})
    linked = sorted(site for repo, site in pages.items() if site.endswith(".md") and not repo.endswith(".md")
                    and repo not in modules)
    if linked:
        nav.append({"Other files": [{site[:-3]: site} for site in linked]})
    return nav


def bundle_mathjax(docs=DOCS):
    """Copy MathJax 3 (one file, SVG output: no web fonts) from its PyPI package into the site's assets."""
    mathjax = find_spec("mathjax")
    if mathjax is None:
        raise SystemExit("MathJax is not installed: run `make book`, or pip install -e '.[book]'")
    bundle = Path(mathjax.submodule_search_locations[0]) / "static" / "mathjax"
    (docs / "assets" / "mathjax").mkdir(parents=True, exist_ok=True)
    for name in ("es5/tex-svg-full.js", "LICENSE"):
        shutil.copyfile(bundle / name, docs / "assets" / "mathjax" / Path(name).name)


class Warnings(logging.Handler):
    """Shows MkDocs' warnings (a link it cannot resolve, ...) on stderr and keeps them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
        print(f"{record.levelname}  {record.getMessage()}", file=sys.stderr)


def build():
    """Stage the pages and render the site into site/; return (number of pages, MkDocs' warnings)."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    warnings = Warnings()
    logging.getLogger("mkdocs").addHandler(warnings)
    try:
        nav, bars = stage()
        bundle_mathjax()
        extra = {"repository": repository_url(), "link_bars": bars}  # read by book/hooks.py
        mkdocs_build(load_config(str(CONFIG), nav=nav, extra=extra))
    finally:
        logging.getLogger("mkdocs").removeHandler(warnings)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # the download: the committed file itself
        shutil.copyfile(notebook, SITE / "notebooks" / notebook.name)
    return len(list(SITE.rglob("*.html"))), warnings.messages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if MkDocs warned")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pages, warnings = build()
    print(f"book: {pages} pages in {SITE.relative_to(ROOT)}/ ({time.perf_counter() - start:.0f} s), "
          f"{len(warnings)} warnings; open site/index.html, or `make book-serve`")
    return 1 if args.strict and warnings else 0


if __name__ == "__main__":
    sys.exit(main())
