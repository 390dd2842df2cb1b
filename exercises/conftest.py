"""How the exercise tests find the code they test.

Every exercise test asks the `implementation` fixture for a module by its minilora name, e.g.
`implementation("lora")`, and calls the functions it finds there. Which module comes back is chosen
on the command line (or with environment variables, handy for instructors' scripts):

    pytest exercises --impl=learner                  # exercises/learner/lora.py  (the default)
    pytest exercises --impl=reference                # minilora/core/lora.py, the book's solution
    pytest exercises --learner-dir=/path/to/student  # grade someone else's folder of stubs

    MINILORA_IMPL=reference  MINILORA_LEARNER_DIR=/path/to/student   (same, as variables)

The reference of a chapter is its core file, minilora/core/<name>.py (the stub is that file with the bodies
taken out); an exercise without a core file (LoRA's family, several adapters) is tested against the package's
module minilora/<name>.py.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        choices=("learner", "reference"),
        default=os.environ.get("MINILORA_IMPL", "learner"),
        help="test the learner's stubs (default) or minilora's reference solution (minilora/core/)",
    )
    parser.addoption(
        "--learner-dir",
        default=os.environ.get("MINILORA_LEARNER_DIR", str(HERE / "learner")),
        help="folder holding the learner's lora.py, nf4.py, ... (default: exercises/learner)",
    )


def pytest_configure(config):
    """One clear message for a learner folder that is not there (not one error per test)."""
    if config.getoption("--impl") == "learner":
        folder = Path(config.getoption("--learner-dir"))
        if not folder.is_dir():
            raise pytest.UsageError(f"--learner-dir={folder}: no such folder (it should hold the learner's "
                                    f"lora.py, nf4.py, ...; default {HERE / 'learner'})")


def pytest_report_header(config):
    impl = config.getoption("--impl")
    where = "minilora/core (reference solution)" if impl == "reference" else config.getoption("--learner-dir")
    return f"minilora exercises: testing {where}"


def reference_module(name: str):
    """minilora.core.<name> where the chapter has a core file, else minilora.<name>."""
    if importlib.util.find_spec(f"minilora.core.{name}") is not None:
        return importlib.import_module(f"minilora.core.{name}")
    return importlib.import_module(f"minilora.{name}")


def _load_learner_module(folder: Path, name: str):
    path = folder / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"--learner-dir={folder}: no file {name}.py there (expected {path})")
    # A unique module name per folder, so two students' files never shadow each other. The module is in
    # sys.modules before its code runs, as for a normal import: @dataclass looks its own module up there
    # (to resolve `from __future__ import annotations` strings) and fails on a module that is missing.
    module_name = f"learner_{abs(hash(str(folder)))}_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# Each stub's hint once: a stub's NotImplementedError carries a long hint, and a dozen tests may reach the
# same stub. The first failure shows it; later ones point back to it.
_hints_shown: set = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or not call.excinfo.errisinstance(NotImplementedError):
        return
    stub = call.excinfo.traceback[-1]
    where = (str(stub.path), stub.lineno)
    if where in _hints_shown:
        report.longrepr = (f"NotImplementedError: {Path(str(stub.path)).name}:{stub.lineno + 1} is still a stub "
                           f"(its hint is shown at the first test that reached it)")
    else:
        _hints_shown.add(where)


@pytest.fixture(scope="session")
def implementation(request):
    """`implementation("nf4")` -> the module under test (learner's file or minilora.core.nf4)."""
    impl = request.config.getoption("--impl")
    folder = Path(request.config.getoption("--learner-dir")).resolve()
    cache = {}

    def load(name: str):
        if name not in cache:
            if impl == "reference":
                cache[name] = reference_module(name)
            else:
                cache[name] = _load_learner_module(folder, name)
        return cache[name]

    return load
