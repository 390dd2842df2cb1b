"""float32 or bf16 adapters on a bf16 base (peft's autocast_adapter_dtype): what it does to the running example.

    python scripts/adapter_dtype.py              # about a minute on one CPU thread; prints a table

Every run starts from the pretrained tiny Llama (minilora.data) cast to bf16, adapts q_proj and v_proj with
LoRA r 8 (α 16), and trains on the cipher task with the same batches, 60 steps of 32 examples. The adapters
are float32 (autocast_adapter_dtype=True, peft's default) or bf16 (False); the optimizer is torch's AdamW
(its moments in the parameters' dtype) or minilora's PagedAdamW (float32 moments whatever the parameters, as
bitsandbytes' 32-bit optimizers). Printed: the eval loss and exact-match
accuracy on 256 held-out examples, per seed, and the share of adapter entries whose update was rounded
away at the last step (the entry did not move although its gradient was not zero). Float training
results move in the 2nd-3rd digit on another CPU (minilora.machine.describe_line()), so they are rounded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minilora.data import evaluate, finetune, make_task, pretrained_tiny_llama  # noqa: E402
from minilora.lora import LoraConfig, add_lora  # noqa: E402
from minilora.machine import describe_line  # noqa: E402
from minilora.paged import PagedAdamW  # noqa: E402

STEPS, SEEDS = 60, (0, 1, 2)
TARGETS = ("q_proj", "v_proj")
TRAIN = make_task("finetune", 2048, seed=1)
EVAL = make_task("finetune", 256, seed=2)


def train(autocast: bool, optimizer_name: str, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = add_lora(pretrained_tiny_llama().to(torch.bfloat16),
                     LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), autocast_adapter_dtype=autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer_name == "AdamW"
                 else PagedAdamW(params, lr=lr))
    rounded_away = []

    def count(step):   # after optimizer.step(), before zero_grad: did each entry move?
        moved = [(p != before[i]) | (p.grad == 0) for i, p in enumerate(params)]
        rounded_away.append(1 - sum(int(m.sum()) for m in moved) / sum(m.numel() for m in moved))

    before = []
    step_fn = optimizer.step

    def step(*args, **kwargs):   # keep the parameters as they were before each step, to compare after it
        before[:] = [p.detach().clone() for p in params]
        return step_fn(*args, **kwargs)

    optimizer.step = step
    finetune(model, TRAIN, steps=STEPS, lr=lr, batch_size=32, seed=seed, optimizer=optimizer, after_step=count)
    return {**evaluate(model, EVAL), "rounded_away": sum(rounded_away) / len(rounded_away)}


def main() -> None:
    print(describe_line())
    print(f"{'adapters':10s} {'optimizer':11s} " + "  ".join(f"seed {s}: loss / acc / rounded" for s in SEEDS))
    for lr in (1e-3, 3e-3, 1e-2):
        for autocast in (True, False):
            for optimizer_name in ("AdamW", "PagedAdamW"):
                cells = []
                for seed in SEEDS:
                    result = train(autocast, optimizer_name, lr, seed)
                    cells.append(f"{result['loss']:5.2f} / {result['accuracy']:4.0%} / {result['rounded_away']:5.1%}")
                print(f"lr {lr:g} {'float32' if autocast else 'bf16':8s} {optimizer_name:11s} " + "  ".join(cells),
                      flush=True)


if __name__ == "__main__":
    main()
