"""A checkpoint folder's weights, in safetensors files: checked from their headers, read one tensor at a time.

A Hugging Face model folder keeps its weights in one file, `model.safetensors`, or in shards that
`model.safetensors.index.json` lists ({"weight_map": {tensor name: file name}}). A safetensors file is

    8 bytes: n, the header's length (little-endian) | n bytes: a JSON header | the tensors' bytes, back to back
    header = {tensor name: {"dtype": "BF16", "shape": [4096, 4096], "data_offsets": [begin, end]}, ...}

so every tensor's name, dtype, shape and place in the file can be read, and checked against the model, before
a single weight is read (`read_header`, `Checkpoint.check`), and one tensor can be read without the rest of its
file (`Checkpoint.read`, through safetensors' `safe_open`, which maps the file and copies out what is asked).

What this module refuses, each time naming the file and the tensor:

* pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...): reading one means unpickling it, and unpickling runs
  whatever code the file's author put in it. They are never opened; the error says how to convert them.
* an index that names a file the folder does not hold, or a tensor that file does not have;
* a header that lies (a tensor whose bytes do not match its dtype and shape) or a truncated file (a tensor
  whose bytes lie past the end of the file);
* against the model: a missing tensor, one of the wrong shape, one of a dtype that is not a float.

This is floor 0: it knows files and tensors, nothing of the model (minilora.model_builder asks the questions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes per element of every dtype the safetensors format defines, and the float ones a model may hold.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32")  # the safetensors names of the float dtypes a weight may have
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit: a longer "header" is not a safetensors file


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, and its dtype and shape as that file's header states them."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file says it holds, each checked against the file's size.

    Reads only the header (8 + n bytes). Raises ValueError naming the file (and the tensor) when the header is
    not JSON, when a tensor's [begin, end) span is not dtype size x shape bytes (a header that lies), or
    when it ends past the end of the file (a truncated file).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file, or truncated: {size} bytes, header length "
                             f"{n} (the file should start with the length of its JSON header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name != "__metadata__":
            entries[name] = _entry(path, name, info, data_bytes)
    return entries


def _entry(path: Path, name: str, info, data_bytes: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        item = ITEM_BYTES[dtype]
        if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r}: the header entry {info!r} is not a safetensors entry "
                         f"(dtype one of {sorted(ITEM_BYTES)}, shape, data_offsets [begin, end])") from None
    needed = item * math.prod(shape)
    if end - begin != needed:
        raise ValueError(f"{path}: tensor {name!r}: the header lies: {dtype} {list(shape)} takes {needed:,d} "
                         f"bytes, its data_offsets [{begin}, {end}) span {end - begin:,d}")
    if end > data_bytes:
        raise ValueError(f"{path}: tensor {name!r}: the file is truncated: the tensor's bytes end at "
                         f"{end:,d}, the file holds {data_bytes:,d} bytes of data (copy or save it again)")
    return TensorEntry(path, dtype, shape)


def refuse_pickles(folder: Path) -> None:
    """A folder whose weights are pickle files: say why they are not read and how to convert them."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(f"{folder}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is in the folder")
    out = f"{folder.name}-safetensors"
    raise ValueError(
        f"{folder}: the weights are pickle files ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}), "
        f"which minilora never opens: loading a pickle runs whatever code its author put in it. Convert them "
        f"once, in an environment you trust, with transformers: python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{folder}', dtype='auto').save_pretrained('{out}', "
        f"safe_serialization=True)\", copy the tokenizer files beside them, and pass the new folder")


class Checkpoint:
    """The tensors of a checkpoint folder, from its safetensors headers: name -> TensorEntry (`entries`).

    Opening reads the index (if any) and every file's header, never a weight; `check` compares them with the
    tensors a model needs; `read` reads some of them.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.source = index
            self.entries = self._sharded(index)
        elif (self.folder / SINGLE_FILE).is_file():
            self.source = self.folder / SINGLE_FILE
            self.entries = read_header(self.source)
        else:
            refuse_pickles(self.folder)

    def _sharded(self, index: Path) -> dict[str, TensorEntry]:
        """Every tensor the index lists, found in the header of the shard it names."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a \"weight_map\" "
                             f"of tensor name -> file name)")
        headers = {}
        for file in sorted(set(weight_map.values())):
            tensors = sorted(name for name, f in weight_map.items() if f == file)
            path = self.folder / file
            if Path(file).name != file or not path.is_file():
                raise ValueError(f"{index} puts {len(tensors)} tensor(s) ({tensors[0]!r}, ...) in {file!r}, "
                                 f"which is not a file in {self.folder}: a shard is missing")
            headers[file] = read_header(path)
        entries = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise ValueError(f"{index} puts tensor {name!r} in {file}, but that file's header has no "
                                 f"such tensor")
            entries[name] = headers[file][name]
        return entries

    def check(self, needed: dict[str, tuple[int, ...]], ignored: tuple[str, ...] = ()) -> None:
        """Raise ValueError unless the checkpoint holds every tensor of `needed` ({name: shape}) with that
        shape and a float dtype, and nothing else but tensors named in `ignored` (a name, or a suffix
        starting with "."): older Llama checkpoints store the rotary table, which the model computes, and
        some store a tied head beside the embedding it is tied to."""
        for name, shape in needed.items():
            entry = self.entries.get(name)
            if entry is None:
                raise ValueError(f"{self.source}: tensor {name!r} is missing: the model (config.json) needs it")
            if entry.shape != tuple(shape):
                raise ValueError(f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, the model "
                                 f"(config.json) needs {list(shape)}")
            if entry.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{entry.file}: tensor {name!r} is stored as {entry.dtype}; model weights "
                                 f"must be one of {sorted(FLOAT_DTYPES)}")
        extra = sorted(n for n in self.entries if n not in needed and n not in ignored
                       and not any(i.startswith(".") and n.endswith(i) for i in ignored))
        if extra:
            raise ValueError(f"{self.entries[extra[0]].file}: tensor {extra[0]!r} is not a weight of the model "
                             f"config.json describes ({len(extra)} such tensor(s)): a checkpoint of another model?")

    def read(self, names, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors `names`, cast to `dtype` on `device`, read file by file, tensor by tensor."""
        from safetensors import safe_open  # here: the modules that never read a checkpoint need no safetensors

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name].file, []).append(name)
        tensors = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in group:
                    # get_tensor returns a private memory map of the file: copy, so the model owns its memory
                    # and never depends on the file staying as it is (a file truncated later would crash it).
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype, copy=True)
        return tensors
