"""Writing files so that a crash never leaves half of one behind.

Adapters, checkpoints and the running example's cached weights are all written the same way: into a
temporary file in the target's own folder, then renamed onto the target with `os.replace`. A rename within
one file system is atomic, so a reader (or a resumed run) sees either the old complete file or the new
complete file — never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` to fill a temporary file next to `path`, then rename it onto `path`.

    If `write` raises (or the process is interrupted), the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
