"""Smoke tests for kn_tutorial.plots: each helper draws what it is given, on the Agg backend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kn_tutorial.plots import heatmap, plot_by_layer, stacked_by_layer  # noqa: E402


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
    ax = heatmap(np.eye(2), xlabels=["a", "b"], ylabels=["c", "d"], annotate=True, cbar_label="m")
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.00", "0.00", "1.00"]
    plt.close("all")
