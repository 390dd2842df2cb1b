"""Measuring on a real model the bytes the memory model predicts: saved activations and held state.

Each function counts tensors' bytes (`nbytes`, deduplicated by storage), never process RSS, so the counts are
exact and the same on every machine. `minilora.memory` predicts the same quantities from the architecture;
the tests compare the two byte for byte on the tiny model.
"""

from __future__ import annotations

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
