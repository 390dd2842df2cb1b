"""scripts/: the GPU check and the 7B QLoRA script, exercised by their CPU dry runs on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import qlora_7b  # noqa: E402

from minilora import memory  # noqa: E402


def test_gpu_check_dry_run(tmp_path):
    """The whole GPU check on CPU: bitsandbytes agreement, then both stacks on the tiny model, one process."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| PASS |") == 8 and "FAIL" not in summary
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["stack"], r["seq_len"]) for r in results] == [("minilora", 16), ("peft", 16)]
    ours, peft = results
    # The same random weights, quantized to the same NF4 bytes, LoRA B = 0: the first loss is the same model's.
    assert ours["losses"][0] == pytest.approx(peft["losses"][0], abs=1e-4)
    assert ours["trainable"] == peft["trainable"] == 8192  # r=4 on 7 linears × 2 layers: 4·(in+out) each
    assert ours["flops_per_token"] == 4 * ours["parameters"]
    assert "| minilora | 16 | 1 × 2 |" in summary and "| peft | 16 | 1 × 2 |" in summary


def test_gpu_check_rejects_unknown_options():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--config", "llama-7b"], "add --random-init"),
    (["--config", "tiny-llama", "--random-init", "--model", "x"], "exactly one of --model"),
    (["--model", "no/such/folder"], "no such folder"),
    (["--config", "gpt-5", "--random-init", "--device", "cpu"], "--config must be one of"),
    (["--config", "tiny-llama", "--random-init", "--steps", "0"], "--steps must be >= 1"),
])
def test_qlora_7b_bad_arguments(argv, message, capsys):
    assert qlora_7b.main(argv) == 2
    assert message in capsys.readouterr().err


def test_qlora_7b_reports_cpu_peaks_beside_the_prediction(tmp_path, capsys):
    """On a CPU the script measures the process (resident and anonymous) over setup and training."""
    assert qlora_7b.main(["--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["peak_kind"] == "resident (process)" and row["setup_seconds"] > 0
    # The process holds at least the interpreter and torch (well over 50 MiB) and, on a CPU, resident memory
    # includes the anonymous part.
    assert row["peak_bytes"] >= row["peak_anonymous_bytes"] > 50 * 2**20
    assert 0 < row["predicted_bytes"] < row["peak_bytes"]  # a 93k-parameter model: the runtime dominates
    assert f"| {qlora_7b._gib(row['peak_anonymous_bytes'])} |" in capsys.readouterr().out


def test_markdown_table_and_predictions():
    from minilora.model_builder import preset_config

    config = preset_config("llama-7b")
    recipe = qlora_7b.make_config(recipe="qlora-7b")
    gpu = torch.device("cuda")
    ours = qlora_7b.predicted_bytes(config, recipe, 512, "minilora", torch.bfloat16, gpu)
    peft = qlora_7b.predicted_bytes(config, recipe, 512, "peft", torch.bfloat16, gpu)
    # peft's prepare_model_for_kbit_training casts every weight that is not 4-bit (embeddings, head, norms) to
    # fp32: 2 extra bytes for each of them.
    counts = memory.parameter_counts(config)
    assert peft - ours == 2 * (counts["total"] - counts["linear"]) > 2 * 2 * 32000 * 4096
    # On a CPU in fp32 ours keeps those weights in fp32 too, like peft.
    cpu_ours = qlora_7b.predicted_bytes(config, recipe, 512, "minilora", torch.float32, torch.device("cpu"))
    assert cpu_ours == qlora_7b.predicted_bytes(config, recipe, 512, "peft", torch.float32, torch.device("cpu"))
    row = dict(stack="minilora", seq_len=512, batch_size=1, grad_accum=16, setup_seconds=12.34,
               peak_bytes=6 * 2**30, peak_anonymous_bytes=None, predicted_bytes=ours, timed_seconds=4.0,
               losses=[2.6, 2.5], warmup=1, tokens_per_s=1234.5, mfu=0.25, hfu=0.375)
    table = qlora_7b.markdown_table([row])
    assert "| minilora | 512 | 1 × 16 | 12.3 | 6.00 | - |" in table
    assert "| 4.00 | 1,234.5 | 25.0 % | 37.5 % | 2.5000 |" in table
