"""pyproject.toml, environment.yml and requirements.lock must describe the same environment, and the lock the one
that is installed."""

import os
import re
import sys
import sysconfig
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11 on

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """'peft==0.21.*' -> 'peft' (PEP 503 normalised)."""
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_requirements() -> dict[str, str]:
    # environment.yml is simple enough to read without a YAML parser: the entries of the `pip:` list.
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = {}
    for line in lines[start + 1:]:
        entry = line.strip()
        if not entry.startswith("- "):
            break
        entry = entry[2:].strip()
        if entry not in ("-e .", "-c requirements.lock"):
            reqs[_name(entry)] = entry.replace(" ", "")
    return reqs


def test_same_packages_and_pins():
    assert _pyproject_requirements() == _environment_requirements()


def test_environment_installs_the_package_itself_from_the_lock():
    text = (ROOT / "environment.yml").read_text()
    assert "- -e ." in text and "- -c requirements.lock" in text


def test_python_version_agrees():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"  # pip install -e . into an existing environment
    assert "python>=3.11" in (ROOT / "environment.yml").read_text()  # the lock's packages need 3.11
    assert "--python-version 3.11" in (ROOT / "Makefile").read_text()


# -- the lock (issue 21: five days after a green CI, a fresh clone installed other versions) -------------------


def _lock():
    """{name: version} of the lock's pins for this interpreter (scripts/lock_drift.py reads it the same way)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from lock_drift import locked_versions

    return locked_versions(ROOT / "requirements.lock")


def test_the_lock_pins_every_requirement_within_its_range():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = _lock()
    for text in project["dependencies"] + extras["dev"] + extras["book"]:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate():
            assert requirement.specifier.contains(pins[_name(requirement.name)], prereleases=True), text


def test_the_makefile_installs_the_locked_torch_by_default():
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_SPEC  ?= $(LOCK_TORCH)" in makefile
    assert _lock()["torch"] == "2.13.0"  # the CPU build these machines keep on disk; a change is deliberate


@pytest.mark.skipif(os.environ.get("MINILORA_UNLOCKED") == "1", reason="make test-latest: newer than the lock")
def test_every_installed_package_is_the_locked_version():
    """The environment this suite runs in is the lock, package for package (torch's +cpu/+cuXXX label names the
    build, not the release). `make test-latest` runs without the lock, and says so."""
    from importlib import metadata

    pins = _lock()
    # site-packages only: a package's vendored copies (setuptools puts its own on sys.path) are not installed
    site_packages = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {_name(d.metadata["Name"]): d.version.split("+")[0]
                 for d in metadata.distributions(path=site_packages)}
    assert pins and installed
    installed.pop("minilora")
    if installed["torch"] != pins["torch"]:  # make TORCH_SPEC=...: torch and its CUDA libraries are the user's
        installed = {n: v for n, v in installed.items() if not re.match(r"(torch|triton|nvidia-.*)$", n)}
    assert {n: v for n, v in installed.items() if pins.get(n) != v} == {}


# -- make lab (issue 13: as root it exited with "Running as root is not recommended") ---------------------


def _make_lab(*options: str) -> str:
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: treat the install stamp as up to date, so that `make -n` only prints the lab command. (A makefile
    # named as a target would be remade even under -n: make runs its recipe, a whole pip install.)
    # Run as a top-level make even when the suite itself runs under `make test` (no "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.minilora-installed", "lab",
                           "PY=python", *options], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_make_lab_allows_root_and_uses_the_current_token_option():
    import os

    command = _make_lab()
    assert command.startswith("python -m jupyter lab notebooks")
    assert ("--allow-root" in command) == (os.geteuid() == 0)
    assert "token" not in command  # default: Jupyter's own random token
    assert _make_lab("LAB_TOKEN=none").endswith("--IdentityProvider.token=''")
    assert _make_lab("LAB_TOKEN=s3cret").endswith("--IdentityProvider.token='s3cret'")


def test_the_lab_options_exist_in_jupyter_server():
    serverapp = pytest.importorskip("jupyter_server.serverapp")
    identity = pytest.importorskip("jupyter_server.auth.identity")
    assert serverapp.ServerApp.class_traits()["allow_root"] is not None
    assert "token" in identity.IdentityProvider.class_traits()
