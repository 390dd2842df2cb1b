"""Charts the chapters, notebooks and the demo share: memory bars and training curves.

Object API only (no pyplot state, no plt.show): each function draws into the `ax` it is given, or into a fresh
`matplotlib.figure.Figure` when `ax` is None, and returns the axes - so it works under the headless Agg
backend and inside notebooks alike (`ax.figure.savefig(...)` writes a file).
"""

from __future__ import annotations

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
    "activations": "#937860",
}
UNITS = {"GB": GB, "GiB": GiB}


def _new_axes(figsize: tuple[float, float]) -> Axes:
    return Figure(figsize=figsize).subplots()


def plot_memory_report(report_or_reports, ax: Axes | None = None, unit: str = "GiB",
                       capacities: dict[str, float] | None = None, title: str | None = None,
                       log: bool = False, legend: bool = True) -> Axes:
    """Stacked bars: one bar per `MemoryReport`, one coloured segment per component (base weights at the
    bottom).

    `capacities` maps a label to a GPU size in GiB, e.g. {"24 GB GPU": 24, "48 GB GPU": 48}, drawn as dashed
    lines. The total is written on top of each bar. `log=True` gives a log y axis (handy across sizes, but
    it distorts the stacked segments). Returns the axes.
    """
    reports = report_or_reports if isinstance(report_or_reports, (list, tuple)) else [report_or_reports]
    if not reports:
        raise ValueError("report_or_reports is empty: pass a MemoryReport or a non-empty list of them")
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: allowed {list(UNITS)}")
    scale = UNITS[unit]
    if ax is None:
        ax = _new_axes((1.2 + 1.0 * len(reports), 4.0))
    positions = list(range(len(reports)))
    bottoms = [0.0] * len(reports)
    for name in COMPONENTS:
        heights = [r.components()[name] / scale for r in reports]
        ax.bar(positions, heights, bottom=bottoms, color=COMPONENT_COLORS[name], label=name, width=0.7)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in zip(positions, bottoms):
        ax.annotate(f"{total:,.1f}", (x, total), ha="center", va="bottom", fontsize=8)
    for label, size_gib in (capacities or {}).items():
        ax.axhline(size_gib * GiB / scale, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(label, (positions[-1] + 0.4, size_gib * GiB / scale), ha="right", va="bottom", fontsize=8)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{r.model}\n{r.method}" for r in reports], fontsize=8)
    ax.set_ylabel(f"memory ({unit})")
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=7, loc="upper right")
    return ax


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
