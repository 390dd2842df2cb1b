"""minilora.distributed: the training loop under torchrun (2 gloo processes on CPU) matches one process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minilora import distributed
from minilora.train import train

ROOT = Path(__file__).resolve().parent.parent

# One optimizer step = grad_accum micro-batches of batch_size: the same global batch in 1 or 2 processes.
# lora_dropout 0: dropout masks come from each process's own random stream, so with dropout the two runs would
# draw different masks (equally valid, not equal).
OPTIONS = dict(model="tiny", method="qlora", batch_size=4, grad_accum=2, train_samples=32, eval_samples=16,
               r=4, lora_alpha=8, lora_dropout=0.0, lr=3e-3, warmup_ratio=0.0, max_grad_norm=1.0, max_steps=3,
               eval_every=0, save_every=0, progress=False)

WORKER = textwrap.dedent("""
    import json, shutil, sys
    import torch.distributed as dist
    from minilora.train import train

    options, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = train(options, distributed="ddp", output_dir=out + "/ddp")
    fsdp = train(options, distributed="fsdp", output_dir=out + "/fsdp", save_every=2)
    if rank == 0:  # an FSDP run interrupted after step 2, resumed under FSDP
        shutil.copytree(out + "/fsdp", out + "/fsdp_resumed")
        shutil.rmtree(out + "/fsdp_resumed/checkpoint-3")
    dist.barrier()
    resumed = train(options, distributed="fsdp", output_dir=out + "/fsdp_resumed", save_every=2, resume=True)
    if rank == 0:
        result = {name: {"losses": r.losses, "final_eval": r.final_eval, "trainable": r.trainable_params}
                  for name, r in (("ddp", ddp), ("fsdp", fsdp), ("fsdp_resumed", resumed))}
        open(out + "/result.json", "w").write(json.dumps(result))
    dist.destroy_process_group()
""")


def test_check_options():
    distributed.check_options("ddp", "adalora", grad_accum=4, world_size=2)  # fine
    with pytest.raises(ValueError, match="--grad-accum=3 must be divisible by the number of processes"):
        distributed.check_options("ddp", "qlora", grad_accum=3, world_size=2)
    with pytest.raises(ValueError, match="--distributed fsdp .* needs --method lora or qlora, got --method full"):
        distributed.check_options("fsdp", "full", grad_accum=2, world_size=2)


def test_modes_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.resolve_mode("auto") == "none"
    with pytest.raises(ValueError, match="--distributed fsdp needs the process to be started by torchrun"):
        distributed.resolve_mode("fsdp")
    with pytest.raises(ValueError, match="--distributed must be one of"):
        distributed.resolve_mode("deepspeed")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert distributed.resolve_mode("auto") == "ddp"


def test_rows_of_a_shard_follow_torch_chunk():
    import torch

    full = torch.arange(5 * 3).reshape(5, 3)
    pieces = [distributed.Distributed(rank=r, world_size=2).my_rows(full, rows) for r, rows in ((0, 3), (1, 2))]
    assert [p.tolist() for p in pieces] == [c.tolist() for c in torch.chunk(full, 2)]


def test_ddp_and_fsdp_with_two_processes_match_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # torchrun (torch.distributed.run): --standalone picks a free port on this machine.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), json.dumps(OPTIONS), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())

    single = train(OPTIONS, distributed="none", output_dir=str(tmp_path / "single"))
    assert single.losses[-1] < single.losses[0]  # it trains
    for name in ("ddp", "fsdp", "fsdp_resumed"):
        assert result[name]["trainable"] == single.trainable_params
        assert result[name]["losses"] == pytest.approx(single.losses, rel=1e-5), name
        assert result[name]["final_eval"]["loss"] == pytest.approx(single.final_eval["loss"], rel=1e-5), name

    # Rank 0 wrote the single-process format: a plain run (no torchrun) resumes the FSDP run's checkpoint.
    folder = tmp_path / "fsdp_to_single"
    (tmp_path / "fsdp").rename(folder)
    shutil.rmtree(folder / "checkpoint-3")
    resumed = train(OPTIONS, distributed="none", output_dir=str(folder), save_every=2, resume=True)
    assert resumed.losses == pytest.approx(single.losses, rel=1e-5)
    assert (folder / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
