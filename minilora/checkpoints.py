"""What a run writes to disk: the run folder, checkpoints, the metrics file and the loss plot.

    run_dir/.minilora-run       the marker: minilora wrote this folder (and the lock a running run holds)
            config.json         every option (a resumed run must agree with it)
            metrics.csv         one row per optimizer step, floats written to read back bit for bit
            loss.png            training and eval loss
            checkpoint-<step>/  trainable.safetensors (exact trainable weights), adapter/ (peft's format),
                                training_state.safetensors + .json (optimizer, scheduler, RNG states, data
                                position, allocator: tensors and JSON, nothing pickled)
            adapter/            the final adapter, written at the end of every run (LoRA, QLoRA, AdaLoRA)

A checkpoint holds everything that decides the next loss, so `--resume` continues with exactly the losses the
uninterrupted run would have had. What the folder guarantees (the README's "What a run guarantees"):

- minilora writes only into an empty folder or one carrying its marker, and replaces (--overwrite) or
  rotates away (--save-total-limit) only what it wrote itself; another tool's files, a model's config.json,
  a Hugging Face Trainer's checkpoint-<n>/ are never touched;
- one run at a time: a run holds a lock (flock on the marker) until it ends, and a second gets an error;
- every file is written atomically, every checkpoint as a temporary folder renamed into place; deleting is
  renaming into a hidden trash folder first, so nothing is ever seen half-written or half-deleted under its
  own name, and the next start removes what a crash left (temporary folders, trash);
- --overwrite removes the old run before it writes anything of the new one.

Reading order: the run folder (`check_run_dir`, `start_run_dir` and their helpers), the checkpoint pieces,
`save_checkpoint` / `load_checkpoint`, the metrics file and the plot.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from minilora.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from minilora.adapters import save_adapter
from minilora.files import (
    DiskFullError,
    load_state,
    read_json,
    read_tensors,
    save_state,
    temporary_folder,
    write_atomically,
)
from minilora.options import RESUMABLE_CHANGES

CHECKPOINT_PREFIX = "checkpoint-"
MARKER = ".minilora-run"
MARKER_TEXT = ("This is a minilora run folder. minilora may replace or delete what it wrote here (config.json, "
               "metrics.csv, loss.png, adapter/, checkpoint-<step>/) and nothing else.\n")
OWN_FILES = ("config.json", "metrics.csv", "loss.png", "adapter")
CHECKPOINT_FILES = ("trainable.safetensors", "training_state.safetensors", "training_state.json")
# What an interrupted save or delete leaves: write_atomically's ".<name>.*.tmp", save_checkpoint's
# ".checkpoint-<step>.*.tmp", discard's ".minilora-trash-*" (in the run folder, or in its adapter/).
LEFTOVERS = (".checkpoint-*.tmp", ".minilora-trash-*", *(f".{name}.*.tmp" for name in OWN_FILES))
ADAPTER_LEFTOVERS = (f".{CONFIG_NAME}.*.tmp", f".{WEIGHTS_NAME}.*.tmp")

# ----------------------------------------------------------------------------------------------------
# The run folder: checked before anything is created, then locked for the run
# ----------------------------------------------------------------------------------------------------


def check_run_dir(config) -> None:
    """ValueError if `config` (a minilora.options.TrainConfig) cannot start or resume in its output_dir.

    Reads only: a failed check leaves no folder and no file behind."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--output-dir {run_dir} is a file, not a folder")
    if Path(config.model).is_dir() and run_dir.is_dir() and run_dir.samefile(config.model):
        raise ValueError(f"--output-dir {run_dir} is the --model folder: the run's config.json would replace "
                         f"the model's; choose another --output-dir")
    check_ours(run_dir)
    if config.resume:
        check_resumable(config, run_dir)
    elif previous_run(run_dir) and not config.overwrite:
        raise ValueError(f"--output-dir {run_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to start again")


def check_ours(run_dir: Path) -> None:
    """ValueError unless run_dir is missing, empty, or carries minilora's marker."""
    present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if present and not (run_dir / MARKER).is_file():
        raise ValueError(f"--output-dir {run_dir} holds files minilora did not write (e.g. {present[:5]}); "
                         f"minilora only uses an empty folder or a run folder of its own (marked by {MARKER}), "
                         f"so that it never replaces anyone's files: choose another --output-dir (a run folder "
                         f"written by a minilora older than this rule has no marker: if it is yours, delete it)")


def check_resumable(config, run_dir: Path) -> None:
    if not list_checkpoints(run_dir):
        pickled = sorted(p.parent.name for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*/training_state.pt"))
        if pickled:
            raise ValueError(f"--resume: {run_dir / pickled[-1]} was written by an older minilora: its "
                             f"training_state.pt is a pickle, and unpickling a file can run any code in it, so "
                             f"minilora does not read it; start the run again (--overwrite)")
        raise ValueError(f"--resume: no complete {CHECKPOINT_PREFIX}<step> folder in {run_dir} to resume from")
    try:
        old = read_json(run_dir / "config.json")
    except FileNotFoundError:
        raise ValueError(f"--resume: {run_dir / 'config.json'} is missing; the run's options are not known") from None
    except ValueError as err:
        raise ValueError(f"--resume: the run's options cannot be read: {err}") from None
    if not isinstance(old, dict):
        raise ValueError(f"--resume: {run_dir / 'config.json'} holds no options (a JSON object), got "
                         f"{type(old).__name__}")
    changed = {k for k, v in dataclasses.asdict(config).items() if old.get(k) != v} - RESUMABLE_CHANGES
    if changed:
        raise ValueError(f"--resume: options {sorted(changed)} differ from the run in {run_dir} "
                         f"(was {({k: old.get(k) for k in sorted(changed)})}); a resumed run must use the same")


def previous_run(run_dir: Path) -> list[Path]:
    """What a run wrote into `run_dir`, in the order `discard` removes it (checkpoints first, config last)."""
    own = [run_dir / name for name in reversed(OWN_FILES) if (run_dir / name).exists()]
    return list_checkpoints(run_dir) + own


class RunFolder:
    """A run folder locked for one run (`close()` or leaving a `with` block releases it)."""

    def __init__(self, path: Path, lock: int):
        self.path, self.lock = path, lock

    def close(self) -> None:
        if self.lock >= 0:
            os.close(self.lock)  # closing the descriptor drops the flock; so does the process dying
            self.lock = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_run_dir(config) -> RunFolder:
    """Lock the run folder (creating it and its marker if it is new), remove what a crash left, clear the
    old run (--overwrite), write config.json. The lock is held until the returned RunFolder is closed."""
    run_dir = Path(config.output_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        folder = RunFolder(run_dir, lock_run_dir(run_dir))
    except BaseException:
        if created:  # leave no empty folder behind; rmdir removes nothing another run has put there
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    try:
        check_run_dir(config)  # again, under the lock: another run may have finished here meanwhile
        remove_leftovers(run_dir)
        if not config.resume:
            discard(run_dir, previous_run(run_dir))  # all of the old run goes before anything new is written
        text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
        write_atomically(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        folder.close()
        raise
    return folder


def lock_run_dir(run_dir: Path) -> int:
    """An open descriptor of run_dir's marker, locked (flock) for this process; creates the marker in an
    empty folder. ValueError if another run holds the lock."""
    check_ours(run_dir)  # claim only an empty folder (checked again: a file may have appeared since)
    marker = run_dir / MARKER
    fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_size == 0:
            os.write(fd, MARKER_TEXT.encode())
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"--output-dir {run_dir} is in use by another minilora run (it holds the lock on "
                         f"{marker}); wait for it to end, or choose another --output-dir") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(run_dir: Path) -> None:
    """Delete what an interrupted save or delete left in a run folder we hold (see LEFTOVERS)."""
    found = [p for pattern in LEFTOVERS for p in run_dir.glob(pattern)]
    found += [p for pattern in ADAPTER_LEFTOVERS for p in (run_dir / "adapter").glob(pattern)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def discard(run_dir: Path, paths: list[Path]) -> None:
    """Delete `paths` (entries of run_dir) so that none is ever seen half-deleted under its own name: each is
    first renamed into a hidden trash folder (a rename is atomic), then the trash is deleted. A crash leaves
    only the trash, which the next start in this folder removes."""
    if not paths:
        return
    trash = temporary_folder(run_dir, ".minilora-trash-", "")
    for path in paths:
        os.rename(path, trash / path.name)
    shutil.rmtree(trash)


# ----------------------------------------------------------------------------------------------------
# Checkpoint pieces: everything the next loss depends on
# ----------------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete minilora checkpoints in step order: folders checkpoint-<step> holding every file a save
    writes (temporary folders of an interrupted save, a half-deleted folder and another tool's
    checkpoint-<n> do not count, and are never resumed from nor deleted)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and not p.is_symlink()
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every random stream the next step draws from: torch's (and CUDA's), Python's, NumPy's."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # 624 uint32 words, JSON as ints
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, adapter, optimizer_state: dict, scheduler,
                    batches, allocator, keep: int) -> Path:
    """run_dir/checkpoint-<step>/: trainable.safetensors, adapter/ (for LoRA, QLoRA and AdaLoRA; `adapter` is
    their LoraConfig / AdaLoraConfig, None for full fine-tuning), training_state.safetensors + .json; keeps
    the `keep` newest (0: all). `optimizer_state` is optimizer.state_dict(), or what a distributed run
    gathered from all ranks.

    Written into a temporary folder and renamed into place, so a crash leaves either the complete checkpoint
    or none: `--resume` never finds half of one. Older checkpoints go through `discard`.
    """
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists() and final not in list_checkpoints(run_dir):
        raise ValueError(f"{final} exists and is not a checkpoint minilora wrote; it is left alone, so this "
                         f"run cannot save step {step} there")
    tmp = temporary_folder(run_dir, f".{final.name}.", ".tmp")
    try:
        write_atomically(tmp / "trainable.safetensors", lambda path: save_file(trainable_state(model), path))
        if adapter is not None:
            save_adapter(model, tmp / "adapter", adapter)
        save_state(tmp, "training_state", {
            "step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "data_position": batches.position,
            "allocator": None if allocator is None else allocator.state_dict()})
        discard(run_dir, [final] if final.exists() else [])
        os.replace(tmp, final)
    except DiskFullError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(final) from err  # the checkpoint's own name, not its temporary folder's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        discard(run_dir, list_checkpoints(run_dir)[:-keep])
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, allocator, job, opt_params) -> dict:
    """Restore a checkpoint into the run; returns its training state (step, data position, RNG states).

    `job` (a minilora.distributed.Distributed) puts each rank's share of sharded (FSDP) tensors in place,
    `opt_params` being the tensors the optimizer updates. Nothing is unpickled: safetensors and JSON."""
    saved = read_tensors(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        raise ValueError(f"{folder}: the checkpoint's trainable tensors do not match this model "
                         f"(missing {sorted(expected - set(saved))[:5]}, "
                         f"unexpected {sorted(set(saved) - expected)[:5]})")
    state = load_state(folder, "training_state")
    try:
        with torch.no_grad():
            for name, tensor in saved.items():
                job.copy_into_parameter(params[name], tensor)
        job.load_optimizer_state(optimizer, state["optimizer"], opt_params)
        scheduler.load_state_dict(state["scheduler"])
        if allocator is not None:
            allocator.load_state_dict(state["allocator"])
        step, position = state["step"], state["data_position"]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"{folder}: the training state does not fit this run ({type(err).__name__}: "
                         f"{str(err)[:200]})") from err
    if not (isinstance(step, int) and isinstance(position, int) and step >= 0 and position >= 0):
        raise ValueError(f"{folder / 'training_state.json'}: step and data position must be integers >= 0")
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
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
