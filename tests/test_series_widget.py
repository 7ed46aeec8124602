"""CheckpointSeries in the kernel, on a real short training run: the heatmap cells are the report's numbers
in the report's colours, a click opens that checkpoint's diff against its reference with the key
selected, the first column says why there is nothing to compare, flags open where they appear, the
metric recolours without reading again, folding keeps a thousand-key run to MAX_ROWS rows, and errors
are messages. The browser journey is in tests/browser/test_series_browser.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from series_runs import save_run

import ckptviz as cv
from ckptviz.plots_series import FROZEN_COLOR, MAX_ROWS, cell_colors
from ckptviz.widgets.series_view import CheckpointSeries

EPOCHS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Five epochs: features.0 frozen, the head x50 from epoch 4, a NaN at epoch 5."""
    folder = tmp_path_factory.mktemp("series-widget")
    save_run(folder, EPOCHS, blow_up_from=4, nan_at=5, samples=128, steps_per_epoch=2)
    return folder


def test_reads_a_folder_and_draws_the_reports_numbers(run):
    widget = CheckpointSeries(run)
    assert widget.error is None, widget.error
    report = widget.report
    assert report.labels == [f"epoch={e}.ckpt" for e in range(1, EPOCHS + 1)]
    heat = widget.heatmap
    assert heat.rows == report.keys and heat.columns == report.labels  # 18 keys: not folded
    expected, _, _ = cell_colors(report.matrix("rel_change").to_numpy())
    assert heat.cells == expected.tolist()
    frozen = heat.rows.index("features.0.weight")
    assert heat.cells[frozen][0] == "" and set(heat.cells[frozen][1:]) == {FROZEN_COLOR}  # blank, then grey
    head = heat.rows.index("head.weight")
    assert f"{report.matrix().loc['head.weight'].iloc[3]:.4g}" in heat.titles[head][3]
    assert "5 checkpoints × 18 keys" in widget.message.value and "1 norm_exploding" in widget.message.value
    flags = widget.flags_table.shown()
    assert len(flags) == len(report.flags) == 4  # 2 frozen, head.weight exploding, head.bias NaN
    assert "frozen" in widget.flags_table.counts.value
    assert widget.norms_figure is not None and widget.norms.outputs  # the norms PNG
    assert widget.pair is None and "click a cell" in widget.pair_header.value


def test_click_opens_that_pair_with_the_key_selected(run):
    widget = CheckpointSeries(run)
    row = widget.heatmap.rows.index("head.weight")
    widget._on_click(widget.heatmap, {"type": "click", "row": row, "col": 3}, [])
    pair = widget.pair
    assert widget.error is None, widget.error
    assert pair.a.path.endswith("epoch=3.ckpt") and pair.b.path.endswith("epoch=4.ckpt")
    rel = pair.frame.set_index("key").loc["head.weight", "rel_l2"]
    assert rel == pytest.approx(widget.report.matrix().loc["head.weight"].iloc[3], rel=1e-12)
    assert widget.heatmap.selected == [row, 3]
    table = widget.pair_view.table
    assert [pair.frame.loc[i, "key"] for i in table.selected] == ["head.weight"]
    assert widget.pair_view.row_panel.figure is not None  # its histograms are drawn
    assert "epoch=4.ckpt</b> against <b>epoch=3.ckpt" in widget.pair_header.value
    widget._on_click(widget.heatmap, {"type": "click", "row": -1, "col": 2}, [])  # a column's header
    assert widget.pair.b.path.endswith("epoch=3.ckpt") and widget.heatmap.selected == []


def test_first_column_has_no_reference_and_says_so(run):
    widget = CheckpointSeries(run)
    widget.open_pair(2)
    assert widget.pair is not None
    widget._on_click(widget.heatmap, {"type": "click", "row": 0, "col": 0}, [])
    assert widget.pair is None and "first checkpoint of the run" in widget.pair_header.value
    assert widget.error is None


def test_reference_first_compares_every_column_with_the_first(run):
    widget = CheckpointSeries(run, reference="first")
    assert widget.report.reference == "first"
    pair = widget.open_pair(4, "head.bias")
    assert pair.a.path.endswith("epoch=1.ckpt") and pair.b.path.endswith("epoch=5.ckpt")
    widget.reference.value = "previous"  # changing it asks for a new read, and the read uses it
    assert "press Read run" in widget.message.value
    widget.read()
    assert widget.report.reference == "previous"


def test_selecting_a_flag_opens_the_checkpoint_where_it_appears(run):
    widget = CheckpointSeries(run)
    flags = widget.report.flags
    label = flags.index[flags["flag"] == "nonfinite"][0]
    widget.flags_table.select([label])
    assert widget.pair.b.path.endswith("epoch=5.ckpt")
    selected = widget.pair_view.table.selected
    assert [widget.pair.frame.loc[i, "key"] for i in selected] == ["head.bias"]


def test_metric_recolours_without_reading_again(run):
    widget = CheckpointSeries(run)
    report = widget.report
    widget.metric.value = "norm"
    assert widget.report is report
    expected, _, _ = cell_colors(report.matrix("norm").to_numpy())
    assert widget.heatmap.cells == expected.tolist() and "L2 norm" in widget.heatmap.legend


def test_a_thousand_keys_fold_into_at_most_max_rows(tmp_path):
    torch.manual_seed(0)
    base = {f"blocks.{i}.{n}.weight": torch.randn(4) for i in range(250) for n in ("q", "k", "v", "o")}
    for step in range(3):
        torch.save({k: v + 0.01 * step * (i % 7) for i, (k, v) in enumerate(base.items())},
                   tmp_path / f"step_{step}.pt")
    widget = CheckpointSeries(tmp_path)
    assert widget.error is None and len(widget.report.keys) == 1000
    assert len(widget.heatmap.rows) <= MAX_ROWS and "folded into layer patterns" in widget.heatmap.legend
    assert widget.heatmap.rows == [str(r) for r in widget.shown.index]
    np.testing.assert_array_equal(widget.shown.to_numpy(), widget.report.folded("rel_change").to_numpy())
    widget._on_click(widget.heatmap, {"type": "click", "row": 0, "col": 2}, [])  # a pattern row: the pair opens
    assert widget.pair is not None and widget.heatmap.selected == [0, 2]


def test_errors_are_messages(tmp_path, run):
    widget = CheckpointSeries()
    assert widget.report is None and widget.read() is None and "Type the folder" in widget.message.value
    widget.path.value = str(tmp_path)
    widget.read()
    assert widget.report is None and "ckptviz-error" in widget.message.value
    assert str(tmp_path) in widget.error and "two or more" in widget.error
    assert widget.open_pair(1) is None and "Read a run first" in widget.message.value
    widget.read(run)
    assert widget.error is None and widget.open_pair(9) is None and "this run has 5" in widget.message.value


def test_given_paths_and_exported_name(run):
    paths = sorted(run.glob("*.ckpt"), key=lambda p: cv.series.natural_key(p.name))[:3]
    widget = cv.CheckpointSeries(paths)
    assert widget.report.labels == ["epoch=1.ckpt", "epoch=2.ckpt", "epoch=3.ckpt"]
    assert "3 checkpoints given in code" == widget.path.value
    bundle = widget._repr_mimebundle_()
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "SeriesReport(3 checkpoints" in bundle["text/html"]  # what a static export (nbconvert) shows
