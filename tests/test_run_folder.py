"""Runs that a careless or hostile user cannot turn against themselves (issue 26): --resume unpickles nothing,
a folder minilora did not write is never written into, one run per folder, a crash leaves nothing half-done,
every flag of --help reaches the run, bad input is a message, files follow the umask."""

import argparse
import dataclasses
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import minilora.build
import minilora.checkpoints as checkpoints
import minilora.train
from minilora.checkpoints import MARKER, list_checkpoints
from minilora.options import CHOICES, METHOD_OPTIONS, TrainConfig, make_config
from minilora.train import build_parser, main, train

# A few quick steps on the running example (a run here takes a second or two).
FAST = dict(model="tiny", method="lora", batch_size=4, grad_accum=1, train_samples=32, eval_samples=8, lr=2e-3,
            max_grad_norm=1.0, warmup_ratio=0.0, r=2, lora_alpha=4, eval_every=0, progress=False)


def run(folder, **options):
    return train({**FAST, "output_dir": str(folder), **options})


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file below `folder` (the marker included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# 1. --resume never unpickles
# ----------------------------------------------------------------------------------------------------


class Payload:
    """What a hostile training_state.pt holds: unpickling it calls exec, which writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",)


def test_resume_never_unpickles_a_planted_payload(tmp_path, monkeypatch):
    """checkpoints.py loaded training_state.pt with torch.load(weights_only=False): a checkpoint someone
    hands you ran any code it liked. The state is safetensors + JSON now; a pickle is refused, unread."""
    folder = tmp_path / "run"
    run(folder, max_steps=2, save_every=2)
    checkpoint = folder / "checkpoint-2"
    marker = tmp_path / "pwned"
    for name in ("training_state.json", "training_state.safetensors", "training_state.pt"):
        (checkpoint / name).unlink(missing_ok=True)
    torch.save({"step": Payload(marker)}, checkpoint / "training_state.pt")  # the old format, poisoned

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a user's file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"training_state.pt is a pickle.*does not read it"):
        run(folder, max_steps=4, save_every=2, resume=True)
    assert not marker.exists()


def test_a_tampered_training_state_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "run"
    run(folder, max_steps=2, save_every=2)
    (folder / "checkpoint-2" / "training_state.json").write_text('{"dict": [["step", {"object": "os.system"}]]}')
    with pytest.raises(ValueError, match=r"checkpoint-2/training_state.json: .*is not a stored value"):
        run(folder, max_steps=4, save_every=2, resume=True)


# ----------------------------------------------------------------------------------------------------
# 2. Only an empty folder, or minilora's own, is written into; only minilora's files are deleted
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_a_folder_with_someone_elses_files_is_never_written(tmp_path, flags):
    """A folder without checkpoints counted as empty: its config.json, loss.png and adapter/ were replaced."""
    folder = tmp_path / "mine"
    (folder / "adapter").mkdir(parents=True)
    (folder / "config.json").write_text('{"my": "experiment"}')
    (folder / "loss.png").write_bytes(b"my plot")
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"holds files minilora did not write .*'adapter', 'config.json'"):
        run(folder, max_steps=1, **flags)
    assert snapshot(folder) == before


def test_the_model_folder_is_never_the_run_folder(tmp_path):
    """`--model X --output-dir X` replaced the model's config.json, and the model no longer loaded."""
    from transformers import AutoModelForCausalLM

    from minilora.data import pretrained_tiny_llama

    model_dir = tmp_path / "model"
    pretrained_tiny_llama().save_pretrained(model_dir)
    before = snapshot(model_dir)
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(ValueError, match="is the --model folder"):
            train({**FAST, "data": "running-example"}, model=str(model_dir), output_dir=str(model_dir),
                  max_steps=1, **flags)
    assert snapshot(model_dir) == before
    AutoModelForCausalLM.from_pretrained(model_dir)  # still a model


def test_overwrite_and_rotation_delete_only_what_minilora_wrote(tmp_path):
    """Every checkpoint-<n>/ went, another tool's too (a Hugging Face Trainer writes checkpoint-<n>/)."""
    folder = tmp_path / "run"
    run(folder, max_steps=2, save_every=1)
    (folder / "checkpoint-500").mkdir()  # a Trainer checkpoint copied in, and a note of the user's
    (folder / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (folder / "notes.txt").write_text("lr sweep")
    theirs = snapshot(folder / "checkpoint-500")
    run(folder, max_steps=3, save_every=1, save_total_limit=1, overwrite=True)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-3"]
    assert snapshot(folder / "checkpoint-500") == theirs and (folder / "notes.txt").read_text() == "lr sweep"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MARKER, "adapter", "checkpoint-3", "checkpoint-500", "config.json", "loss.png", "metrics.csv", "notes.txt"])


def test_after_overwrite_nothing_of_the_old_run_survives_a_crash(tmp_path, monkeypatch):
    """A crash after --overwrite left the old r 8 adapter beside the new r 4 config, and it loaded."""
    folder = tmp_path / "run"
    run(folder, max_steps=2, save_every=1, r=8)
    assert (folder / "adapter").is_dir() and (folder / "checkpoint-2").is_dir()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the first step of the new run

    monkeypatch.setattr(minilora.train, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(folder, max_steps=2, save_every=1, r=4, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "config.json"]
    assert '"r": 4' in (folder / "config.json").read_text()


# ----------------------------------------------------------------------------------------------------
# 3. Every flag of --help reaches the run through main(); no abbreviations
# ----------------------------------------------------------------------------------------------------


def option_strings():
    actions = [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    return [(action.dest, option) for action in actions for option in action.option_strings]


def value_for(name: str, option: str):
    """(argv, expected value): a valid value other than the default, with the method that reads it."""
    default = getattr(TrainConfig(), name)
    method = next((methods[-1] for methods, names in METHOD_OPTIONS.items() if name in names), None)
    argv = ["--method", method] if method and name != "method" else []
    if isinstance(default, bool):
        return [*argv, option], not option.startswith("--no-")
    kind = next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name)
    if name in CHOICES:
        value = next(v for v in CHOICES[name] if v != default)
    elif kind == "float":
        value = default / 2 if default else 0.5
    elif kind == "int":
        value = default + 1
    else:
        value = {"model": "llama-7b", "data": "train.jsonl", "eval_data": "eval.jsonl", "target": "q_proj,v_proj",
                 "device": "cpu", "output_dir": "elsewhere"}[name]
    return [*argv, option, str(value)], value


class Stop(Exception):
    """Raised by a stand-in for `train`, after it has seen what main() hands it."""


@pytest.fixture
def seen(monkeypatch):
    """The checked TrainConfig of every main() call; nothing is trained."""
    configs = []

    def fake_train(args):
        configs.append(make_config(args))
        raise Stop

    monkeypatch.setattr(minilora.train, "train", fake_train)
    return configs


@pytest.mark.parametrize("name, option", option_strings())
def test_every_flag_in_help_reaches_the_run(name, option, seen):
    """`--r 4`, the first spelling --help shows, was read as `--recipe 4` (the pre-parser took abbreviations)."""
    argv, expected = value_for(name, option)
    with pytest.raises(Stop):
        main(argv)
    assert getattr(seen[0], name) == expected


@pytest.mark.parametrize("argv", [["--rec", "qlora-7b"], ["--lora", "4"], ["--over"]])
def test_abbreviations_are_refused(argv, seen, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not seen


# ----------------------------------------------------------------------------------------------------
# 5. One run per folder
# ----------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_gets_an_error(tmp_path):
    """Two runs into one folder both exited 0 with their results mixed."""
    folder = tmp_path / "run"
    run(folder, max_steps=1)
    before = snapshot(folder)
    with open(folder / MARKER) as lock:  # another process's run holds the lock (flock, as a run does)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=r"is in use by another minilora run"):
            run(folder, max_steps=1, overwrite=True)
    assert snapshot(folder) == before
    run(folder, max_steps=1, overwrite=True)  # the lock is gone with its holder
    with open(folder / MARKER) as lock:  # and a run releases its own when it ends
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ----------------------------------------------------------------------------------------------------
# 6. What a crash leaves is cleaned, and never counted
# ----------------------------------------------------------------------------------------------------


def test_startup_removes_what_killed_saves_left(tmp_path):
    """`.checkpoint-N.*.tmp` folders of killed saves stayed forever, and a half-deleted checkpoint counted."""
    folder = tmp_path / "run"
    run(folder, max_steps=2, save_every=1, save_total_limit=0)
    tmp = folder / ".checkpoint-3.k1ll3d.tmp"
    shutil.copytree(folder / "checkpoint-2", tmp)  # a save killed before its rename
    (folder / ".metrics.csv.x7.tmp").write_text("step,loss\n")
    (folder / ".minilora-trash-q9").mkdir()
    half = folder / "checkpoint-9"  # a checkpoint half deleted (by hand, or by an older minilora)
    shutil.copytree(folder / "checkpoint-2", half)
    (half / "trainable.safetensors").unlink()
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-1", "checkpoint-2"]
    resumed = run(folder, max_steps=3, save_every=1, save_total_limit=0, resume=True)
    assert len(resumed.losses) == 3
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".minilora-trash-*"))
    assert half.is_dir()  # not ours to delete: it is not a complete minilora checkpoint


def test_rotation_never_leaves_a_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    """A kill while rotation deleted checkpoint-1 left it half there, under its name, counted as complete."""
    folder = tmp_path / "run"
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
        victim.unlink()
        raise KeyboardInterrupt  # killed after deleting one file

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run(folder, max_steps=2, save_every=1, save_total_limit=1)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert not (folder / "checkpoint-1").exists()
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2"]
    run(folder, max_steps=3, save_every=1, save_total_limit=1, resume=True)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "checkpoint"))) == \
        [MARKER, "checkpoint-3"]


# ----------------------------------------------------------------------------------------------------
# 7. A rank that could never fit is refused before it is allocated
# ----------------------------------------------------------------------------------------------------


def test_a_huge_rank_is_refused_before_allocating(tmp_path, monkeypatch):
    """`--lora-r 1000000` warned, then the process was killed for memory."""
    def no_allocation(*args, **kwargs):
        raise AssertionError("the adapter was allocated")

    monkeypatch.setattr(minilora.build, "add_lora", no_allocation)
    with pytest.raises(ValueError, match=r"--r=1000000 is larger than max\(in_features, out_features\) = "
                                         r"max\(64, 64\) of model.layers.0.self_attn.q_proj"):
        run(tmp_path / "run", r=1_000_000, max_steps=1)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 8. Errors that are messages
# ----------------------------------------------------------------------------------------------------


def test_a_full_disk_is_said_in_words_naming_the_file(tmp_path, monkeypatch, capsys):
    """A full disk ended in torch's "unexpected pos 23872 vs 23764" and a traceback. safetensors says
    "No space left on device (os error 28)" in a SafetensorError (seen on a full 64 KiB tmpfs)."""
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    folder = tmp_path / "run"
    argv = ["--method", "lora", "--max-steps", "2", "--save-every", "1", "--save-total-limit", "0",
            "--train-samples", "32", "--eval-samples", "8", "--batch-size", "4", "--eval-every", "0",
            "--no-progress", "--output-dir", str(folder)]
    assert main(argv) == 0
    monkeypatch.setattr(checkpoints, "save_file", full)  # a checkpoint
    assert main([*argv, "--overwrite", "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert f"error: the disk is full: {folder / 'checkpoint-1'} could not be written" in err
    assert "Traceback" not in err and not list(folder.glob(".*.tmp")) and not list_checkpoints(folder)

    def full_os(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    assert main([*argv, "--overwrite"]) == 0
    saved = snapshot(folder / "checkpoint-2")
    monkeypatch.setattr(minilora.adapters, "save_file", full_os)  # the final adapter
    assert main([*argv, "--resume", "--max-steps", "3", "--save-every", "0"]) == 1
    assert f"the disk is full: {folder / 'adapter' / 'adapter_model.safetensors'}" in capsys.readouterr().err
    assert snapshot(folder / "checkpoint-2") == saved and not list((folder / "adapter").glob(".*.tmp"))


def test_a_corrupt_config_json_on_resume_is_named(tmp_path):
    folder = tmp_path / "run"
    run(folder, max_steps=1, save_every=1)
    (folder / "config.json").write_text('{"method": "lo')
    with pytest.raises(ValueError, match=r"--resume: the run's options cannot be read: .*config.json: not valid JSON"):
        run(folder, max_steps=2, save_every=1, resume=True)


@pytest.mark.parametrize("argv, match", [
    (["--method", "lora", "--quant-type", "fp4"],
     "--quant-type 'fp4': only --method qlora reads it, got --method lora"),
    (["--method", "qlora", "--tinit", "5"], "--tinit 5: only --method adalora reads it, got --method qlora"),
    (["--method", "full", "--r", "4"], "--r 4: only --method lora or qlora or adalora reads it, got --method full"),
])
def test_options_the_method_does_not_read_are_refused(tmp_path, argv, match, capsys):
    """`--method lora --quant-type fp4` exited 0 with "quant_type": "fp4" in config.json."""
    assert main([*argv, "--max-steps", "1", "--output-dir", str(tmp_path / "run")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 10. The umask decides the modes, as for peft's and Hugging Face's files
# ----------------------------------------------------------------------------------------------------


def test_run_files_follow_the_umask(tmp_path):
    """Run files were 0600 and checkpoint folders 0700 (mkstemp's and mkdtemp's modes)."""
    old = os.umask(0o022)
    try:
        run(tmp_path / "run", max_steps=1, save_every=1)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")}
    assert len(modes) > 10
    expected = {path: 0o755 if (tmp_path / path).is_dir() else 0o644 for path in modes}
    assert modes == expected
