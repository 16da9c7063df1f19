"""The sweep record of chapter 0 as a table and a figure (kn_tutorial.sweep_display)."""
import math

import matplotlib

matplotlib.use("Agg")

from kn_tutorial import book_data
from kn_tutorial.sweep_display import COLUMNS, plot_sweep, sweep_table


def test_table_has_one_row_per_variant_and_the_ratio_is_recomputed_from_the_effects():
    data = book_data.load("atlas_sweep")
    table = sweep_table(data)
    assert list(table.index) == [v["name"] for v in data["variants"]]
    assert list(table.columns) == list(COLUMNS[1:])
    for v in data["variants"]:
        row, mlp = table.loc[v["name"]], v["probe"]["trace"]["mlp"]
        assert math.isclose(row["ratio"], mlp["best_after_first_aie"] / mlp["layer0"])
        assert row["recall: held-out contexts"] == v["probe"]["recall"]["heldout_contexts"]
        assert row["layers × width"] == f"{v['config']['n_layer']} × {v['config']['n_embd']}"


def test_plot_has_a_point_and_a_label_per_variant():
    data = book_data.load("atlas_sweep")
    ax = plot_sweep(data)
    points = [c for c in ax.collections if len(c.get_offsets()) == 1]
    labels = {t.get_text() for t in ax.texts}
    assert {v["name"] for v in data["variants"]} <= labels
    assert len(points) >= len(data["variants"])
