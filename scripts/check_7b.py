"""The real-scale check CI runs (`make test-7b`): one QLoRA step of a 7B Llama through the command line, on a
CPU, in a Colab-class memory budget, its peak memory checked against the memory model.

    python scripts/check_7b.py                      # about 5 minutes on 2 CPU cores, 8.3 GiB of memory
    python scripts/check_7b.py --wrap "../shared/tools/with-memory-limit 11G"   # under a memory cgroup too

It writes a JSONL file of 8 examples (each cut at 64 tokens) and runs, in a fresh process, what a user types:

    python -m minilora.train --recipe qlora-7b --model llama-7b --random-init --data <JSONL> --device cpu \\
        --max-steps 1 --grad-accum 1 --batch-size 1 --max-seq-len 64 --save-every 0 --threads <cores>

(a preset's JSONL is read as UTF-8 bytes, minilora.instructions.ByteTokenizer). Then it checks

1. the run ends (exit 0) with a finite loss;
2. its adapter is the recipe's, in peft's format: adapter_config.json says r 64, lora_alpha 16, "all-linear";
   adapter_model.safetensors holds exactly lora_A (64 x d_in) and lora_B (d_out x 64) in fp32 for each of the
   7 x 32 block linears (448 tensors, shapes from minilora.architecture.linear_shapes), nothing for lm_head;
3. its memory: peak resident <= 11 GiB (a Colab host has 12.7 GB = 11.8 GiB, part of it the system's), and peak
   anonymous memory in [P, P + margin], P the memory model's prediction for this run (scripts/qlora_7b.py's
   `predicted_bytes`: minilora.memory.estimate on a CPU in fp32) and the margin derived, term by term, in
   qlora_7b.overhead_terms (runtime, decode buffers, whole pages, the allocator, saving).

Exit status 0 when every check passes, 1 otherwise; the report names each check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import qlora_7b  # noqa: E402  (scripts/, this script's folder)

from minilora.architecture import LINEAR_NAMES, linear_shapes  # noqa: E402
from minilora.checkpoint_files import read_header  # noqa: E402
from minilora.model_builder import preset_config  # noqa: E402
from minilora.options import make_config  # noqa: E402

PRESET, R, ALPHA, SEQ_LEN, CAP_GIB = "llama-7b", 64, 16, 64, 11
GiB = 2**30
# Each example is longer than SEQ_LEN byte tokens, so every one is cut there: the batch is exactly 1 x 64, the
# prompt's 34 tokens (<s> and 33 bytes) unscored, the response's first 30 scored.
EXAMPLES = [{"prompt": f"Say it in French, example {i}: hello\n",
             "response": f"Bonjour à vous tous, et merci, exemple {i}."} for i in range(8)]


def command(data: Path, output_dir: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "minilora.train", "--recipe", "qlora-7b", "--model", PRESET, "--random-init",
            "--data", str(data), "--device", "cpu", "--max-steps", "1", "--grad-accum", "1", "--batch-size", "1",
            "--max-seq-len", str(SEQ_LEN), "--save-every", "0", "--threads", str(threads), "--output-dir",
            str(output_dir), "--no-progress"]


def recipe():
    return make_config(recipe="qlora-7b", batch_size=1, grad_accum=1, max_seq_len=SEQ_LEN)


def check_adapter(folder: Path) -> list[str]:
    """The adapter's problems (none: []): settings, and exactly the expected tensors with their shapes."""
    problems = []
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, expected in (("r", R), ("lora_alpha", ALPHA), ("target_modules", "all-linear"), ("peft_type", "LORA")):
        if config.get(key) != expected:
            problems.append(f"adapter_config.json: {key} is {config.get(key)!r}, expected {expected!r}")
    expected = {}
    for layer in range(32):
        for name, (d_out, d_in) in linear_shapes(PRESET).items():
            kind = "self_attn" if name in LINEAR_NAMES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{name}"
            expected[f"{prefix}.lora_A.weight"] = (R, d_in)
            expected[f"{prefix}.lora_B.weight"] = (d_out, R)
    found = read_header(folder / "adapter_model.safetensors")
    if set(found) != set(expected):
        problems.append(f"adapter_model.safetensors: {len(found)} tensors, expected {len(expected)}; "
                        f"unexpected {sorted(set(found) - set(expected))[:3]}, "
                        f"missing {sorted(set(expected) - set(found))[:3]}")
    problems += [f"adapter_model.safetensors: {name} is {entry.dtype} {list(entry.shape)}, expected F32 "
                 f"{list(expected[name])}" for name, entry in found.items()
                 if name in expected and (entry.shape != expected[name] or entry.dtype != "F32")]
    return problems


def parse(stdout: str) -> dict:
    """The loss and the peaks the command line prints."""
    loss = re.search(r"final train loss: (\S+)", stdout)
    peak = re.search(r"peak memory: ([\d.]+) MiB resident, ([\d.]+) MiB anonymous", stdout)
    if not (loss and peak):
        return {}
    return {"loss": float(loss.group(1)), "resident": float(peak.group(1)) * 2**20,
            "anonymous": float(peak.group(2)) * 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wrap", default="", help="a command to run the CLI under, e.g. a memory cgroup tool")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check_7b-") as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in EXAMPLES))
        cmd = shlex.split(args.wrap) + command(data, Path(tmp) / "run", args.threads)
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        print(done.stdout[-2000:], done.stderr[-3000:] if done.returncode else "", sep="\n")
        result = parse(done.stdout)
        problems = [] if done.returncode == 0 and result else [f"the run failed (exit {done.returncode})"]
        if not problems:
            problems += check_adapter(Path(tmp) / "run" / "adapter")
    if problems:
        print("\n".join(f"FAIL {p}" for p in problems))
        return 1
    return report(result, seconds)


def report(result: dict, seconds: float) -> int:
    """Print the memory checks beside the prediction; 0 if they pass."""
    config, cpu = preset_config(PRESET), torch.device("cpu")
    prediction = qlora_7b.predicted_bytes(config, recipe(), SEQ_LEN, "minilora", torch.float32, cpu)
    terms = qlora_7b.overhead_terms(config, recipe(), torch.float32, qlora_7b.runtime_anonymous_bytes())
    margin = sum(terms.values())
    checks = {
        "the loss is finite": math.isfinite(result["loss"]),
        f"peak resident {result['resident'] / GiB:.2f} GiB <= {CAP_GIB} GiB": result["resident"] <= CAP_GIB * GiB,
        f"peak anonymous {result['anonymous'] / GiB:.2f} GiB >= the memory model's {prediction / GiB:.2f} GiB":
            result["anonymous"] >= prediction,
        f"peak anonymous {result['anonymous'] / GiB:.2f} GiB <= {prediction / GiB:.2f} + margin "
        f"{margin / GiB:.2f} GiB ({', '.join(f'{k} {v / GiB:.2f}' for k, v in terms.items())})":
            result["anonymous"] <= prediction + margin,
    }
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    print(f"PASS the adapter: r {R}, alpha {ALPHA}, lora_A/lora_B of the 224 block linears, fp32\n"
          f"one QLoRA step of {PRESET} through the CLI: loss {result['loss']:.4f}, {seconds:.0f} s wall")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
