"""Exercise: switch between adapters on one model (Chapter 1, "Several adapters on one model").

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_01_switching.py        # against this file

until everything passes. The book's solution is minilora/switching.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: active_adapter, set_adapter and disable_adapter.
Given (from minilora, not part of the exercise): the layers. A LoRALinear holds its active adapter in
lora_A, lora_B, scaling, ... under `layer.adapter_name`, the others in `layer.parked`;
`layer.adapter_names()` lists them all, `layer.switch_to(name)` swaps one in, and `layer.disabled = True`
makes the layer compute its base alone. `lora_layers(model)` finds the layers, `mark_only_lora_trainable(model)`
sets requires_grad from the layers' state.
"""

from contextlib import contextmanager  # noqa: F401  (disable_adapter is a context manager)

from torch import nn

from minilora.lora import lora_layers, mark_only_lora_trainable  # noqa: F401


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model computes with (the name held by the layers that are not disabled), or None."""
    raise NotImplementedError(
        "hint: collect layer.adapter_name over the layers that are not disabled; one name, or none")


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make `name` active on every layer that has it; a layer without it computes only its base; only
    `name` trains afterwards. An unknown name is a ValueError that names it. Returns `model`."""
    raise NotImplementedError(
        "hint: check the name exists on some layer; per layer switch_to(name) if it has it, and set "
        "disabled to whether it lacks it; then mark_only_lora_trainable(model)")


def disable_adapter(model: nn.Module):
    """`with disable_adapter(model):` the base model alone; on exit, even after an error, every layer is as
    it was. (Decorate it with @contextmanager and yield inside try/finally.)"""
    raise NotImplementedError(
        "hint: remember each layer's disabled flag, set all to True, yield, and restore them in finally")
