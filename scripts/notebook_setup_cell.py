"""Write the setup cell at the top of every notebook: install minilora when it is missing.

A notebook opened on its own (Colab, Binder, a downloaded file) has no minilora to import. Its first code cell
installs it from the repository; inside the repository (`make lab`, nbval) minilora is already installed and
the cell does nothing. The repository URL is one setting, `[project.urls] Repository` in pyproject.toml; this
script writes it into every notebook, and tests/test_notebooks.py checks that they agree.

    python scripts/notebook_setup_cell.py          # (re)write the cell in notebooks/*.ipynb
    python scripts/notebook_setup_cell.py --check  # exit 1 if a notebook's cell is missing or out of date
"""

import argparse
import json
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# minilora setup"


def repository_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def setup_source(url: str) -> str:
    """The cell's code: it installs only when minilora cannot be imported, so it prints nothing here."""
    return "\n".join([
        f"{MARKER}: opened on its own (Colab, Binder)? install minilora first; in the repository it is there.",
        "import importlib.util",
        "",
        'if importlib.util.find_spec("minilora") is None:',
        f'    %pip install --quiet "minilora[dev] @ git+{url}"',
    ])


def setup_cell(url: str, cell_id: str = "minilora-setup") -> dict:
    return {"cell_type": "code", "execution_count": 1, "id": cell_id, "metadata": {}, "outputs": [],
            "source": setup_source(url).splitlines(keepends=True)}


def first_code_cell(notebook: dict) -> int | None:
    return next((i for i, c in enumerate(notebook["cells"]) if c["cell_type"] == "code"), None)


def is_current(notebook: dict, url: str) -> bool:
    i = first_code_cell(notebook)
    return i is not None and "".join(notebook["cells"][i]["source"]) == setup_source(url)


def write(path: Path, url: str) -> None:
    notebook = json.loads(path.read_text())
    i = first_code_cell(notebook)
    cell = setup_cell(url)
    if i is not None and "".join(notebook["cells"][i]["source"]).startswith(MARKER):
        notebook["cells"][i] = cell  # replace an older version of the cell
    else:
        notebook["cells"].insert(i if i is not None else len(notebook["cells"]), cell)
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a notebook is out of date")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args()
    url = repository_url()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    stale = [p for p in paths if not is_current(json.loads(p.read_text()), url)]
    if args.check:
        for p in stale:
            print(f"{p}: the first code cell is not the setup cell for {url}; run scripts/notebook_setup_cell.py")
        return 1 if stale else 0
    for p in stale:
        write(p, url)
        print(f"wrote the setup cell into {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
