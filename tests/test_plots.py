"""Figures render headless to PNG, say what they show in their legends, and share one look."""

import warnings

import matplotlib as mpl
import pytest
import torch
from matplotlib.figure import Figure

from ckptviz.plots import STYLE, colors_for, figure_to_png, histogram_figure, shorten_key, stat_figure
from ckptviz.stats import stats_frame, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.fixture
def hists():
    ckpt = torch.randn(20_000, dtype=torch.bfloat16)
    ckpt[:3] = float("nan")
    ckpt[3] = float("inf")
    model = torch.randn(20_000) * 1.5
    return {"checkpoint": summarize(ckpt, range=(-4, 4))[1], "model": summarize(model, range=(-4, 4))[1]}


@pytest.mark.parametrize("log", [False, True])
def test_overlaid_histograms_render_with_counts_in_the_legend(hists, log):
    rc_before = dict(mpl.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = histogram_figure(hists, title="model.layers.0.mlp.down_proj.weight", log=log)
        png = figure_to_png(fig)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    texts = legend_texts(fig)
    assert texts[0].startswith("checkpoint (n=") and "NaN 3" in texts[0] and "Inf 1" in texts[0]
    assert texts[1].startswith("model (n=") and "NaN" not in texts[1] and "outside" in texts[1]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "value" and ax.get_ylabel().startswith("count")
    assert ax.get_yscale() == ("log" if log else "linear")
    assert ax.get_title() == "model.layers.0.mlp.down_proj.weight"
    assert dict(mpl.rcParams) == rc_before  # the style is applied per figure, never globally


def test_one_look_for_every_figure(hists):
    frame = stats_frame({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(50) * (i + 1) for i in range(6)})
    figs = [histogram_figure({"only": hists["model"]}), stat_figure({"checkpoint": frame, "model": frame * 2}),
            stat_figure(frame, "abs_max", log=True)]
    for fig in figs:
        assert tuple(fig.get_size_inches()) == STYLE["figsize"]
        assert figure_to_png(fig).startswith(PNG_MAGIC)
    colors = colors_for(["checkpoint", "model", "a", "b"])
    assert colors["checkpoint"] == STYLE["colors"]["checkpoint"] and colors["model"] == STYLE["colors"]["model"]
    assert len(set(colors.values())) == 4
    line_colors = [line.get_color() for line in figs[1].axes[0].get_lines()]
    assert line_colors == [STYLE["colors"]["checkpoint"], STYLE["colors"]["model"]]
    labels = [t.get_text() for t in figs[1].axes[0].get_xticklabels()]
    assert labels[0] == "…layers.0.mlp.up_proj.weight"


def test_empty_and_non_finite_inputs_still_render():
    empty = summarize(torch.empty(0))[1]
    nans = summarize(torch.full((4,), float("nan")))[1]
    for hs in ({}, {"checkpoint": empty}, {"checkpoint": nans}):
        for log in (False, True):
            assert figure_to_png(histogram_figure(hs, log=log)).startswith(PNG_MAGIC)
    assert "NaN 4" in legend_texts(histogram_figure({"checkpoint": nans}))[0]


def test_shorten_key_cuts_from_the_left_at_a_component():
    key = "model.decoder.layers.31.mlp.down_proj.weight"
    assert shorten_key(key, 60) == key
    assert shorten_key(key, 32) == "…layers.31.mlp.down_proj.weight"
    assert shorten_key(key) == "…decoder.layers.31.mlp.down_proj.weight"
    for width in range(1, 50):
        short = shorten_key(key, width)
        assert len(short) <= width
        assert short == key or (short.startswith("…") and key.endswith(short[1:]))
    assert shorten_key("x" * 100, 10) == "…" + "x" * 9  # no component boundary: a plain cut
    assert shorten_key("a.verylongcomponentname.w", 12) == "…onentname.w"  # a boundary would leave only "w"
