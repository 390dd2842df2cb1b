"""minilora.machine: the known harmless log lines never reach stderr, nothing else is hidden; describe() says where."""

import logging

import pytest
import torch

import minilora  # noqa: F401  (importing the package installs the filter)
from minilora.machine import KNOWN_HARMLESS, describe, describe_line, quiet_known_log_lines


@pytest.mark.parametrize("name, prefix", KNOWN_HARMLESS, ids=lambda v: v.split(".")[0][:12])
def test_each_known_line_is_dropped_and_nothing_else(name, prefix, caplog):
    logger = logging.getLogger(name)
    quiet_known_log_lines()  # a second call must not stack a second filter
    assert sum(1 for f in logger.filters if getattr(f, "prefix", None) == prefix) == 1
    logger.warning(prefix + ". Please make sure you already `pip install kernels`")
    logger.warning("a different warning from the same logger")
    logger.warning("Skipping publisher trust check for 'someone-else/another-kernel' because Hugging Face Hub is "
                   "in offline mode.")  # the same words about another repository must still be heard
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["a different warning from the same logger", messages[-1]] and "someone-else" in messages[-1]


def test_the_filters_match_what_the_installed_libraries_log():
    """The prefixes are the libraries' own words: read them from their sources, so that a reworded message in a
    new release fails here instead of reaching a notebook's stderr."""
    import inspect

    import kernels._internals.hf_hub
    import torch.utils.cpp_extension
    from bitsandbytes.backends.cpu import ops

    sources = {"bitsandbytes.backends.cpu.ops": inspect.getsource(ops),
               "kernels._internals.hf_hub": inspect.getsource(kernels._internals.hf_hub),
               "torch.utils.cpp_extension": inspect.getsource(torch.utils.cpp_extension)}
    for name, prefix in KNOWN_HARMLESS:
        head = prefix.split("'kernels-community")[0]  # the part before the formatted repository name
        assert head in sources[name], (name, head)


def test_describe_names_the_cpu_capability_and_versions():
    d = describe()
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert d["threads"] == torch.get_num_threads() and d["torch"] == torch.__version__
    line = describe_line()
    assert f"CPU {d['cpu_capability']}" in line and f"torch {torch.__version__}" in line
