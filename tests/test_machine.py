"""minilora.machine: the known harmless bitsandbytes log line never reaches stderr; describe() says where."""

import logging

import torch

import minilora  # noqa: F401  (importing the package installs the filter)
from minilora.machine import KNOWN_HARMLESS, describe, describe_line, quiet_known_log_lines


def test_the_known_bitsandbytes_line_is_dropped_and_nothing_else(caplog):
    name, prefix = KNOWN_HARMLESS[0]
    logger = logging.getLogger(name)
    quiet_known_log_lines()  # a second call must not stack a second filter
    assert sum(1 for f in logger.filters if getattr(f, "prefix", None) == prefix) == 1
    logger.warning(prefix + ": No module named 'kernels'. Please make sure you already `pip install kernels`")
    logger.warning("a different warning from the same logger")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["a different warning from the same logger"]


def test_importing_bitsandbytes_and_peft_prints_nothing_to_stderr():
    import subprocess
    import sys

    code = "import minilora, bitsandbytes, peft"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in done.stderr


def test_describe_names_the_cpu_capability_and_versions():
    d = describe()
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert d["threads"] == torch.get_num_threads() and d["torch"] == torch.__version__
    line = describe_line()
    assert f"CPU {d['cpu_capability']}" in line and f"torch {torch.__version__}" in line
