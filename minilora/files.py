"""Writing and reading files so that a crash never leaves half of one, and a file never runs code.

Adapters, checkpoints and the running example's cached weights are all written the same way: into a
temporary file in the target's own folder, then renamed onto the target with `os.replace`. A rename within
one file system is atomic, so a reader (or a resumed run) sees either the old complete file or the new
complete file — never a truncated one. The file gets the permissions `open()` would have given it (0644
under the usual umask 022, as peft and Hugging Face write theirs), and a full disk is said in words, with
the file's name, instead of a library's "unexpected pos 23872 vs 23764".

Nothing a user hands minilora is unpickled (unpickling runs whatever code the file names): tensors are read
from safetensors files, everything else from JSON (`read_json` names the file when it is not JSON), and
`save_state` / `load_state` store a nested training state — optimizer moments, RNG states, counters — as
those two formats together.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------------------------------
# Writing: atomic, with the usual permissions, a full disk said in words
# ----------------------------------------------------------------------------------------------------


class DiskFullError(OSError):
    """No space left (or over quota) on the device that holds `path`."""

    def __init__(self, path: Path):
        try:
            free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
        except OSError:
            free = "free space unknown"
        super().__init__(errno.ENOSPC, f"the disk is full: {path} could not be written ({free}); free some "
                                       f"space and run again")

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT, from Python (OSError) or from safetensors' Rust writer ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, SafetensorError) and any(f"(os error {code})" in str(err)
                                                    for code in (errno.ENOSPC, errno.EDQUOT))


def new_mode(folder: bool = False) -> int:
    """The mode `open()` (0o666) or `mkdir()` (0o777) would give a new file or folder under the umask."""
    umask = os.umask(0o022)  # the only portable way to read the umask is to set it; set it straight back
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` to fill a temporary file next to `path`, then rename it onto `path`.

    If `write` raises (or the process is interrupted), the temporary file is removed and `path` is untouched;
    a full disk raises DiskFullError naming `path`. The file's mode is the umask's (mkstemp makes 0600).
    """
    path = Path(path)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        write(tmp)
        os.chmod(tmp, new_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def temporary_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty folder in `parent` with a unique name, with the umask's mode (mkdtemp makes 0700)."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(folder, new_mode(folder=True))
    return folder


# ----------------------------------------------------------------------------------------------------
# Reading JSON: every failure names the file
# ----------------------------------------------------------------------------------------------------


def parse_json(data: str | bytes, where: str):
    """The JSON value in `data` (bytes must be UTF-8); ValueError naming `where` when it is not JSON, not
    UTF-8, or nested too deeply for Python to read (json's recursion: about a thousand levels)."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON, truncated or corrupt? ({err.msg} at line {err.lineno} "
                         f"column {err.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def read_json(path: str | os.PathLike):
    """The JSON value in file `path` (see `parse_json`); FileNotFoundError if there is none."""
    return parse_json(Path(path).read_bytes(), str(path))


# ----------------------------------------------------------------------------------------------------
# A training state as safetensors + JSON
# ----------------------------------------------------------------------------------------------------

TAGS = ("tensor", "list", "tuple", "dict")


def save_state(folder: Path, name: str, state) -> None:
    """`state` — dicts, lists and tuples of tensors, numbers, strings, booleans and None, nested — as
    `name`.safetensors (the tensors) and `name`.json (the rest, each tensor replaced by its key).

    In the JSON every container is tagged ({"tuple": [...]}, {"dict": [[key, value], ...]}), so tuples stay
    tuples and integer keys stay integers; floats are written as repr and read back bit for bit."""
    tensors = {}
    tree = _encode(state, tensors)
    write_atomically(folder / f"{name}.safetensors",
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(folder / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(tree) + "\n"))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file we wrote; ValueError naming the file if it cannot be read."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} could not be read (truncated or corrupt?): {err}") from err


def load_state(folder: Path, name: str):
    """What `save_state` stored; ValueError naming the file for anything it could not have written."""
    tree_file = folder / f"{name}.json"
    tensors = read_tensors(folder / f"{name}.safetensors")
    try:
        return _decode(read_json(tree_file), tensors, tree_file)
    except RecursionError:
        raise ValueError(f"{tree_file}: nested too deeply to be a training state") from None


def _encode(value, tensors: dict):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)  # no shared storage
        return {"tensor": key}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    if isinstance(value, dict):
        if not all(key is None or isinstance(key, (str, int, float)) for key in value):
            raise TypeError(f"save_state: dict keys must be str, int, float, bool or None, got {list(value)[:3]}")
        return {"dict": [[key, _encode(v, tensors)] for key, v in value.items()]}
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return value
    raise TypeError(f"save_state: cannot store a {type(value).__name__} (only tensors, numbers, strings, "
                    f"None, and lists, tuples and dicts of them)")


def _decode(tree, tensors: dict, where: Path):
    if not isinstance(tree, (dict, list)):
        return tree
    tag, body = next(iter(tree.items())) if isinstance(tree, dict) and len(tree) == 1 else (None, None)
    if tag == "tensor" and isinstance(body, str) and body in tensors:
        return tensors[body]
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, tensors, where) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and isinstance(body, list) and all(
            isinstance(pair, list) and len(pair) == 2 and not isinstance(pair[0], (list, dict)) for pair in body):
        return {key: _decode(v, tensors, where) for key, v in body}
    raise ValueError(f"{where}: {json.dumps(tree)[:120]} is not a stored value (expected one of {TAGS} as its "
                     f"only key, or a number, string, boolean or null)")
