"""LoRA's family on the running example: what rsLoRA, DoRA, PiSSA and LoRA+ change, in about half a minute.

    python scripts/family_demo.py            # prints one table per variant and the machine line

Every run starts from the pretrained tiny Llama (minilora.data), adapts q_proj and v_proj, and trains on the
cipher task with the same batches (seed 0), AdamW, `STEPS` steps of 32 examples; the numbers are the eval
loss and exact-match accuracy on 512 held-out examples. They are float training results: they move in the
2nd-3rd digit on another CPU (see minilora.machine.describe_line()), so they are printed rounded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minilora.data import evaluate, finetune, make_task, pretrained_tiny_llama  # noqa: E402
from minilora.family import add_dora, apply_rslora, loraplus_param_groups, pissa_init_  # noqa: E402
from minilora.lora import LoraConfig, add_lora, lora_layers  # noqa: E402
from minilora.machine import describe_line  # noqa: E402

ALPHA = 8


def train(variant: str, r: int, lr: float, steps: int) -> dict:
    """Adapt a fresh pretrained model with one variant, train it, return the eval metrics.

    For "lora+", `lr` is A's learning rate and B's is 16 lr."""
    torch.manual_seed(0)                     # the same random A for every run of one rank
    config = LoraConfig(r=r, lora_alpha=ALPHA, target_modules=("q_proj", "v_proj"))
    model = pretrained_tiny_llama()
    model = add_dora(model, config) if variant == "dora" else add_lora(model, config)
    if variant == "rslora":
        apply_rslora(model)
    if variant == "pissa":
        for layer in lora_layers(model).values():
            pissa_init_(layer)
    optimizer = None
    if variant == "lora+":
        optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr=lr, lr_ratio=16), weight_decay=0.0)
    finetune(model, TRAIN, steps=steps, lr=lr, batch_size=32, seed=0, optimizer=optimizer)
    return evaluate(model, EVAL)


def show(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    for name, metrics in rows.items():
        print(f"  {name:34s} eval loss {metrics['loss']:5.2f}   accuracy {metrics['accuracy']:4.0%}")


def rslora_table(steps: int = 30) -> None:
    """rsLoRA: at one learning rate, does a larger rank learn more? (α/r: hardly; α/√r: yes, until the
    larger scale makes that learning rate too large.)"""
    rows = {}
    for lr in (3e-3, 1e-2, 3e-2):
        for r in (2, 8, 32):
            for variant, scale in (("lora", "alpha/r"), ("rslora", "alpha/sqrt(r)")):
                rows[f"lr {lr:g}  r={r:<2d} {scale}"] = train(variant, r, lr, steps)
    show(f"rsLoRA: scale alpha/r vs alpha/sqrt(r), alpha {ALPHA}, {steps} steps", rows)


def rank2_table(steps: int = 60) -> None:
    """DoRA, PiSSA and LoRA+ against LoRA at r = 2, each at two learning rates."""
    rows = {}
    for lr in (1e-2, 3e-2):
        for variant in ("lora", "dora", "pissa"):
            rows[f"{variant:6s} lr {lr:g}"] = train(variant, 2, lr, steps)
        rows[f"lora+  lr_A {lr / 4:g}, lr_B {4 * lr:g}"] = train("lora+", 2, lr / 4, steps)
    show(f"r=2, {steps} steps: LoRA, DoRA, PiSSA init, LoRA+ (lr_B = 16 lr_A)", rows)


if __name__ == "__main__":
    torch.set_num_threads(1)                 # 64-wide matrices: one thread is as fast and never oversubscribes
    TRAIN, EVAL = make_task("finetune", 4000, seed=1), make_task("finetune", 512, seed=2)
    print("tiny Llama, cipher task, q_proj + v_proj, batch 32, AdamW; eval on 512 held-out examples")
    rslora_table()
    rank2_table()
    print(f"\nmeasured on: {describe_line()}")
