"""The installed packages whose versions differ from requirements.lock: what a refresh of the lock would change.

    python scripts/lock_drift.py requirements.lock      # run by `make test-latest`, in .venv-latest

Reads the lock's exact pins (`name==version`, with their environment markers evaluated for this interpreter) and
compares each with the version installed in the running environment. Prints one line per difference, and the
packages installed here that the lock does not name. Always exits 0: it reports, the test suite judges.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")


def locked_versions(lock: Path) -> dict[str, str]:
    """{canonical name: version} of the pins that apply to this interpreter and platform."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line.strip())
        if match and (match[3] is None or Marker(match[3]).evaluate()):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def installed_versions() -> dict[str, str]:
    """{canonical name: version} in this environment's site-packages (not vendored copies elsewhere on sys.path)."""
    site_packages = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site_packages)}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python scripts/lock_drift.py requirements.lock")
    pins, installed = locked_versions(Path(argv[0])), installed_versions()
    # torch's local version label (+cpu, +cu124) names the build, not a different release
    changed = [f"  {name}: locked {pins[name]}, here {version}" for name, version in sorted(installed.items())
               if name in pins and version.split("+")[0] != pins[name]]
    extra = [f"  {name} {version}" for name, version in sorted(installed.items())
             if name not in pins and name not in ("minilora", "uv")]
    if changed:
        print(f"{len(changed)} package(s) newer or older than {argv[0]}:", *changed, sep="\n")
    else:
        print(f"every installed package that {argv[0]} pins is at its locked version")
    if extra:
        print(f"{len(extra)} package(s) not in the lock:", *extra, sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
