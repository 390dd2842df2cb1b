"""The few checks every public function shares: an integer, a number in a range, one of a few choices.

Each raises ValueError naming the argument, the value and what is allowed, so that every module reports bad
input the same way and none writes the check again (`isinstance(True, int)` is True in Python, so a bare
`isinstance(x, int)` would let `r=True` through as rank 1):

    check_int("r", r, low=1)                       r must be an integer >= 1, got r=0
    check_number("lora_dropout", p, 0, 1, high_open=True)   ... a number in [0, 1), got ...
    check_choice("method", m, ("lora", "qlora"))  method must be one of ('lora', 'qlora'), got 'prefix'

`name` is what the caller calls the argument: "r" for the Python API, "--r" for the command line. A value is
checked where it enters: a config, a command line, a public constructor or method; minilora/core takes what
passed.
Read first: `check_number`.
"""

from __future__ import annotations

import math


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, low: int | None = None, why: str = "") -> None:
    """ValueError unless `value` is an integer (not a bool) and, if `low` is given, >= low."""
    if not is_int(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{name} must be an integer{bound}{why}, got {_shown(name, value)}")


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, why: str = "") -> None:
    """ValueError unless `value` is a finite number in the interval [low, high] (open ends as asked)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lower = "(-∞" if low is None else f"{'(' if low_open else '['}{low}"
        upper = "∞)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {lower}, {upper}{why}, got {_shown(name, value)}")


def check_bool(name: str, value) -> None:
    """ValueError unless `value` is True or False (not 0, 1 or "yes": a flag that is not a bool is a mistake)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_shown(name, value)}")


def check_choice(name: str, value, allowed) -> None:
    """ValueError unless `value` is one of `allowed`."""
    if value not in tuple(allowed):
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {_shown(name, value)}")


def _shown(name: str, value) -> str:
    # "got r=0" for an argument, "got 0" for a command-line flag (the flag is already named).
    return repr(value) if name.startswith("-") else f"{name}={value!r}"


def check_bypass_options(r, lora_alpha, lora_dropout) -> None:
    """Raise ValueError naming the argument and value for a rank, α or dropout no low-rank bypass (LoRA,
    AdaLoRA) can use."""
    check_int("r", r, 1, why=" (the rank of the update)")
    check_number("lora_alpha", lora_alpha, 0, low_open=True, why=" (it scales the bypass)")
    check_number("lora_dropout", lora_dropout, 0, 1, high_open=True, why=" (a probability)")
