"""Where a number was measured, and quiet about third-party log lines that mean nothing.

Float results and timings depend on the machine: PyTorch, oneDNN and bitsandbytes pick different kernels
for different CPU instruction sets (AVX2, AVX-512, AVX512-BF16, AMX), and each blocks its sums its own way.
So every benchmark table and the demo report say where they ran, with `describe()`:

    >>> describe()["cpu_capability"]       # what torch dispatches to: "DEFAULT", "AVX2", "AVX512", ...
    'AVX2'

The second job: on CPUs with AVX512-BF16, importing bitsandbytes (directly or through peft) tries to load an
optional kernel from the Hugging Face Hub for its fused inference path. Where that fails (no `kernels` package,
no network, or HF_HUB_OFFLINE=1, as every `make` target sets) bitsandbytes logs a warning and uses its own
kernels, so the line is harmless; with HF_HUB_OFFLINE=1 the `kernels` package (which transformers 5 installs)
logs one more. A CUDA build of torch without a GPU logs a third when our CPU extension is first compiled. They
land in every notebook's stderr and in the demo's terminal. `quiet_known_log_lines()` filters
exactly those messages on exactly those loggers, and nothing else; `minilora/__init__.py` calls it once.
(tests/test_bnb_kernels.py checks on which CPUs bitsandbytes logs, tests/test_machine.py each filter.)
"""

from __future__ import annotations

import logging
import os
import platform
from importlib import metadata

import torch

# (logger name, start of the message) of log lines known to be harmless. Keep this list short and specific:
# a filter that swallowed every warning of a library would hide the next real problem.
KNOWN_HARMLESS = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub",
     "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub "
     "is in offline mode"),
    # A CUDA build of torch on a machine without a GPU but with a CUDA toolkit (Colab's CPU runtime, or a plain
    # `pip install torch` on Linux) says so when minilora/native.py first imports torch.utils.cpp_extension; the
    # extension is CPU-only, so it needs no CUDA.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
]


class _DropMessage(logging.Filter):
    """A logging filter that drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_log_lines() -> None:
    """Install one filter per KNOWN_HARMLESS line. Safe to call before the library is imported (the logger
    object is created here and reused by the library) and safe to call twice (no second filter)."""
    for name, prefix in KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict:
    """The facts that decide float results and timings on this machine, for the header of any figure."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": round(load, 2),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
    }


def describe_line() -> str:
    """`describe()` as one line for a table caption: 'CPU AVX2 (x86_64, 2 CPUs), 1 thread, load 0.12, ...'."""
    d = describe()
    return (f"CPU {d['cpu_capability']} ({d['machine']}, {d['cpus']} CPUs), {d['threads']} thread(s), "
            f"load {d['load_1min']}, GPU {d['cuda']}, Python {d['python']}, torch {d['torch']}, "
            f"bitsandbytes {d['bitsandbytes']}, peft {d['peft']}")
