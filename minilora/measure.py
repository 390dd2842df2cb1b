"""Measuring on a real model the bytes the memory model predicts, and what a process really holds.

Two kinds of measurement, for two questions:

* *Tensor bytes* (`measure_saved_bytes`, `measure_training_bytes`, `held_tensor_bytes`): tensors' `nbytes`,
  deduplicated by storage, never process memory, so the counts are exact and the same on every machine.
  `minilora.memory` predicts the same quantities from the architecture; the tests compare the two byte for byte
  on the tiny model.
* *Process memory* (`HostMemory`): what the operating system sees this process hold over a stretch of code,
  its peak resident and anonymous memory, the CPU counterpart of `torch.cuda.max_memory_allocated`: the number
  that decides whether a run fits a machine. It holds more than the tensors: the Python and torch runtime,
  the allocator's free-but-kept memory, mapped libraries and files (chapter 7, "Two kinds of peak").
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

import torch


def measure_saved_bytes(model: torch.nn.Module, **inputs) -> int:
    """Run `model(**inputs)` and count the bytes of every distinct tensor autograd saves for backward.

    A `saved_tensors_hooks` pack hook sees each saved tensor; tensors are deduplicated by their storage (views
    of one tensor are stored once) and the model's own parameters are skipped (they are weights, not
    activations). Returns the bytes; the forward's output is discarded.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def measure_training_bytes(model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held by a model after a training step: frozen / trainable parameters, their gradients and the
    optimizer's state tensors (sum of nbytes; tied parameters once)."""
    params = list(model.parameters())  # yields each tied tensor once
    result = {
        "frozen": sum(p.nbytes for p in params if not p.requires_grad),
        "trainable": sum(p.nbytes for p in params if p.requires_grad),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_state": 0,
    }
    if optimizer is not None:
        result["optimizer_state"] = held_tensor_bytes(optimizer.state)
    return result


def held_tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors `obj` keeps: a tensor, or the tensors found in a dict, list or tuple,
    or in an object's attributes (e.g. an AdaLoRA RankAllocator's score dictionaries).

    The walk goes into dicts, lists and tuples only; modules and other objects met on the way are not
    entered, because their tensors (a model's parameters) belong to the model, not to `obj`. Tensors that
    share a storage count once.
    """
    seen: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    is_container = isinstance(obj, (torch.Tensor, dict, list, tuple))
    visit(obj if is_container else vars(obj))
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------
# Process memory, as the operating system counts it
# ----------------------------------------------------------------------------------------------------

STATUS = Path("/proc/self/status")  # Linux: the process's memory counters, in kB


def status_bytes() -> dict[str, int]:
    """This process's memory counters from /proc/self/status (Linux), in bytes: VmRSS (resident now), VmHWM
    (resident high-water mark), RssAnon (anonymous: memory only this process holds), RssFile (mapped files and
    libraries). {} where there is no /proc."""
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")))
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields}


class HostMemory:
    """The peak resident and anonymous memory of this process while a `with` block runs:

        with HostMemory() as host:
            train(...)
        host.resident, host.anonymous          # bytes

    resident   the kernel's own high-water mark of the resident set (VmHWM), reset when the block starts by
               writing 5 to /proc/self/clear_refs, so it is exact; it counts file-backed pages too (the mapped
               torch libraries, a memory-mapped checkpoint), which a memory cap can reclaim. Where the reset is
               not allowed, the highest resident size sampled; without /proc, getrusage's ru_maxrss (since the
               process started).
    anonymous  the highest RssAnon sampled every `interval` seconds by a background thread: memory that only
               this process holds (tensors, the Python heap, the allocator's kept pages), which is what a
               memory cap (a cgroup, a Colab host) cannot take back. A spike shorter than `interval` can be
               missed. None without /proc.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.resident = self.anonymous = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="HostMemory")
        self._exact = False

    def __enter__(self) -> HostMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            self._exact = True
        except OSError:
            self._exact = False
        self._peaks = status_bytes()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._record(status_bytes())

    def _record(self, now: dict[str, int]) -> None:
        for key, value in now.items():
            self._peaks[key] = max(self._peaks.get(key, 0), value)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = status_bytes()
        self._record(now)
        if not now:  # no /proc: the process's peak so far (KiB on Linux, bytes on macOS)
            unit = 1 if sys.platform == "darwin" else 1024
            self.resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
            return
        self.resident = now["VmHWM"] if self._exact else self._peaks["VmRSS"]
        self.anonymous = self._peaks.get("RssAnon")
