"""What a run writes to disk, piece by piece: the tensors and states a checkpoint is made of, the folders that
hold checkpoints, the metrics file (one CSV row per optimizer step, read back bit for bit) and the loss plot.

    run_dir/config.json, metrics.csv, loss.png, checkpoint-<step>/ (trainable.safetensors, adapter/,
    training_state.pt)

minilora.train writes config.json and assembles the pieces into `save_checkpoint` / `load_checkpoint` (they
also need the adapter file format and the distributed job, which live on higher floors). Checkpoints and
metrics.csv are written atomically (a crash leaves the old file or the new one, never half of one).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minilora.files import write_atomically

# ----------------------------------------------------------------------------------------------------
# Checkpoint pieces: everything the next loss depends on
# ----------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (temporary folders of an interrupted save are ignored)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def allocator_state(allocator) -> dict:
    """AdaLoRA's allocator: importance EMAs, budget, phase and every layer's rank mask."""
    return {"exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "updates": allocator.updates, "budget": allocator.budget,
            "pattern_fixed": allocator.pattern_fixed, "last_step": allocator.last_step,
            "rank_masks": {name: layer.rank_mask.clone() for name, layer in allocator.layers.items()}}


def load_allocator_state(allocator, state: dict) -> None:
    for key in ("exp_avg_ipt", "exp_avg_unc", "updates", "budget", "pattern_fixed", "last_step"):
        setattr(allocator, key, state[key])
    for name, layer in allocator.layers.items():
        layer.rank_mask = state["rank_masks"][name].to(layer.rank_mask.device)
    allocator._snapshot = allocator._all_E()


# ----------------------------------------------------------------------------------------------------
# Metrics file and plot
# ----------------------------------------------------------------------------------------------------

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "eval_loss", "eval_accuracy", "elapsed_s")


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The whole CSV, rewritten atomically (floats as repr, so they read back bit for bit)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else repr(row[k])) for k in METRIC_FIELDS})

    write_atomically(path, write)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            rows.append({k: (None if row[k] == "" else (int(row[k]) if k == "step" else float(row[k])))
                         for k in METRIC_FIELDS})
        return rows


def plot_losses(path: Path, rows: list[dict], title: str) -> None:
    """loss.png: the training loss per step and the eval loss where it was measured."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", linewidth=1)
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["eval_loss"] is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
