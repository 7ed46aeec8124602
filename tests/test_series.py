"""``diff_series`` on real training runs saved with torch.save and safetensors: natural and metadata order,
every number against its formula, flags at the right checkpoint, keys renamed or added mid-run, bounded
key groups giving the same numbers, plots of a thousand layers, and the ``ckptviz series`` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from series_runs import save_run

import ckptviz as cv
from ckptviz import series as series_mod
from ckptviz.demo import DigitsCNN
from ckptviz.errors import CheckpointNotFoundError, SectionError

EPOCHS = 11  # epoch=10 and epoch=11 sort after epoch=9 only naturally


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A real short training run: the first conv frozen, the head blown up at epoch 9 and a NaN at epoch 10."""
    folder = tmp_path_factory.mktemp("run")
    saved = save_run(folder, EPOCHS, blow_up_from=9, nan_at=10)
    (folder / "notes.txt").write_text("not a checkpoint")
    return folder, saved


@pytest.fixture(scope="module")
def series(run) -> series_mod.SeriesReport:
    return cv.diff_series(run[0])


def test_folder_is_read_in_step_order_with_labels_and_steps(series):
    assert series.labels == [f"epoch={e}.ckpt" for e in range(1, EPOCHS + 1)]
    assert series.steps == [4 * e for e in range(1, EPOCHS + 1)]
    assert series.keys == list(DigitsCNN(10).state_dict())
    assert len(series.frame) == len(series.keys) * EPOCHS
    assert "SeriesReport(11 checkpoints 'epoch=1.ckpt' .. 'epoch=11.ckpt'" in repr(series)


def test_every_number_matches_its_formula(run, series):
    _, saved = run
    for metric in ("norm", "rel_change", "max_abs_change", "changed_frac"):
        m = series.matrix(metric)
        for key in ("features.3.weight", "classifier.1.bias", "features.1.running_var"):
            for j in range(EPOCHS):
                cur = saved[j][key].double()
                if metric == "norm":
                    want = torch.linalg.vector_norm(cur).item()
                elif j == 0:
                    assert math.isnan(m.loc[key].iloc[0])  # the first checkpoint has no reference
                    continue
                else:
                    prev = saved[j - 1][key].double()
                    want = {"rel_change": (torch.linalg.vector_norm(cur - prev) / torch.linalg.vector_norm(prev)),
                            "max_abs_change": (cur - prev).abs().max(),
                            "changed_frac": (cur != prev).double().mean()}[metric].item()
                assert m.loc[key].iloc[j] == pytest.approx(want, rel=1e-9, abs=1e-12), (metric, key, j)


def test_reference_first_compares_with_the_first_checkpoint(run):
    folder, saved = run
    first = cv.diff_series(folder, reference="first")
    key = "classifier.1.weight"
    for j in range(1, EPOCHS):
        d = saved[j][key].double() - saved[0][key].double()
        want = (torch.linalg.vector_norm(d) / torch.linalg.vector_norm(saved[0][key].double())).item()
        assert first.matrix().loc[key].iloc[j] == pytest.approx(want, rel=1e-9)
    assert first.reference_of(5) == 0 and cv.diff_series(folder).reference_of(5) == 4


def test_flags_name_the_frozen_layer_the_blow_up_and_the_nan(series):
    flags = series.flags
    frozen = set(flags[flags["flag"] == "frozen"]["key"])
    assert frozen == {"features.0.weight", "features.0.bias"}
    exploding = flags[flags["flag"] == "norm_exploding"]
    assert list(exploding["key"]) == ["head.weight"] and exploding["label"].iloc[0] == "epoch=9.ckpt"
    assert "x5" in exploding["detail"].iloc[0]  # x50 jump, stated
    nan = flags[flags["flag"] == "nonfinite"]
    assert list(nan["key"]) == ["head.bias"] and nan["checkpoint"].iloc[0] == 9
    assert nan["detail"].iloc[0] == "1 NaN/Inf elements (none at epoch=9.ckpt)"
    # counters grow by design: num_batches_tracked is never "exploding"
    assert not flags["key"].str.endswith("num_batches_tracked").any()
    assert series.summary == {"checkpoints": EPOCHS, "keys": 18, "frozen": 2, "norm_exploding": 1, "nonfinite": 1}
    # the norm is of the finite values, and the NaN is counted where it is
    assert series.matrix("nonfinite").loc["head.bias"].tolist() == [0.0] * 9 + [1.0, 0.0]
    assert math.isfinite(series.matrix("norm").loc["head.bias"].iloc[9])


def test_pair_opens_the_detailed_diff_of_a_checkpoint_and_its_reference(run, series):
    folder, saved = run
    d = series.pair(8)
    assert d.a.path.endswith("epoch=8.ckpt") and d.b.path.endswith("epoch=9.ckpt")
    row = d.frame.set_index("key").loc["head.weight"]
    assert row["rel_l2"] == pytest.approx(series.matrix().loc["head.weight"].iloc[8], rel=1e-12)
    with pytest.raises(SectionError, match="first of the series"):
        series.pair(0)
    assert series.pair(0, other=3).b.path.endswith("epoch=1.ckpt")


def test_folded_rel_change_is_the_change_of_the_group_as_one_tensor(run):
    folder, saved = run
    s = cv.diff_series(folder)
    folded = s.folded("rel_change")
    pattern = next(p for p in folded.index if p.startswith("features.{") and p.endswith(".weight"))
    keys = [k for k in s.keys if k.startswith("features.") and k.endswith(".weight")]
    j = 4
    num = sum(torch.linalg.vector_norm(saved[j][k].double() - saved[j - 1][k].double()) ** 2 for k in keys)
    den = sum(torch.linalg.vector_norm(saved[j - 1][k].double()) ** 2 for k in keys)
    assert folded.loc[pattern].iloc[j] == pytest.approx(math.sqrt(num / den), rel=1e-9)
    norms = s.folded("norm")
    want = math.sqrt(sum(torch.linalg.vector_norm(saved[j][k].double()) ** 2 for k in keys))
    assert norms.loc[pattern].iloc[j] == pytest.approx(want, rel=1e-9)


def test_small_key_groups_give_the_same_numbers(run, series, monkeypatch):
    monkeypatch.setattr(series_mod, "GROUP_BYTES", 1)  # every key read alone: memory of one tensor per side
    alone = cv.diff_series(run[0])
    for metric in series_mod.METRICS:
        np.testing.assert_array_equal(alone.arrays[metric], series.arrays[metric])


def test_order_by_metadata_when_names_carry_no_step(tmp_path):
    t = torch.zeros(3)
    for name, step in (("best.pt", 30), ("last.pt", 50), ("first.pt", 10)):
        torch.save({"global_step": step, "state_dict": {"w": t + step}}, tmp_path / name)
    s = cv.diff_series(tmp_path)
    assert s.labels == ["first.pt", "best.pt", "last.pt"] and s.steps == [10, 30, 50]
    assert cv.diff_series(tmp_path, order="natural").labels == ["best.pt", "first.pt", "last.pt"]
    given = [tmp_path / "last.pt", tmp_path / "first.pt"]
    assert cv.diff_series(given).labels == ["last.pt", "first.pt"]  # a list keeps the order it was given in


def test_keys_renamed_added_or_reshaped_mid_run(tmp_path):
    torch.manual_seed(0)
    w, b = torch.randn(4, 3), torch.randn(4)
    save_file({"fc.weight": w, "fc.bias": b}, tmp_path / "step_1.safetensors")
    save_file({"module.fc.weight": w + 1, "module.fc.bias": b}, tmp_path / "step_2.safetensors")  # DataParallel
    save_file({"fc.weight": w + 1, "fc.bias": torch.randn(5), "extra.weight": torch.ones(2)},
              tmp_path / "step_3.safetensors")
    s = cv.diff_series(tmp_path)
    assert s.keys == ["fc.bias", "fc.weight", "extra.weight"]  # safetensors stores keys sorted
    status = s.frame.set_index(["key", "checkpoint"])["status"]
    assert status["fc.weight", 1] == "present" and status["fc.bias", 2] == "shape_differs"
    assert status["extra.weight", 0] == "absent" and status["extra.weight", 2] == "present"
    rel = s.matrix()
    assert rel.loc["fc.weight"].iloc[1] == pytest.approx((torch.linalg.vector_norm(torch.ones(4, 3))
                                                           / torch.linalg.vector_norm(w)).item(), rel=1e-6)
    assert rel.loc["fc.weight"].iloc[2] == 0.0 and math.isnan(rel.loc["fc.bias"].iloc[2])
    assert s.matrix("norm").loc["fc.bias"].iloc[2] > 0  # a reshaped tensor still has its norm


def test_errors_name_the_folder_and_what_to_do(tmp_path, run):
    with pytest.raises(CheckpointNotFoundError, match=r"0 checkpoint\(s\) in .*a series needs two or more"):
        cv.diff_series(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="is one checkpoint file"):
        cv.diff_series(run[0] / "epoch=1.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="is not a folder"):
        cv.diff_series(tmp_path / "nope")
    hub = tmp_path / "hub"
    hub.mkdir()
    for i in (1, 2):
        save_file({f"w{i}": torch.ones(2)}, hub / f"model-0000{i}-of-00002.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="is one checkpoint .* not a run"):
        cv.diff_series(hub)
    with pytest.raises(SectionError, match="reference must be"):
        cv.diff_series(run[0], reference="last")


def test_run_folder_of_checkpoint_folders(tmp_path):
    for step in (500, 1000, 1500):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.full((3,), float(step))}, d / "model.safetensors")
    s = cv.diff_series(tmp_path)
    assert s.labels == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"] and s.steps == [500, 1000, 1500]
    assert s.matrix().loc["w"].tolist()[1:] == pytest.approx([1.0, 0.5])


def test_plots_of_a_thousand_layers_stay_readable(tmp_path):
    for step in range(3):
        save_file({f"blocks.{i}.{n}": torch.full((4,), float(i + step * (n == "weight")))
                   for i in range(500) for n in ("weight", "bias")}, tmp_path / f"s{step}.safetensors")
    s = cv.diff_series(tmp_path)
    assert len(s.keys) == 1000 and list(s.folded().index) == ["blocks.{0-499}.bias", "blocks.{0-499}.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = s.heatmap()  # folded by default above 60 keys
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(s.folded().index)
        flat = s.heatmap(fold=False)
        assert len(flat.axes[0].get_yticklabels()) == 60 and "1000 rows merged into 60" in flat.axes[0].get_xlabel()
        norms = s.norms_plot(fold=False)
        assert len(norms.axes[0].collections[0].get_segments()) == 1000
        from ckptviz.plots import figure_to_png

        assert figure_to_png(fig)[:4] == b"\x89PNG" and figure_to_png(norms)[:4] == b"\x89PNG"


def test_cli_series_gates_on_flags_and_prints_json(run):
    folder, _ = run

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ckptviz", "series", *args], capture_output=True, text=True,
                              timeout=300, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})

    r = cli(str(folder), "--json", "--fail-on", "nonfinite")
    assert r.returncode == 1, r.stderr
    data = json.loads(r.stdout)
    assert data["labels"][-2:] == ["epoch=10.ckpt", "epoch=11.ckpt"] and data["failed_on"] == ["nonfinite"]
    found = {(f["key"], f["flag"]) for f in data["flags"]}
    assert found >= {("head.bias", "nonfinite"), ("head.weight", "norm_exploding")}
    assert data["layers"][0]["key"] == "head.weight"
    r = cli(str(folder))
    assert r.returncode == 0 and "frozen: 2  norm_exploding: 1  nonfinite: 1" in r.stdout
    assert "features.0.weight" in r.stdout and "\x1b[" not in r.stdout  # no colour when piped
    r = cli(str(folder / "epoch=1.ckpt"))
    assert r.returncode == 2 and "is one checkpoint file" in r.stderr and "Traceback" not in r.stderr
    r = cli(str(folder), "--html", str(folder.parent / "run-report.html"), "--quiet")
    assert r.returncode == 0 and (folder.parent / "run-report.html").is_file(), r.stderr
    assert "wrote" in r.stderr and "run-report.html" in r.stderr
    r = cli(str(folder), "--html", str(folder.parent / "run.txt"))
    assert r.returncode == 2 and "should end in .html" in r.stderr and not (folder.parent / "run.txt").exists()


def test_html_report_of_a_run_holds_its_flags_and_figures(run, series, tmp_path):
    from test_html_report import Page, assert_self_contained

    text = series.to_html(tmp_path / "run.html").read_text()
    assert_self_contained(text)
    page = Page(text)
    assert "ckptviz series: " + str(run[0]) in text and "Rename rules" not in text
    body = [r for r in page.rows if len(r) == 4 and r[0] != "key"]
    assert [(r[0], r[1], r[2]) for r in body] == [(k, f, "—" if pd.isna(lab) else lab) for k, f, lab in
                                                 series.flags[["key", "flag", "label"]].itertuples(index=False)]
    assert len([a for a in page.named("img") if a["src"].startswith("data:image/png;base64,")]) == 2
    assert "x10 from one checkpoint to the next" in text
