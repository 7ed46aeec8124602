"""CheckpointDiff driven from Python as a notebook user's clicks would drive it (pick files, press Compare,
filter, search, select rows) on real files: a small CNN trained on scikit-learn's digits and a fine-tuned
copy saved with torch.save. Also the inspector's NaN/Inf scan, its warning on the selected row and its
layer overview; and the comparing-checkpoints notebook, executed headless, says what it claims."""

from __future__ import annotations

import base64
import copy
import re

import pytest
import torch
from models import SmallCNN, randomized
from test_notebooks import WIDGET_VIEW, assert_ran_cleanly, cell, execute, kernel_dir, mimetypes, text  # noqa: F401
from torch import nn

import ckptviz as cv
from ckptviz.demo import DigitsCNN, digits, train
from ckptviz.diff import DiffReport, diff
from ckptviz.widgets import CheckpointDiff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FROZEN = ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
          "features.3.weight", "features.3.bias", "features.4.weight", "features.4.bias"]


def png_of(output) -> bytes:
    """The PNG an Output widget shows (fails if it shows none)."""
    (out,) = output.outputs
    return base64.b64decode(out["data"]["image/png"])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base.pt (a trained DigitsCNN), finetuned.pt (backbone frozen but in train mode, 20 SGD steps on the
    classifier and head; saved through DataParallel, with an EMA section) and surgery.pt (one key of each
    kind of difference)."""
    folder = tmp_path_factory.mktemp("diff")
    torch.manual_seed(0)
    x, y = digits()
    base = DigitsCNN()
    train(base, x, y, epochs=1)
    torch.save({"epoch": 1, "model": base.state_dict()}, folder / "base.pt")
    tuned = copy.deepcopy(base)
    tuned.features.requires_grad_(False)
    tuned.train()
    ema = copy.deepcopy(tuned)
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(len(x), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(tuned(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            for e, t in zip(ema.state_dict().values(), tuned.state_dict().values()):
                e.lerp_(t, 0.1) if e.is_floating_point() else e.copy_(t)
    torch.save({"epoch": 2, "model": nn.DataParallel(tuned).state_dict(), "ema": ema.state_dict()},
               folder / "finetuned.pt")
    surgery = {k: v.clone() for k, v in tuned.state_dict().items()}
    surgery["head.weight"] = torch.randn(5, 64)  # shape_differs
    del surgery["head.bias"]  # only_a
    surgery["extra.scale"] = torch.ones(3)  # only_b
    surgery["classifier.1.bias"] = surgery["classifier.1.bias"].double()  # dtype_differs
    torch.save(surgery, folder / "surgery.pt")
    return folder, base, tuned


def pick(side, name: str) -> None:
    """Choose ``name`` in a side's file list, as a click in the browser does."""
    side.picker.listing.value = next(o for o in side.picker.listing.options if o.startswith(name))


def test_pick_two_files_and_compare(ckpts):
    folder, _, _ = ckpts
    widget = CheckpointDiff(start_dir=folder)
    assert widget.report is None and "press Compare" in widget.table.counts.value
    pick(widget.side_a, "base.pt")
    pick(widget.side_b, "finetuned.pt")
    assert widget.error is None and widget.report is None  # nothing compared before the button
    assert "base.pt" in widget.side_a.info.value and "torch-zip" in widget.side_a.info.value
    assert [label.split(" — ")[0] for label, _ in widget.side_b.section.options] == ["best match", "model", "ema"]
    assert widget.side_b.section.label == "best match" and widget.side_b.chosen_section is None

    widget.compare_button.click()
    rep = widget.report
    assert isinstance(rep, DiffReport) and widget.error is None
    assert rep.summary == {"both": 18, "only_a": 0, "only_b": 0, "shape_differs": 0, "dtype_differs": 0}
    assert rep.section_a == "model" and rep.section_b == "model" and rep.rules == [("^module\\.", "")]
    assert "18 keys compared" in widget.message.value and "values changed in 10" in widget.message.value
    assert "values changed in 10 of 18 compared tensors" in widget.table.counts.value

    shown = widget.table.shown()
    assert len(shown) == 18
    assert list(shown["key"]) == list(rep.by_change()["key"])  # most changed first
    assert list(shown["rel_l2"]) == sorted(shown["rel_l2"], reverse=True)
    assert shown["key"].iloc[0].endswith("num_batches_tracked")  # BatchNorm counters moved most: train mode
    assert set(shown["key"].iloc[-8:]) == set(FROZEN)  # the frozen weights did not move at all
    assert (shown["key_b"] == "module." + shown["key"]).all()
    assert shown["status"].str.contains("ckptviz-diff-status-both").all()

    assert png_of(widget.bars).startswith(PNG_MAGIC)
    ax = widget.bars_figure.axes[0]
    assert len(ax.containers[0]) == 18  # one bar per layer, in model order
    assert [t.get_text() for t in ax.get_yticklabels()] == list(rep.frame["key"])


def test_filter_and_search(ckpts):
    folder, _, _ = ckpts
    widget = CheckpointDiff(folder / "base.pt", folder / "finetuned.pt")  # paths given: compared at once
    table = widget.table
    table.filter.value = "unchanged"
    assert sorted(table.shown()["key"]) == sorted(FROZEN)
    table.filter.value = "changed"
    assert len(table.shown()) == 10 and not set(table.shown()["key"]) & set(FROZEN)
    table.view.search = "head"
    assert sorted(table.shown()["key"]) == ["head.bias", "head.weight"]
    table.view.search = "running_(mean|var)$"
    assert len(table.shown()) == 4
    table.filter.value, table.view.search = "all", ""
    assert len(table.shown()) == 18

    widget.set_source("b", folder / "surgery.pt")
    assert "press Compare" in widget.message.value and widget.report.section_b == "model"  # the old one, until
    widget.compare_button.click()
    assert widget.report.summary == {"both": 15, "only_a": 1, "only_b": 1, "shape_differs": 1, "dtype_differs": 1}
    for status, key in [("only_a", "head.bias"), ("only_b", ""), ("shape_differs", "head.weight"),
                        ("dtype_differs", "classifier.1.bias")]:
        table.filter.value = status
        assert list(table.shown()["key"]) == [key], status
    assert list(table.shown()["dtype_b"]) == ["float64"]
    table.filter.value = "only_b"
    assert list(table.shown()["key_b"]) == ["extra.scale"]
    table.filter.value = "all"
    last = table.shown().iloc[-3:]  # rows with nothing to measure come last, in model order
    assert (last["rel_l2"] == "").all()  # shown as blank cells
    assert list(last["status"].str.extract(r">(\w+)</span>")[0]) == ["shape_differs", "only_a", "only_b"]


def test_selected_row_shows_overlay_difference_and_numbers(ckpts):
    folder, base, tuned = ckpts
    widget = CheckpointDiff(folder / "base.pt", folder / "finetuned.pt")
    rep = widget.report
    label = rep.frame.index[rep.frame["key"] == "classifier.1.weight"][0]
    widget.table.select([label])
    assert widget.error is None
    panel = widget.row_panel
    assert "classifier.1.weight ↔ module.classifier.1.weight" in panel.header.value
    assert "(64, 512) float32" in panel.header.value
    row = rep.frame.loc[label]
    assert f"<b>rel_l2</b> {row['rel_l2']:.4g}" in panel.numbers.value
    assert "ckptviz-diff-stats" in panel.numbers.value and "b − a" in panel.numbers.value
    assert png_of(panel.output).startswith(PNG_MAGIC)
    left, right = panel.figure.axes
    texts = [t.get_text() for t in left.get_legend().get_texts()]
    assert texts == ["a (n=32,768)", "b (n=32,768)"]
    assert right.get_legend().get_texts()[0].get_text() == "b − a (n=32,768)"
    # the difference shown is the real one: its norm over a's norm is the report's rel_l2
    from ckptviz.widgets.diff_view import pair_comparison

    ta, tb = rep.pair("classifier.1.weight")
    assert torch.equal(ta, base.classifier[1].weight) and torch.equal(tb, tuned.classifier[1].weight)
    table, hists = pair_comparison(ta, tb)
    assert table.loc["l2", "b − a"] / table.loc["l2", "a"] == pytest.approx(row["rel_l2"], rel=1e-5)
    assert table.loc["zero_frac", "b − a"] == pytest.approx(1 - row["changed_frac"])
    assert hists["difference"].total == ta.numel()

    widget.table.select([])
    assert "select a row" in panel.header.value and panel.output.outputs == ()


def test_rows_in_one_file_or_with_other_shapes(ckpts):
    folder, _, _ = ckpts
    widget = CheckpointDiff(folder / "finetuned.pt", folder / "surgery.pt")
    frame = widget.report.frame
    widget.table.select([frame.index[frame["key"] == "module.head.weight"][0]])  # shape_differs
    assert widget.error is None
    assert "(10, 64) float32" in widget.row_panel.header.value and "(5, 64) float32" in widget.row_panel.header.value
    right = widget.row_panel.figure.axes[1]
    assert "no element-wise difference" in right.texts[0].get_text()
    assert "b − a" not in widget.row_panel.numbers.value
    widget.table.select([frame.index[frame["status"] == "only_b"][0]])
    assert widget.error is None and "extra.scale" in widget.row_panel.header.value
    left = widget.row_panel.figure.axes[0]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["b (n=3)"]


def test_models_state_dicts_and_sections(ckpts):
    folder, base, tuned = ckpts
    widget = CheckpointDiff(base, tuned.state_dict())
    assert widget.error is None and widget.report.summary["both"] == 18
    assert "DigitsCNN" in widget.side_a.info.value and "state dict" in widget.side_b.info.value
    assert widget.side_a.section.layout.display == "none"

    widget = CheckpointDiff(start_dir=folder)
    pick(widget.side_a, "finetuned.pt")
    pick(widget.side_b, "finetuned.pt")
    widget.side_a.section.value = "model"
    widget.side_b.section.value = "ema"
    assert (widget.side_a.chosen_section, widget.side_b.chosen_section) == ("model", "ema")
    rep = widget.compare()
    assert rep is widget.report and (rep.section_a, rep.section_b) == ("model", "ema")
    changed = set(rep.frame.loc[rep.frame["changed_frac"] > 0, "key_b"])
    assert changed and not changed & set(FROZEN)  # the EMA trails the raw weights where they moved


def test_errors_are_shown_not_raised(ckpts, tmp_path):
    folder, _, _ = ckpts
    widget = CheckpointDiff(start_dir=folder)
    widget.compare_button.click()
    assert widget.report is None and "Choose checkpoint a and b first" in widget.message.value

    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    widget.side_a.picker.path.value = str(tmp_path / "broken.pt")
    widget.side_a.picker.open_button.click()
    assert widget.side_a.source is None and "broken.pt" in widget.error
    assert "ckptviz-error" in widget.message.value and "Traceback" not in widget.message.value

    torch.save(randomized(SmallCNN(), seed=0), tmp_path / "whole_model.pt")  # a pickled nn.Module: untrusted
    widget.set_source("a", tmp_path / "whole_model.pt")
    assert widget.side_a.source is None and "SmallCNN" in widget.error
    assert widget.side_a.trust.layout.display == "" and "Trust this file" in widget.message.value
    widget.side_a.trust.value = True
    assert widget.error is None and isinstance(widget.side_a.source, cv.Checkpoint)
    widget.set_source("b", randomized(SmallCNN(), seed=1))
    assert widget.compare() is not None and widget.report.summary["both"] == len(SmallCNN().state_dict())

    widget.set_source("b", 42)
    assert widget.side_b.source is None and "expected a path" in widget.error


def test_static_export_shows_the_report(ckpts):
    folder, _, _ = ckpts
    bundle = CheckpointDiff(folder / "base.pt", folder / "finetuned.pt")._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "ckptviz-diff" in bundle["text/html"] and "classifier.1.weight" in bundle["text/html"]
    assert "no comparison yet" in CheckpointDiff()._repr_mimebundle_()["text/html"]


def test_report_matches_the_core_verb(ckpts):
    folder, _, _ = ckpts
    widget = CheckpointDiff(folder / "base.pt", folder / "finetuned.pt")
    direct = diff(folder / "base.pt", folder / "finetuned.pt")
    assert widget.report.frame.equals(direct.frame)


# ---- the inspector's additions ------------------------------------------------------------------
@pytest.fixture
def nan_file(tmp_path):
    src = randomized(SmallCNN(num_classes=10), seed=3)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["features.3.weight"][0, 0, 0, :2] = float("nan")
    sd["head.bias"][1] = float("inf")
    torch.save({"model_state_dict": sd, "ema": src.state_dict()}, tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


def test_inspector_scan_marks_rows_with_nan_or_inf(nan_file):
    model = SmallCNN(num_classes=10)
    insp = cv.CheckpointInspector(model=model, path=nan_file)
    df = insp.table.shown()
    assert (df["nan/inf"] == "").all()  # nothing is read before asked
    insp.scan_panel.scan_button.click()
    assert insp.scan_panel.progress.value == 1.0 and insp.scan_panel.progress.layout.visibility == "hidden"
    stats = insp.scan_panel.stats
    assert len(stats) == len(model.state_dict()) and stats.loc["features.3.weight", "nan"] == 2
    assert f"2 of {len(stats)} tensors hold NaN or Inf" in insp.scan_panel.message.value
    marked = insp.table.shown().set_index("key")["nan/inf"]
    assert "NaN 2" in marked["features.3.weight"] and "ckptviz-nonfinite" in marked["features.3.weight"]
    assert "Inf 1" in marked["head.bias"]
    assert (marked.drop(["features.3.weight", "head.bias"]) == "").all()

    insp.load_all_button.click()  # the same report: the marks stay
    assert "NaN 2" in insp.table.shown().set_index("key").loc["features.3.weight", "nan/inf"]
    insp.section.value = "ema"  # another section: the scan no longer applies
    assert insp.scan_panel.stats is None and insp.scan_panel.message.value == ""
    assert (insp.table.shown()["nan/inf"] == "").all()
    insp.scan_panel.scan_button.click()
    assert "no NaN or Inf" in insp.scan_panel.message.value


def test_inspector_warns_on_a_selected_row_with_nan(nan_file):
    model = SmallCNN(num_classes=10)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    insp = cv.CheckpointInspector(model=model, path=nan_file)
    frame = insp.report.frame
    insp.table.select([frame.index[frame["key"] == "features.3.weight"][0]])
    assert "ckptviz-nonfinite" in insp.tensor_panel.header.value
    assert "the checkpoint tensor holds NaN 2" in insp.tensor_panel.header.value
    insp.table.select([frame.index[frame["key"] == "head.weight"][0]])
    assert "the model tensor holds NaN 1" in insp.tensor_panel.header.value
    assert "checkpoint tensor" not in insp.tensor_panel.header.value
    insp.table.select([frame.index[frame["key"] == "features.0.weight"][0]])
    assert "ckptviz-nonfinite" not in insp.tensor_panel.header.value


def test_inspector_layer_overview(nan_file, tmp_path):
    insp = cv.CheckpointInspector(model=SmallCNN(num_classes=10), path=nan_file)
    panel = insp.scan_panel
    assert panel.output.layout.display == "none"
    panel.overview.value = True
    assert panel.output.layout.display == "" and png_of(panel.output).startswith(PNG_MAGIC)
    std_ax, l2_ax = panel.figure.axes
    assert len(std_ax.containers[0]) == len(SmallCNN().state_dict())
    assert [t.get_text() for t in std_ax.get_yticklabels()][0] == "features.0.weight"
    assert "nan.pt [model_state_dict]" in panel.figure._suptitle.get_text()
    assert "NaN" in panel.message.value  # the overview scanned the section, so the table is marked too
    assert "NaN 2" in insp.table.shown().set_index("key").loc["features.3.weight", "nan/inf"]
    panel.overview.value = False
    assert panel.output.layout.display == "none"

    torch.save(SmallCNN().state_dict(), tmp_path / "other.pt")
    panel.overview.value = True
    insp.open_file(tmp_path / "other.pt")  # a new file: the overview is closed and forgotten
    assert panel.overview.value is False and panel.figure is None and panel.output.outputs == ()
    empty = cv.CheckpointInspector()
    empty.scan_panel.overview.value = True  # no checkpoint: says so, stays off
    assert empty.scan_panel.overview.value is False and "Open a checkpoint first" in empty.scan_panel.message.value


def test_numbers_never_round_a_change_away():
    from ckptviz.widgets.diff_view import number

    assert number(0.999986) == "0.999986" and number(-0.9999999) == "-1.000000"
    assert number(1.0) == "1" and number(0.51724) == "0.5172" and number(30.0) == "30"
    assert number(4.2741e-3) == "0.004274" and number(float("nan")) == "nan"


# ---- the teaching notebook ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def comparing(kernel_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    return execute("04_comparing_checkpoints.ipynb", kernel_dir, tmp_path_factory.mktemp("nb04"))


def test_notebook_04_runs_and_says_what_fine_tuning_changed(comparing):
    assert_ran_cleanly(comparing)
    out = text(cell(comparing, '("base.pt", "finetuned.pt")\nprint(rep)'))
    assert "DiffReport('base.pt' [model] vs 'finetuned.pt' [model], both=18, values changed in 10)" in out
    assert "sections: model vs model   rules: [('^module\\\\.', '')]" in out
    top = re.findall(r"^\d+\s+(\S+)\s+module\.", out, re.MULTILINE)  # the by_change() head: BatchNorm bookkeeping
    assert top[:2] == ["features.1.num_batches_tracked", "features.4.num_batches_tracked"], out
    assert all(".running_" in k or "num_batches_tracked" in k for k in top[:4]), out
    out = text(cell(comparing, 'print("unchanged:"'))
    assert f"unchanged: {FROZEN}" in out
    frac = int(out.split("classifier.1.weight: ")[1].split("%")[0])
    assert 10 < frac < 90, out  # the rows behind ReLU units that never fired got no gradient
    (report,) = [c for c in comparing.cells if c.cell_type == "code" and c.source.strip() == "rep"]
    html = next(o.data["text/html"] for o in report.outputs if "text/html" in o.get("data", {}))
    assert "ckptviz-diff" in html and "values changed in 10 of 18 compared tensors" in html


def test_notebook_04_figures_ema_and_widget(comparing):
    for snippet in ("diff_bar_figure(rep.frame", "overlay_and_difference_figure(histogram(ta", "layer_summary_figure("):
        assert "image/png" in mimetypes(cell(comparing, snippet)), snippet
    out = text(cell(comparing, 'section_a="model", section_b="ema"'))
    assert "[model] vs 'finetuned.pt' [ema], both=18, values changed in 8)" in out  # frozen weights equal
    c = cell(comparing, "diff_widget = CheckpointDiff(")
    assert {WIDGET_VIEW, "text/html"} <= mimetypes(c)
    html = next(o.data["text/html"] for o in c.outputs if "text/html" in o.get("data", {}))
    assert "ckptviz-diff" in html and "classifier.1.weight" in html  # the static export shows the report
    assert "values changed in 10" in text(cell(comparing, "print(diff_widget.report)"))
