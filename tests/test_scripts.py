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
from minilora.qlora import Linear4bit  # noqa: E402


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
    (["--config", "tiny", "--random-init", "--model", "x"], "exactly one of --model"),
    (["--model", "no/such/folder"], "no config.json"),
    (["--config", "gpt-5", "--random-init", "--device", "cpu"], "--config must be 'tiny' or one of"),
    (["--config", "tiny", "--random-init", "--steps", "0"], "--steps must be >= 1"),
])
def test_qlora_7b_bad_arguments(argv, message, capsys):
    assert qlora_7b.main(argv) == 2
    assert message in capsys.readouterr().err


def test_random_model_is_built_layer_by_layer_and_deterministic():
    config = qlora_7b.model_config("tiny", seq_len=16)
    quantize = qlora_7b.minilora_quantizer(torch.float32)
    built = [qlora_7b.build_random_model(config, torch.device("cpu"), torch.float32, quantize, seed=3)
             for _ in range(2)]
    first, second = (dict(m.state_dict()) for m in built)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    layers = [m for m in built[0].modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * config.num_hidden_layers  # q k v o gate up down; the head stays 16-bit
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(built[0](input_ids=ids, labels=ids).loss)


def test_markdown_table_and_predictions():
    config = qlora_7b.model_config("llama-7b", seq_len=512)
    recipe = qlora_7b.make_config(recipe="qlora-7b")
    ours = qlora_7b.predicted_bytes(config, recipe, 512, "minilora")
    peft = qlora_7b.predicted_bytes(config, recipe, 512, "peft")
    # peft's prepare_model_for_kbit_training casts every weight that is not 4-bit (embeddings, head, norms) to
    # fp32: 2 extra bytes for each of them.
    counts = memory.parameter_counts(config)
    assert peft - ours == 2 * (counts["total"] - counts["linear"]) > 2 * 2 * 32000 * 4096
    row = dict(stack="minilora", seq_len=512, batch_size=1, grad_accum=16, peak_bytes=6 * 2**30,
               predicted_bytes=ours, tokens_per_s=1234.5, mfu=0.25, hfu=0.375, losses=[2.5])
    table = qlora_7b.markdown_table([row])
    assert "| minilora | 512 | 1 × 16 | 6.00 |" in table and "| 1,234 | 25.0 % | 37.5 % | 2.5000 |" in table
