"""The shared charts: they draw what they are given (checked on the data behind each chart)."""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from minilora.memory import estimate
from minilora.plots import (
    plot_curves,
    plot_learning_vs_forgetting,
    plot_memory_report,
    plot_rank_grid,
    plot_spread,
)


def test_rank_heatmap_shows_the_grid():
    ax = plot_rank_grid([0, 1], ["q_proj", "v_proj"], [[2, 0], [3, 1]], title="ranks")
    assert ax.images[0].get_array().tolist() == [[2, 0], [3, 1]]
    assert [t.get_text() for t in ax.texts] == ["2", "0", "3", "1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match="grid is empty"):
        plot_rank_grid([], [], [])


def _bars(ax):
    """{row: [(left, width), ...]} of the stacked segments, rows 0, 1, ... from the top."""
    rows = {}
    for patch in ax.patches:
        rows.setdefault(round(patch.get_y() + patch.get_height() / 2), []).append((patch.get_x(), patch.get_width()))
    return rows


def test_memory_bars_are_parts_of_the_whole_in_gb():
    reports = [estimate(name, "qlora") for name in ("llama-7b", "llama-65b")]
    ax = plot_memory_report(reports, capacities={"48 GB card": 48})
    assert ax.get_xscale() == "linear"
    for row, report in zip(sorted(_bars(ax)), reports):
        segments = _bars(ax)[row]
        assert [w for _, w in segments] == pytest.approx([v / 1e9 for v in report.components().values()])
        assert segments[-1][0] + segments[-1][1] == pytest.approx(report.total / 1e9)  # stacked end to end
    base_7b = _bars(ax)[0][0][1]
    assert base_7b == pytest.approx(reports[0].base_weights / 1e9) and base_7b > 3  # 3.9 GB, visible
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"llama-7b qlora: {reports[0].total / 1e9:.1f} GB", f"llama-65b qlora: {reports[1].total / 1e9:.1f} GB"]
    assert ax.lines[0].get_xdata()[0] == pytest.approx(48 * 2**30 / 1e9)  # a 48 GiB card = 51.5 GB
    assert "GB = 10" in ax.get_xlabel()


def test_capacity_labels_stay_clear_of_the_bars():
    reports = [estimate("llama-33b", m) for m in ("lora", "qlora")] + [estimate("llama-65b", "qlora")]
    ax = plot_memory_report(reports, capacities={"24 GB card": 24, "48 GB card": 48, "80 GB card": 80},
                            title="t")
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    ax.figure.draw(renderer)  # lay the figure out as savefig would
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(labels) == 3
    for patch in ax.patches:
        bar = patch.get_window_extent(renderer)
        assert not any(label.overlaps(bar) for label in labels)
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    # Crowded lines (24 and 32 GiB on a 1 TB axis) put their labels on two rows instead of on top of each other.
    ax = plot_memory_report(estimate("llama-65b", "full"), capacities={"24": 24, "32": 32})
    assert [round(t.get_position()[1], 2) for t in ax.texts] == [1.02, 1.09]
    ax = plot_memory_report(estimate("llama-65b", "full"), xmax=160)
    assert ax.get_xlim() == (0, 160) and len(ax.texts) == 1  # the arrow that marks the cropped bar


def test_legend_lists_only_parts_that_exist():
    ax = plot_memory_report(estimate("llama-7b", "lora"))
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "quant constants" not in names and "importance scores" not in names
    ax = plot_memory_report([estimate("llama-7b", "adalora"), estimate("llama-7b", "qlora")])
    assert {"quant constants", "importance scores"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    with pytest.raises(ValueError, match="empty"):
        plot_memory_report([])


def test_curves_draw_each_series():
    ax = plot_curves({"a": [3.0, 2.0, 1.0], "b": [1.0, 1.0]})
    assert [list(line.get_ydata()) for line in ax.lines] == [[3.0, 2.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="curves is empty"):
        plot_curves({})


def test_spread_boxes_show_each_sample_and_its_median():
    ax = plot_spread({"nf4": [1.0, 2.0, 3.0], "fp4": [4.0, 6.0, 5.0, 9.0]}, ylabel="error")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NF4\nmedian 2.0000", "FP4\nmedian 5.5000"]
    medians = [line.get_ydata()[0] for line in ax.lines if line.get_color() in ("C1", "#ff7f0e")]
    assert medians == [2.0, 5.5]  # the box's median line and the label agree
    with pytest.raises(ValueError, match="empty"):
        plot_spread({"nf4": []})


def test_learning_vs_forgetting_paths_start_at_the_origin():
    results = {"full": {"curve": [(0, 0.0, 1.0, 9.0, 0.5), (5, 0.6, 0.0, 1.0, 3.5)], "trainable": 10},
               "LoRA": {"curve": [(0, 0.0, 1.0, 9.0, 0.5), (5, 0.2, 0.5, 4.0, 1.5)], "trainable": 2}}
    ax = plot_learning_vs_forgetting(results)
    paths = [line for line in ax.lines if len(line.get_xdata()) > 1]
    assert [list(line.get_xdata()) for line in paths] == [[0.0, 3.0], [0.0, 1.0]]
    assert [list(line.get_ydata()) for line in paths] == [[0.0, 0.6], [0.0, 0.2]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full (10 trained)", "LoRA (2 trained)"]
