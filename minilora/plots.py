"""Charts the chapters, notebooks and the demo share: memory bars, training curves, AdaLoRA's ranks, the spread
of a measurement, and learning against forgetting.

Object API only (no pyplot state, no plt.show): each function draws into the `ax` it is given, or into a fresh
`matplotlib.figure.Figure` when `ax` is None, and returns the axes - so it works under the headless Agg
backend and inside notebooks alike (`ax.figure.savefig(...)` writes a file).
"""

from __future__ import annotations

import statistics

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from minilora.memory import COMPONENTS, GB, GiB

# One colour per memory component, the same in every chart of the book.
COMPONENT_COLORS = {
    "base_weights": "#4c72b0",
    "quant_constants": "#8172b2",
    "lora_params": "#55a868",
    "gradients": "#c44e52",
    "optimizer_state": "#dd8452",
    "importance_scores": "#da8bc3",
    "activations": "#937860",
}


def _new_axes(figsize: tuple[float, float]) -> Axes:
    return Figure(figsize=figsize).subplots()


def plot_memory_report(report_or_reports, ax: Axes | None = None, capacities: dict[str, float] | None = None,
                       title: str | None = None, legend: bool = True, xmax: float | None = None) -> Axes:
    """Horizontal stacked bars in GB (10⁹ bytes, the unit of the tables): one bar per `MemoryReport`, one
    segment per component, on a linear axis so that each part shows its true share of the whole.

    `capacities` maps a label to a card's memory in GiB, e.g. {"48 GB card": 48}. GPU memory is sold in
    GiB, so a "48 GB" card holds 48 GiB = 51.5 GB: the dashed line is drawn there, and its label sits
    above the plot, clear of the bars. Each bar's total is part of its tick label. `xmax` (GB) crops the
    axis, so that a 1 TB bar does not squash the rest; a cropped bar ends in an arrow. Returns the axes.
    """
    reports = report_or_reports if isinstance(report_or_reports, (list, tuple)) else [report_or_reports]
    if not reports:
        raise ValueError("report_or_reports is empty: pass a MemoryReport or a non-empty list of them")
    if ax is None:
        ax = _new_axes((7.5, 1.4 + 0.45 * len(reports)))
    rows = list(range(len(reports)))
    lefts = [0.0] * len(reports)
    for name in COMPONENTS:
        widths = [r.components()[name] / GB for r in reports]
        label = name.replace("_", " ") if any(widths) else "_nolegend_"  # no legend entry for an empty part
        ax.barh(rows, widths, left=lefts, color=COMPONENT_COLORS[name], label=label, height=0.6)
        lefts = [left + width for left, width in zip(lefts, widths)]
    ax.set_yticks(rows, [f"{r.model} {r.method}: {r.gb():,.1f} GB" for r in reports], fontsize=8)
    ax.invert_yaxis()  # the first report on top, as in a table
    capacities_gb = {label: size_gib * GiB / GB for label, size_gib in (capacities or {}).items()}
    right = xmax if xmax is not None else 1.04 * max(lefts + list(capacities_gb.values()))
    ax.set_xlim(0, right)
    for row, total in zip(rows, lefts):
        if total > right:
            ax.annotate("", (right, row), (0.97 * right, row), arrowprops=dict(arrowstyle="->", color="white"))
    label_rows = _draw_capacities(ax, capacities_gb, right)
    ax.set_xlabel("memory (GB = 10⁹ bytes)")
    if title:
        ax.set_title(title, pad=6 + 12 * label_rows)
    if legend:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, frameon=False)
    return ax


def _draw_capacities(ax: Axes, capacities_gb: dict[str, float], right: float) -> int:
    """Dashed GPU-size lines with their labels above the axes (x in data units, y in axes units); a label
    closer than 15 % of the axis to the previous one moves up a row. Returns the number of label rows."""
    previous, row, rows = None, 0, 0
    for label, x in sorted(capacities_gb.items(), key=lambda item: item[1]):
        ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
        row = row + 1 if previous is not None and x - previous < 0.15 * right else 0
        ax.text(x, 1.02 + 0.07 * row, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=7)
        previous, rows = x, max(rows, row + 1)
    return rows


def plot_curves(curves: dict[str, list[float]], ax: Axes | None = None, xlabel: str = "step",
                ylabel: str = "loss", title: str | None = None, logy: bool = False) -> Axes:
    """One line per named series (e.g. {"LoRA": losses, "QLoRA": losses}), x = 0, 1, 2, ...; returns the
    axes."""
    if not curves:
        raise ValueError("curves is empty: pass {name: [values, ...]}")
    if ax is None:
        ax = _new_axes((5.0, 3.5))
    for name, values in curves.items():
        ax.plot(range(len(values)), list(values), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_rank_grid(layers: list, kinds: list[str], grid: list[list[int]], ax: Axes | None = None,
                   title: str | None = None) -> Axes:
    """Heatmap of the ranks AdaLoRA kept: one row per layer, one column per module kind, the rank written in
    each cell (the AdaLoRA paper's figure in miniature). Takes `RankAllocator.rank_grid()`'s three values."""
    if not grid or not kinds:
        raise ValueError("grid is empty: pass the (layers, kinds, grid) that RankAllocator.rank_grid() returns")
    if ax is None:
        ax = _new_axes((1.2 + 0.8 * len(kinds), 1.0 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    for i, row in enumerate(grid):
        for j, rank in enumerate(row):
            ax.text(j, i, str(rank), ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"layer {layer}" for layer in layers], fontsize=8)
    ax.figure.colorbar(image, ax=ax, label="rank kept")
    if title:
        ax.set_title(title)
    return ax


def plot_spread(samples: dict[str, list[float]], ax: Axes | None = None, ylabel: str = "",
                title: str | None = None) -> Axes:
    """One box per named sample (e.g. {"nf4": per-sentence errors, ...}): quartiles, whiskers to the last
    point within 1.5 IQR, outliers left out; the median of each is written in its tick label."""
    if not samples or any(len(values) == 0 for values in samples.values()):
        raise ValueError("samples is empty: pass {name: [value, ...]} with at least one value per name")
    if ax is None:
        ax = _new_axes((4.5, 3.5))
    names = list(samples)
    ax.boxplot([samples[name] for name in names], showfliers=False, widths=0.5)
    medians = [statistics.median(samples[name]) for name in names]
    ax.set_xticks(range(1, len(names) + 1), [f"{name.upper()}\nmedian {m:.4f}" for name, m in zip(names, medians)])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, None)
    if title:
        ax.set_title(title)
    return ax


def plot_learning_vs_forgetting(results: dict[str, dict], ax: Axes | None = None) -> Axes:
    """Each run's path from (0, 0): x = rise of the old task's loss (forgetting), y = new-task accuracy
    (learning), a dot per evaluation and a square at the end. Takes
    `minilora.experiments.learning_and_forgetting()`'s result (curve points (step, new acc, old acc, new loss,
    old loss))."""
    if not results:
        raise ValueError("results is empty: pass minilora.experiments.learning_and_forgetting()'s result")
    if ax is None:
        ax = _new_axes((7.8, 4.4))
    for name, result in results.items():
        curve = result["curve"]
        forgetting = [point[4] - curve[0][4] for point in curve]
        line, = ax.plot(forgetting, [point[1] for point in curve], marker="o", markersize=3,
                        label=f"{name} ({result['trainable']:,} trained)")
        ax.plot(forgetting[-1], curve[-1][1], marker="s", markersize=7, color=line.get_color())
    ax.set_xlabel("forgetting: rise of the old task's loss (nats per token)")
    ax.set_ylabel("learning: new-task accuracy")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return ax
