"""The shared charts: they draw what they are given (checked on the data behind each chart)."""

import pytest

from minilora.memory import estimate
from minilora.plots import plot_curves, plot_memory_report, plot_rank_pattern, rank_matrix

PATTERN = {
    "model.layers.0.self_attn.q_proj": [True, False, True],
    "model.layers.0.self_attn.v_proj": [False, False, False],
    "model.layers.1.self_attn.q_proj": [True, True, True],
    "model.layers.1.self_attn.v_proj": [True, False, False],
}


def test_rank_matrix_counts_surviving_triplets_per_layer_and_module():
    layers, modules, ranks = rank_matrix(PATTERN)
    assert layers == ["0", "1"]
    assert modules == ["q_proj", "v_proj"]
    assert ranks == [[2, 0], [3, 1]]


def test_rank_matrix_orders_layers_numerically():
    pattern = {f"model.layers.{i}.mlp.up_proj": [True] * i for i in (10, 2, 1)}
    layers, _, ranks = rank_matrix(pattern)
    assert layers == ["1", "2", "10"]
    assert ranks == [[1], [2], [10]]


def test_rank_heatmap_shows_the_matrix():
    ax = plot_rank_pattern(PATTERN, title="ranks")
    assert ax.images[0].get_array().tolist() == [[2, 0], [3, 1]]
    assert [t.get_text() for t in ax.texts] == ["2", "0", "3", "1"]
    with pytest.raises(ValueError, match="rank_pattern is empty"):
        plot_rank_pattern({})


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
