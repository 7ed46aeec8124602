"""The one table machinery (Pager + sources + KeyTable) driven from Python, the way the browser's
messages drive it: pages, search, sort, fold, expand, group selection; and the inspector's
checkpoint-only view, a model picked later and removed, and a failed open after a good one."""

import json

import numpy as np
import torch
from models import SmallCNN, randomized
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv
from ckptviz.widgets.pager import GROUP, ROW, Pager
from ckptviz.widgets.table import ReportSource, ReportTable


class Experts(nn.Module):
    def __init__(self, layers: int = 4, experts: int = 8):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(experts))
            self.layers.append(layer)
        self.head = nn.Linear(2, 3)


def moe_report(mismatch: str = "layers.2.experts.5.weight"):
    model = Experts()
    sd = model.state_dict()
    sd[mismatch] = torch.zeros(3, 2)
    return model, cv.compare(model, sd)


def send(table, **msg):
    table._on_msg(table.view, msg, [])
    json.dumps(table.view.rows)  # what the browser gets is plain JSON (numpy scalars are not)


def test_the_browser_gets_one_page_and_paging_walks_the_rest():
    _, rep = moe_report()
    table = ReportTable()
    table.show(rep)
    assert len(rep.frame) == 66 and not table.pager.is_folded  # flat below the fold threshold
    assert len(table.view.rows) == 15 and table.view.pages == 5
    assert table.view.info.startswith("1–15 of 66 rows")
    seen = [r["cells"][0] for r in table.view.rows]
    for page in range(1, 5):
        send(table, type="page", page=page)
        seen += [r["cells"][0] for r in table.view.rows]
    assert seen == rep.frame["key"].tolist()
    send(table, type="page", page=99)  # clamped
    assert table.view.page == 4
    send(table, type="page_size", size=50)
    assert len(table.view.rows) == 50 or table.view.page == 1


def test_search_filter_and_sort_happen_in_the_kernel():
    _, rep = moe_report()
    table = ReportTable()
    table.show(rep)
    table.view.search = r"layers\.1\.experts\.[0-3]\.bias"  # as the browser's debounced box sets it
    assert [r["cells"][0] for r in table.view.rows] == [f"layers.1.experts.{i}.bias" for i in range(4)]
    assert "filtered from 66 rows" in table.view.info
    table.view.search = "EXPERTS.7.WEIGHT"  # plain text, any case
    assert len(table.view.rows) == 4
    table.view.search = "layers.1.experts.1["  # not a valid regex: plain text
    assert table.view.rows == [] and "0 of 0" in table.view.info
    table.view.search = ""
    table.filter.value = "shape_mismatch"
    assert [r["cells"][0] for r in table.view.rows] == ["layers.2.experts.5.weight"]
    table.filter.value = "all"
    send(table, type="sort", column="ckpt_shape")
    send(table, type="sort", column="ckpt_shape")  # a second click: descending
    assert table.view.sort == ["ckpt_shape", False]
    # the largest checkpoint shapes first, equal shapes in frame order
    assert [r["cells"][0] for r in table.view.rows[:2]] == ["layers.2.experts.5.weight", "head.weight"]


def test_selection_survives_pages_and_filters_and_shift_selects_a_range():
    _, rep = moe_report()
    table = ReportTable()
    table.show(rep)
    calls = []
    table.register_callback(lambda t: calls.append(list(t.selected)))
    first = table.view.rows[2]["id"]
    send(table, type="click", kind="row", id=first)
    send(table, type="click", kind="row", id=table.view.rows[5]["id"], extend=True)
    assert table.selected == list(rep.frame.index[2:6]) and calls
    send(table, type="page", page=2)
    send(table, type="click", kind="row", id=table.view.rows[0]["id"], toggle=True)
    assert len(table.selected) == 5 and table.focus == rep.frame.index[30]
    table.filter.value = "shape_mismatch"  # hidden rows stay selected
    assert len(table.selected) == 5
    table.filter.value = "all"
    send(table, type="page", page=0)
    assert [r["sel"] for r in table.view.rows[:7]] == [0, 0, 1, 1, 1, 1, 0]


def test_folded_groups_count_statuses_expand_and_select_as_a_whole():
    model, rep = moe_report()
    table = ReportTable()
    table.show(rep)
    table.fold.value = True
    rows = table.view.rows
    assert [r["kind"] for r in rows] == ["group", "group", "row", "row"]
    weight = rows[0]
    assert "layers.{0-3}.experts.{0-7}.weight" in weight["cells"][0] and "(32 keys)" in weight["cells"][0]
    status = weight["cells"][2]
    assert "match</span> 31" in status and "shape_mismatch</span> 1" in status
    assert weight["cells"][4] == "(2, 2) | (3, 2)"  # every distinct checkpoint shape
    json.dumps(rows)
    send(table, type="expand", id=weight["id"])
    assert [r["kind"] for r in table.view.rows[:3]] == ["group", "row", "row"] and table.view.rows[0]["open"]
    assert len(table.view.rows) == 15 and table.view.pages == 3
    send(table, type="click", kind="group", id=weight["id"])
    assert len(table.selected) == 32 and table.view.rows[0]["sel"] == 1
    keys = [rep.frame.loc[label, "key"] for label in table.selected]
    result = cv.load_partial(model, rep, keys=[k for k in keys if k in rep.loadable])
    assert len(result.loaded) == 31
    table.show(rep, loaded=set(result.loaded))  # the same rows: selection and expansion kept
    assert len(table.selected) == 32 and "✓ 31" in table.view.rows[0]["cells"][10]
    table.view.search = "experts.5.weight"  # a group under a search: only its passing rows
    assert table.view.rows[0]["kind"] == "group" and "(4 keys)" in table.view.rows[0]["cells"][0]


def test_big_reports_fold_by_default_and_report_their_patterns():
    model = Experts(layers=30, experts=40)
    rep = cv.compare(model, model.state_dict())
    assert len(rep.frame) > 2000
    pager = Pager()
    pager.set_source(ReportSource(rep, set(), {}))
    view = pager.view()
    assert pager.is_folded and "4 layer patterns" in view["info"]
    kinds, ids = pager.items()
    assert list(kinds) == [GROUP, GROUP, ROW, ROW]
    pager.click(GROUP, int(ids[1]))
    assert len(pager.selected) == 1200
    pager.folded = False
    assert len(pager.view()["rows"]) == 15


def test_checkpoint_only_view_then_model_then_back(tmp_path):
    src = randomized(SmallCNN(num_classes=10), seed=1)
    sd = src.state_dict()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    insp = cv.CheckpointInspector(path=path)
    assert insp.error is None and insp.report is None
    frame = insp.table.checkpoint_frame
    assert len(frame) == len(sd) and list(insp.table.view.columns[:4]) == ["key", "shape", "dtype", "device"]
    insp.table.view.search = "features.0.weight"
    assert insp.table.view.rows[0]["cells"][:3] == ["features.0.weight", "(8, 1, 3, 3)", "float32"]
    insp.table.view.search = ""
    assert f"{len(sd)} tensors" in insp.table.counts.value and "checkpoint only" in insp.table.counts.value
    assert insp.sizes.table.value == ""  # computed when asked for
    insp.sizes.by.value = "layer"
    assert "<td title='head'>head</td>" in insp.sizes.table.value  # what the bytes are made of
    insp.sizes.by.value = "dtype"
    assert "float32" in insp.sizes.table.value and "int64" in insp.sizes.table.value
    insp.table.select([frame.index[frame["key"] == "head.weight"][0]])
    assert "head.weight" in insp.tensor_panel.header.value and "(10, 16)" in insp.tensor_panel.header.value
    insp.scan_panel.scan()
    assert "NaN 1" in insp.table.shown().set_index("key").loc["features.0.weight", "nan/inf"]
    insp.set_model(SmallCNN(num_classes=10))  # a model picked later: the same view compares
    assert insp.report is not None and insp.report.summary["match"] == len(sd)
    assert insp.table.view.columns[2] == "status"
    insp.model_picker.set_model(None)  # the model removed: back to the checkpoint alone
    assert insp.report is None and insp.table.checkpoint_frame is not None


def test_failed_open_after_a_good_one_clears_the_previous_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"epoch": 7, "state_dict": SmallCNN().state_dict()}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    insp = cv.CheckpointInspector(path=good)
    assert "epoch" in insp.meta.value and len(insp.table.view.rows) == 15
    insp.open_file(bad)
    assert insp.checkpoint is None and insp.meta.value == "" and insp.section.options == ()
    assert insp.table.view.rows == [] and insp.table.source is None
    assert "bad.pt" in insp.error and insp.error.startswith("Could not open")
    assert "bad.pt" in insp.message.value


def test_search_over_half_a_million_keys_is_column_work():
    keys = np.array([f"model.layers.{i // 8000}.mlp.experts.{i % 8000}.w" for i in range(500_000)], dtype=object)
    import pandas as pd

    from ckptviz.widgets.pager import TableSource, search_mask

    src = TableSource(pd.DataFrame({"key": keys}))
    m = search_mask(src.haystack(), r"layers\.3\.mlp\.experts\.7\d\d\.w$")
    assert int(m.sum()) == 100
