"""Smoke tests for kn_tutorial.plots: each helper draws what it is given, on the Agg backend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import pytest  # noqa: E402

from kn_tutorial.plots import (  # noqa: E402
    grouped_bars, heatmap, plot_alpha_paths, plot_attribution_summary, plot_by_layer, plot_delta_optimisation, plot_panels,
    plot_recall_by_group,
    plot_scaling, stacked_by_layer, top_attributions, wilson_interval,
)


def test_plot_by_layer_with_reference_lines():
    ax = plot_by_layer({"a": [0.1, 0.2, 0.3], "b": [0.3, 0.2, 0.1]}, range(3), chance={"a": 0.05},
                       chance_label={"a": "tokens explain"}, percent=True, ylabel="share")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a", "a (tokens explain)", "b"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [10, 20, 30])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [5, 5, 5])
    assert ax.get_ylabel() == "share (%)"
    plt.close("all")


def test_stacked_by_layer_and_heatmap():
    ax = stacked_by_layer({"x": [0.25, 0.5], "y": [0.75, 0.5]}, [0, 1])
    tops = sorted(p.get_y() + p.get_height() for p in ax.patches)
    np.testing.assert_allclose(tops[-2:], [1.0, 1.0])
    below = stacked_by_layer({"x": [1.0]}, [0], legend_below=True).get_legend()
    assert below._loc == 9 and below.get_bbox_to_anchor().y0 < below.axes.bbox.y0  # 9: upper center, under the axes
    ax = heatmap(np.eye(2), xlabels=["a", "b"], ylabels=["c", "d"], annotate=True, cbar_label="m")
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.00", "0.00", "1.00"]
    plt.close("all")


def test_attribution_summary_shows_layer_sums_and_the_top_neurons():
    attr = np.zeros((3, 50))
    attr[0, 7], attr[2, 3], attr[2, 4], attr[1, 0] = 0.5, 0.2, -0.1, 0.05
    assert top_attributions(attr, 2) == [(0, 7, 0.5), (2, 3, 0.2)]
    left, right = plot_attribution_summary(attr, k=3)
    heights = [p.get_height() for p in left.patches]
    np.testing.assert_allclose(heights, [0.5, 0.05, 0.2, 0.0, 0.0, -0.1])  # positive sums, then negative sums
    assert [t.get_text() for t in right.get_yticklabels()] == ["L0.7", "L2.3", "L1.0"]
    np.testing.assert_allclose([p.get_width() for p in right.patches], [0.5, 0.2, 0.05])
    with pytest.raises(ValueError, match="k must be"):
        top_attributions(attr, 0)
    with pytest.raises(ValueError, match=r"\[layers, d_ff\]"):
        plot_attribution_summary(np.zeros((2, 3, 4)))
    plt.close("all")


def test_alpha_paths_group_quiet_layers_and_mark_the_riemann_points():
    alphas = np.linspace(0, 1, 81)
    paths = np.vstack([np.clip((alphas - 0.15) * 10, 0, 1), np.full(81, 0.99), np.full(81, 0.98) + 0.005 * alphas])
    left, right = plot_alpha_paths(alphas, paths, steps=20, rule="right")
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert labels == ["layers 1, 2 (|gap| ≤ 0.01)", "layer 0 (gap +1.000)"]
    points = right.lines[1]
    np.testing.assert_allclose(points.get_xdata(), np.arange(1, 21) / 20)
    np.testing.assert_allclose(points.get_ydata(), np.clip((np.arange(1, 21) / 20 - 0.15) * 10, 0, 1), atol=1e-12)
    with pytest.raises(ValueError, match="not all on the grid"):
        plot_alpha_paths(np.linspace(0, 1, 7), paths[:, :7], steps=20)
    plt.close("all")


def test_delta_optimisation_draws_every_term_on_linear_axes_with_a_marker_per_step():
    losses = [{"nll": 14.7, "kl": 0.0, "decay": 0.0, "p_target": 0.0},
              {"nll": 3.0, "kl": 1e-4, "decay": 0.02, "p_target": 0.1},
              {"nll": 0.004, "kl": 5e-4, "decay": 0.01, "p_target": 0.99}]
    axes = plot_delta_optimisation(losses, target=" Europe")
    assert [ax.get_title() for ax in axes] == ["NLL of the new object", "KL term", "weight-decay term",
                                               "P(Europe), mean over prompts"]
    for ax, key in zip(axes, ("nll", "kl", "decay", "p_target")):
        assert ax.get_yscale() == "linear" and ax.lines[0].get_marker() == "o"
        np.testing.assert_allclose(ax.lines[0].get_ydata(), [row[key] for row in losses])
    with pytest.raises(ValueError, match="have no"):
        plot_delta_optimisation([{"nll": 1.0}])
    plt.close("all")


def test_wilson_interval_matches_the_formula_and_does_not_collapse_at_the_ends():
    low, high = wilson_interval(0.5, 100)
    np.testing.assert_allclose([low, high], [0.4038, 0.5962], atol=1e-4)   # textbook value for 50 of 100
    low, high = wilson_interval(1.0, 10)
    assert high == 1.0 and 0.69 < low < 0.73                              # 10 of 10: about [0.72, 1]
    with pytest.raises(ValueError, match="positive number of cases"):
        wilson_interval(0.5, 0)


def test_scaling_curve_has_intervals_and_one_legend_below_the_panels():
    data = {"results": {
        "MEMIT": [{"n_edits": 1, "ES": 100, "PS": 90, "n": 1}, {"n_edits": 10, "ES": 80, "ES_ci": 5.0, "PS": 70, "n": 10}],
        "unedited": [{"n_edits": 1, "ES": 0, "PS": 0, "n": 1}]}}
    axes = plot_scaling(data, metrics=("ES", "PS"))
    segments = axes[0].containers[0].lines[2][0].get_segments()  # MEMIT's error bars on the ES panel
    expected = [[100 * b for b in wilson_interval(r, n)] for r, n in ((1.0, 1), (0.8, 10))]
    np.testing.assert_allclose([s[:, 1] for s in segments], expected)
    assert axes[0].get_legend() is None and len(axes[0].figure.legends) == 1
    assert [t.get_text() for t in axes[0].figure.legends[0].get_texts()] == ["MEMIT", "unedited"]
    axes = plot_scaling(data, metrics=("ES",), interval="stored")
    segments = axes[0].containers[0].lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segments], [[100, 100], [75, 85]])
    with pytest.raises(ValueError, match="interval must be"):
        plot_scaling(data, interval="bootstrap")
    plt.close("all")


def test_recall_dot_plot_has_one_row_per_relation_and_group_and_shows_zeros():
    rows = [{"relation": "capital", "group": "train", "first_token": 1.0},
            {"relation": "capital", "group": "novel", "first_token": 0.0},
            {"relation": "capital", "group": "novel", "first_token": 0.9},
            {"relation": "currency", "group": "train", "first_token": 1.0}]
    ax = plot_recall_by_group(rows)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "capital · trained template (1)", "capital · novel paraphrase (2)", "currency · trained template (1)"]
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 0], [0.0, 90.0])  # the zero is a dot at 0
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [45.0, 45.0])              # the row's mean
    with pytest.raises(ValueError, match="unknown template groups"):
        plot_recall_by_group([{"relation": "x", "group": "other", "first_token": 1.0}])
    plt.close("all")


def test_panels_share_one_legend_outside_and_floor_zeros_on_log_axes():
    axes = plot_panels({"A": {"right": [1.0, 0.0], "left": [0.5, 0.1]}, "B": {"right": [0.2, 0.3], "left": [0.1, 0.0]}},
                       [1, 2], logx=True, logy=True, floor=1e-6, hlines={"1%": 0.01}, vlines={"m = 20": 20},
                       styles={"left": {"ls": "--"}})
    assert [ax.get_title() for ax in axes] == ["A", "B"] and axes[0].get_legend() is None
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == ["right", "left", "1%", "m = 20"]
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), [1.0, 1e-6])
    assert axes[1].lines[1].get_linestyle() == "--" and axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="has 1 values for 2 x"):
        plot_panels({"A": {"s": [1.0]}}, [1, 2])
    plt.close("all")


def test_grouped_bars_sit_side_by_side():
    ax = grouped_bars({"a": [0.5, 0.25], "b": [0.1, 0.2]}, [0, 1], percent=True, ylabel="share")
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [50, 25, 10, 20])
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in ax.patches], [-0.2, 0.8, 0.2, 1.2])
    assert ax.get_ylabel() == "share (%)"
    plt.close("all")


def test_heatmap_centres_a_diverging_scale_and_shares_a_spread():
    ax = heatmap([[-0.2, 0.1], [0.05, 0.0]], cmap="PuOr", centre=0.0, annotate=True, fmt="{:+.2f}", colorbar=False)
    assert ax.images[0].get_clim() == (-0.2, 0.2) and not ax.figure.axes[1:]   # symmetric, no colour bar
    assert [t.get_text() for t in ax.texts] == ["-0.20", "+0.10", "+0.05", "+0.00"]
    ax = heatmap([[0.1]], centre=0.0, spread=0.5)
    assert ax.images[0].get_clim() == (-0.5, 0.5)
    plt.close("all")


def test_plot_panels_lets_a_style_replace_the_marker():
    axes = plot_panels({"p": {"plain": [1.0, 2.0], "dots": [2.0, 3.0]}}, [1, 2], styles={"plain": {"marker": ""}})
    plain, dots = axes[0].lines[:2]
    assert plain.get_marker() in ("", "None") and dots.get_marker() == "o"
    plt.close("all")


def test_the_editing_figures_draw_what_they_are_given():
    from kn_tutorial.plots import plot_feasible_costs, plot_key_spectrum, plot_layer_shares, plot_layer_sweep

    ax = plot_key_spectrum(np.array([1e-4, 1e-2, 1.0]), layer=3)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 1e-2, 1e-4])          # largest first
    assert "layer 3" in ax.get_title() and "1.0e+04" in ax.get_title()              # condition number
    with pytest.raises(ValueError, match="positive"):
        plot_key_spectrum(np.array([0.0, 1.0]))
    ax = plot_feasible_costs({0.1: [3.0, 5.0], 1.0: [101.0]})
    ys = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    np.testing.assert_allclose(ys, [2.0, 4.0, 100.0])                                # ratio − 1
    rows = [{"config": c, "layer": layer, "ES": 10.0 * layer, "PS": 1.0, "NS": 2.0, "S": 3.0}
            for c in ("a", "b") for layer in range(3)]
    axes = plot_layer_sweep(rows, ["a", "b"], marked_layer=1)
    assert len(axes) == 2 and list(axes[0].lines[0].get_ydata()) == [0.0, 10.0, 20.0]
    with pytest.raises(ValueError, match="no rows"):
        plot_layer_sweep(rows, ["c"])

    class Record:  # what memit.edit(...).records holds
        def __init__(self, layer, pass_index, asked, delivered):
            self.layer, self.pass_index, self.residual_norm, self.achieved_norm = layer, pass_index, asked, delivered

    ax = plot_layer_shares([Record(1, 0, 4.0, 3.0), Record(2, 0, 6.0, 5.0), Record(1, 1, 2.0, 1.0)])
    heights = [p.get_height() for p in ax.patches]
    assert heights == [4.0, 6.0, 2.0, 3.0, 5.0, 1.0]
    assert [t.get_text() for t in ax.texts] == ["pass 1", "pass 2"] and len(ax.lines) == 1  # one divider
    plt.close("all")


def test_horizontal_bars_notes_each_bar_and_keeps_the_order():
    from kn_tutorial.plots import horizontal_bars

    ax = horizontal_bars({"capital": 10, "continent": 30}, notes={"continent": "6 distinct objects"})
    assert [p.get_width() for p in ax.patches] == [10, 30]
    assert [t.get_text() for t in ax.texts] == ["6 distinct objects"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["capital", "continent"] and ax.yaxis_inverted()
    with pytest.raises(ValueError, match="empty"):
        horizontal_bars({})
    plt.close("all")


def test_plot_panels_puts_integer_x_on_integer_ticks():
    axes = plot_panels({"p": {"a": [float(i) for i in range(12)]}}, list(range(12)), panel_size=(3, 2.8))
    axes[0].figure.canvas.draw()
    assert all(float(t).is_integer() for t in axes[0].get_xticks())
    plt.close("all")


def test_plot_panels_draws_one_legend_only_when_there_is_more_than_one_line():
    axes = plot_panels({"loss": {"training loss": [1.0, 0.8]}}, [1, 2])
    assert axes[-1].get_legend() is None
    axes = plot_panels({"p": {"a": [1.0, 2.0]}}, [1, 2], hlines={"goal": 1.5})
    assert axes[-1].get_legend() is not None
    plt.close("all")
