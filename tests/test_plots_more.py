"""The per-layer and diff figures: rendered headless to PNG, one bar (or point) per layer in model order,
labelled with readable keys, flags and notes where the data asks for them, and the overlaid histograms
beside the histogram of the difference."""

import warnings

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from matplotlib.figure import Figure
from models import SmallCNN, randomized
from torch import nn

from ckptviz.diff import diff
from ckptviz.plots import (
    LABELLED_MAX,
    SPARSE_LABELS,
    diff_bar_figure,
    figure_to_png,
    layer_summary_figure,
    overlay_and_difference_figure,
    shorten_key,
)
from ckptviz.stats import histogram, stats_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def render(fig: Figure) -> bytes:
    """PNG bytes of ``fig``, failing on any warning (missing glyphs, layout trouble) and on global rc changes."""
    before = dict(mpl.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = figure_to_png(fig)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert dict(mpl.rcParams) == before
    return png


def bars(ax) -> int:
    return sum(len(c) for c in ax.containers)


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


@pytest.fixture(scope="module")
def small_stats():
    """stats_frame of a small CNN's state dict, with a NaN in one conv weight and one layer zeroed."""
    sd = {k: v.clone() for k, v in randomized(SmallCNN(), seed=0).state_dict().items()}
    sd["features.3.weight"][0, 0, 0, 0] = float("nan")
    sd["features.0.bias"].zero_()
    return stats_frame(sd)


@pytest.fixture(scope="module")
def resnet_stats():
    torch.manual_seed(0)
    return stats_frame(torchvision.models.resnet18(weights=None).state_dict())


def test_layer_summary_few_keys_are_labelled_horizontal_bars(small_stats):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = layer_summary_figure(small_stats, title="SmallCNN")
    render(fig)
    keys = list(small_stats.index)
    assert len(keys) <= LABELLED_MAX and len(fig.axes) == 2
    std_ax, l2_ax = fig.axes
    assert bars(std_ax) == bars(l2_ax) == len(keys)
    assert tick_texts(std_ax.get_yticklabels()) == [shorten_key(k, 36) for k in keys]  # model order, top down
    assert std_ax.get_ylim()[0] > std_ax.get_ylim()[1]  # inverted: the first layer on top
    assert std_ax.get_xlabel() == "std" and l2_ax.get_xlabel() == "L2 norm"
    assert fig._suptitle.get_text() == "SmallCNN"
    # bar lengths are the frame's values, in order (NaN drawn as an empty bar)
    widths = [p.get_width() for p in std_ax.containers[0]]
    assert np.allclose(widths, np.nan_to_num(small_stats["std"].to_numpy()))
    assert legend_texts(std_ax) == ["all zeros", "holds NaN/Inf"]


def test_layer_summary_many_keys_use_an_index_axis_with_sparse_labels(resnet_stats):
    fig = layer_summary_figure(resnet_stats.reset_index(), columns=("std", "l2", "abs_max"), title="resnet18")
    render(fig)
    n = len(resnet_stats)
    assert n > LABELLED_MAX and len(fig.axes) == 3
    for ax, label in zip(fig.axes, ["std", "L2 norm", "max |value|"]):
        (line,) = ax.get_lines()
        assert len(line.get_xdata()) == n and ax.get_ylabel() == label
    bottom = fig.axes[-1]
    labels = tick_texts(bottom.get_xticklabels())
    assert 2 <= len(labels) <= SPARSE_LABELS
    assert labels[0] == "0: conv1.weight" and labels[-1] == f"{n - 1}: fc.bias"
    assert bottom.get_xlabel() == f"layer index, in model order ({n} tensors)"


def test_layer_summary_log_scale_when_values_span_decades():
    frame = stats_frame({f"blocks.{i}.weight": torch.randn(64) * 10.0 ** i for i in range(6)})
    assert layer_summary_figure(frame).axes[0].get_xscale() == "log"
    assert layer_summary_figure(frame, log=False).axes[0].get_xscale() == "linear"
    flat = stats_frame({f"blocks.{i}.weight": torch.randn(64) for i in range(6)})
    assert layer_summary_figure(flat).axes[0].get_xscale() == "linear"
    render(layer_summary_figure(frame.iloc[:0]))  # no tensors still renders


@pytest.fixture(scope="module")
def diff_frame():
    """A real DiffReport frame: a fine-tuned copy (head and last conv changed), one key only in a, one only in b."""
    base = randomized(SmallCNN(), seed=1)
    tuned = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        tuned["head.weight"] += 0.1 * torch.randn_like(tuned["head.weight"])
        tuned["features.3.weight"] *= 1.001
    a = dict(base.state_dict())
    del tuned["features.4.num_batches_tracked"]
    tuned["extra.scale"] = torch.ones(3)
    return diff(a, tuned).frame


def test_diff_bars_one_per_compared_layer_in_model_order(diff_frame):
    fig = diff_bar_figure(diff_frame, title="base → tuned")
    render(fig)
    (ax,) = fig.axes
    compared = diff_frame[diff_frame["rel_l2"].notna()]
    assert bars(ax) == len(compared) and len(compared) == len(diff_frame) - 2
    assert tick_texts(ax.get_yticklabels()) == list(compared["key"])
    assert [p.get_width() for p in ax.containers[0]] == pytest.approx(list(compared["rel_l2"]))
    assert ax.get_xlabel().startswith("relative change ||b − a|| / ||a||")
    assert "2 not compared" in ax.get_xlabel()
    assert ax.get_title() == "base → tuned"


def test_diff_bars_top_keeps_model_order_and_log_scale(diff_frame):
    fig = diff_bar_figure(diff_frame, top=2, log=True)
    render(fig)
    (ax,) = fig.axes
    assert tick_texts(ax.get_yticklabels()) == ["features.3.weight", "head.weight"]  # the two changed, in order
    assert ax.get_xscale() == "log" and "top 2 of" in ax.get_xlabel()
    cos = diff_bar_figure(diff_frame, column="cosine", top=1)  # for cosine the most changed is the smallest
    assert tick_texts(cos.axes[0].get_yticklabels()) == ["head.weight"]
    assert cos.axes[0].get_xlabel().startswith("cosine similarity")


def test_diff_bars_many_layers_on_an_index_axis():
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None)
    tuned = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    frame = diff(base, tuned).frame
    fig = diff_bar_figure(frame)
    render(fig)
    (ax,) = fig.axes
    n = len(frame)
    zero_in_base = int(np.isinf(frame["rel_l2"]).sum())  # biases and BatchNorm means start at zero
    assert n > LABELLED_MAX and zero_in_base > 0
    assert bars(ax) == n - zero_in_base
    labels = tick_texts(ax.get_xticklabels())
    assert labels[0] == "0: conv1.weight" and len(labels) <= SPARSE_LABELS
    assert ax.get_xlabel().startswith(f"layer index, in model order ({n} keys)")
    assert f"{zero_in_base} infinite: zero in a, not in b" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("relative change")


def test_diff_bars_of_ten_thousand_keys_are_lines_at_their_values():
    n = 10_000
    rel = np.linspace(1e-4, 1.0, n)
    rel[7] = 0.0  # unchanged
    rel[9] = np.nan  # not compared
    frame = pd.DataFrame({"key": [f"layers.{i}.weight" for i in range(n)], "rel_l2": rel})
    for log in (False, True):
        fig = diff_bar_figure(frame, log=log)
        render(fig)
        (ax,) = fig.axes
        assert bars(ax) == 0 and len(ax.collections) == 1
        segments = ax.collections[0].get_segments()
        assert len(segments) == n - 1  # the NaN has no line
        tops = np.array([seg[1] for seg in segments])
        expected_x = np.delete(np.arange(n), 9)
        np.testing.assert_array_equal(tops[:, 0], expected_x)
        np.testing.assert_allclose(tops[:, 1], np.delete(rel, 9))
        assert "1 not compared" in ax.get_xlabel() and f"({n} keys)" in ax.get_xlabel()


def test_overlay_and_difference_has_two_axes_and_legends():
    torch.manual_seed(0)
    a = torch.randn(4096)
    b = a + 0.05 * torch.randn(4096)
    b[:2] = float("nan")
    lo, hi = -5.0, 5.0
    fig = overlay_and_difference_figure(histogram(a, range=(lo, hi)), histogram(b, range=(lo, hi)), histogram(b - a),
                                        title="model.layers.0.mlp.up_proj.weight", labels=("base", "tuned"))
    render(fig)
    left, right = fig.axes
    assert legend_texts(left) == ["base (n=4,096)", "tuned (n=4,094, NaN 2)"]
    assert legend_texts(right) == ["tuned − base (n=4,094, NaN 2)"]
    assert left.get_title() == "base and tuned overlaid" and right.get_title() == "difference tuned − base"
    assert right.get_xlabel() == "tuned − base" and left.get_xlabel() == "value"
    assert any(line.get_xdata()[0] == 0 for line in right.get_lines())  # zero marked on the difference
    assert fig._suptitle.get_text() == "model.layers.0.mlp.up_proj.weight"


def test_overlay_without_a_difference_or_a_side():
    h = histogram(torch.randn(100))
    fig = overlay_and_difference_figure(h, None, None)
    render(fig)
    left, right = fig.axes
    assert legend_texts(left) == ["a (n=100)"]
    assert "no element-wise difference" in right.texts[0].get_text()
    render(overlay_and_difference_figure(None, None, None))


def test_figures_take_any_module_frame_shape():
    """A frame with a ``key`` column (not an index) and keys longer than the label room."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    sd = {f"model.decoder.layers.{k}": v for k, v in model.state_dict().items()}
    fig = layer_summary_figure(stats_frame(sd).reset_index())
    labels = tick_texts(fig.axes[0].get_yticklabels())
    assert labels[0] == "model.decoder.layers.0.weight" and all(len(t) <= 36 for t in labels)
    render(fig)
