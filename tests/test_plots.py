"""The shared charts: they draw what they are given (checked on the data behind each chart)."""

import pytest

from minilora.memory import estimate
from minilora.plots import plot_curves, plot_memory_report, plot_rank_grid


def test_rank_heatmap_shows_the_grid():
    ax = plot_rank_grid([0, 1], ["q_proj", "v_proj"], [[2, 0], [3, 1]], title="ranks")
    assert ax.images[0].get_array().tolist() == [[2, 0], [3, 1]]
    assert [t.get_text() for t in ax.texts] == ["2", "0", "3", "1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match="grid is empty"):
        plot_rank_grid([], [], [])


def test_memory_bars_stack_to_the_total():
    report = estimate("llama-7b", method="qlora")
    ax = plot_memory_report(report, unit="GB")
    top = max(patch.get_y() + patch.get_height() for patch in ax.patches)
    assert top == pytest.approx(report.total / 1e9)


def test_curves_draw_each_series():
    ax = plot_curves({"a": [3.0, 2.0, 1.0], "b": [1.0, 1.0]})
    assert [list(line.get_ydata()) for line in ax.lines] == [[3.0, 2.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="curves is empty"):
        plot_curves({})
