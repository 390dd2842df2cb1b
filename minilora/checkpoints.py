"""What a run writes to disk: the run folder, checkpoints, the metrics file and the loss plot.

    run_dir/config.json         every option (a resumed run must agree with it)
            metrics.csv         one row per optimizer step, floats written to read back bit for bit
            loss.png            training and eval loss
            checkpoint-<step>/  trainable.safetensors (exact trainable weights), adapter/ (peft's format),
                                training_state.pt (optimizer, scheduler, RNG states, data position, allocator)
            adapter/            the final adapter, written at the end of every run (LoRA, QLoRA, AdaLoRA)

A checkpoint holds everything that decides the next loss, so `--resume` continues with exactly the losses the
uninterrupted run would have had. Checkpoints and metrics.csv are written atomically (a crash leaves the old
file or the new one, never half of one), and `check_run_dir` refuses a bad folder before anything is created.

Reading order: the run folder (`check_run_dir`, `start_run_dir`), the checkpoint pieces, `save_checkpoint` /
`load_checkpoint`, the metrics file and the plot.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.adapters import save_adapter
from minilora.files import write_atomically
from minilora.options import RESUMABLE_CHANGES

CHECKPOINT_PREFIX = "checkpoint-"

# ----------------------------------------------------------------------------------------------------
# The run folder: checked before anything is created
# ----------------------------------------------------------------------------------------------------


def check_run_dir(config) -> None:
    """ValueError if `config` (a minilora.options.TrainConfig) cannot start or resume in its output_dir.

    Reads only: a failed check leaves no folder and no file behind."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--output-dir {run_dir} is a file, not a folder")
    if config.resume:
        if not list_checkpoints(run_dir):
            raise ValueError(f"--resume: no {CHECKPOINT_PREFIX}<step> folder in {run_dir} to resume from")
        old = json.loads((run_dir / "config.json").read_text())
        changed = {k for k, v in dataclasses.asdict(config).items() if old.get(k) != v} - RESUMABLE_CHANGES
        if changed:
            raise ValueError(f"--resume: options {sorted(changed)} differ from the run in {run_dir} "
                             f"(was {({k: old.get(k) for k in sorted(changed)})}); "
                             f"a resumed run must use the same")
    elif (list_checkpoints(run_dir) or (run_dir / "metrics.csv").exists()) and not config.overwrite:
        raise ValueError(f"--output-dir {run_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to start again")


def start_run_dir(config) -> Path:
    """Create the run folder (or clear the old run with --overwrite) and write config.json."""
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        for old in list_checkpoints(run_dir):
            shutil.rmtree(old)
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    write_atomically(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
    return run_dir


# ----------------------------------------------------------------------------------------------------
# Checkpoint pieces: everything the next loss depends on
# ----------------------------------------------------------------------------------------------------


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


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, adapter, optimizer_state: dict, scheduler,
                    batches, allocator, keep: int) -> Path:
    """run_dir/checkpoint-<step>/: trainable.safetensors, adapter/ (for LoRA, QLoRA and AdaLoRA; `adapter` is
    their LoraConfig / AdaLoraConfig, None for full fine-tuning), training_state.pt; keeps the `keep` newest
    (0: all). `optimizer_state` is optimizer.state_dict(), or what a distributed run gathered from all ranks.

    Written into a temporary folder and renamed into place, so a crash leaves either the complete checkpoint
    or none: `--resume` never finds half of one.
    """
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if adapter is not None:
            save_adapter(model, tmp / "adapter", adapter)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "data_position": batches.position,
                    "allocator": None if allocator is None else allocator.state_dict()},
                   tmp / "training_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, allocator, job, opt_params) -> dict:
    """Restore a checkpoint into the run; returns its training state (step, data position, RNG states).

    `job` (a minilora.distributed.Distributed) puts each rank's share of sharded (FSDP) tensors in place,
    `opt_params` being the tensors the optimizer updates."""
    saved = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        raise ValueError(f"{folder}: the checkpoint's trainable tensors do not match this model "
                         f"(missing {sorted(expected - set(saved))[:5]}, "
                         f"unexpected {sorted(set(saved) - expected)[:5]})")
    with torch.no_grad():
        for name, tensor in saved.items():
            job.copy_into_parameter(params[name], tensor)
    state = torch.load(folder / "training_state.pt", weights_only=False)
    job.load_optimizer_state(optimizer, state["optimizer"], opt_params)
    scheduler.load_state_dict(state["scheduler"])
    if allocator is not None:
        allocator.load_state_dict(state["allocator"])
    return state


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
