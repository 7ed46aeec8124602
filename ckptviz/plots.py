"""Matplotlib figures of ckptviz results: histograms (one, or several overlaid such as checkpoint vs
model) and per-key statistic plots, in one look (``STYLE``). Figures are built with the object API
(``matplotlib.figure.Figure``, no pyplot state), so they render headless and in notebooks alike; they
take Histogram objects, DataFrames and arrays, and never open files."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from .stats import Histogram

STYLE: dict[str, Any] = {
    "figsize": (6.4, 3.6),
    "dpi": 100,
    "alpha": 0.25,  # fill under each histogram
    "linewidth": 1.4,
    "colors": {"checkpoint": "#1f77b4", "model": "#d62728"},  # fixed colours for the usual sources
    "cycle": ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"),  # any other label
    "rc": {
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False,
    },
}


def _styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under ``STYLE["rc"]`` (a temporary rc context: global settings stay untouched)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(STYLE["rc"]):
            return build(*args, **kwargs)

    return wrapper


def new_figure() -> Figure:
    """An empty figure of the standard size, with constrained layout."""
    return Figure(figsize=STYLE["figsize"], dpi=STYLE["dpi"], layout="constrained")


def colors_for(labels: Iterable[str]) -> dict[str, str]:
    """A colour per label: the fixed one for "checkpoint"/"model", the next of ``STYLE["cycle"]`` else."""
    fixed, cycle = STYLE["colors"], STYLE["cycle"]
    spare = [c for c in cycle if c not in fixed.values()] or list(cycle)
    out: dict[str, str] = {}
    for label in labels:
        out[label] = fixed.get(label) or spare[sum(1 for k in out if k not in fixed) % len(spare)]
    return out


def shorten_key(key: str, width: int = 40) -> str:
    """``key`` cut from the left to at most ``width`` characters, marked by "…", starting at a
    component boundary where that keeps at least half the room ("…layers.31.mlp.down_proj.weight")."""
    if len(key) <= width:
        return key
    if width < 2:
        return "…"[:width]
    start = len(key) - (width - 1)
    if key[start - 1] != ".":
        dot = key.find(".", start)
        if dot != -1 and len(key) - dot - 1 >= (width - 1) // 2:
            start = dot + 1
    return "…" + key[start:]


def _legend_label(label: str, h: Histogram) -> str:
    notes = [f"n={h.total:,}"]
    notes += [f"{name} {count:,}" for name, count in (("NaN", h.nan), ("Inf", h.inf), ("outside", h.outside))
              if count]
    return f"{label} ({', '.join(notes)})"


@_styled
def histogram_figure(hists: Mapping[str, Histogram], *, title: str = "", log: bool = False) -> Figure:
    """One or several histograms overlaid (e.g. ``{"checkpoint": h1, "model": h2}``): filled steps
    with a solid outline; the legend gives each one's count of binned values and of NaN, Inf and
    values outside the range when there are any. ``log`` puts the counts on a log scale."""
    fig = new_figure()
    ax = fig.add_subplot()
    _draw_histograms(ax, hists, log=log)
    if title:
        ax.set_title(title)
    return fig


def _draw_histograms(ax, hists: Mapping[str, Histogram], *, log: bool = False,
                     colors: Mapping[str, str] | None = None) -> None:
    """``hists`` overlaid on ``ax`` as filled steps with outlines, axis labels and a legend."""
    colors = colors or colors_for(hists)
    baseline = 0.5 if log else 0  # on a log axis, fill down to just below one count
    for label, h in hists.items():
        color = colors[label]
        ax.stairs(h.counts, h.edges, baseline=baseline, fill=True, color=color, alpha=STYLE["alpha"], linewidth=0)
        ax.stairs(h.counts, h.edges, baseline=baseline, color=color, linewidth=STYLE["linewidth"],
                  label=_legend_label(label, h))
    if log:
        ax.set_yscale("log", nonpositive="clip")
        ax.set_ylim(bottom=baseline)
    else:
        ax.set_ylim(bottom=0)
    if not hists or not any(h.total for h in hists.values()):
        ax.text(0.5, 0.5, "no finite values" if hists else "no data", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log scale)" if log else "count")
    if hists:
        ax.legend(loc="best")


@_styled
def stat_figure(frames: pd.DataFrame | Mapping[str, pd.DataFrame], column: str = "std", *, title: str = "",
                log: bool = False, max_labels: int = 40) -> Figure:
    """One statistic (a column of ``stats_frame`` output) per tensor, in key order, one line per
    source (a frame, or ``{"checkpoint": f1, "model": f2}``); keys label the x axis when few enough."""
    if isinstance(frames, pd.DataFrame):
        frames = {"checkpoint": frames}
    fig = new_figure()
    ax = fig.add_subplot()
    colors = colors_for(frames)
    keys: list[str] = []
    for frame in frames.values():
        keys += [k for k in frame.index if k not in set(keys)]
    position = {k: i for i, k in enumerate(keys)}
    for label, frame in frames.items():
        x = [position[k] for k in frame.index]
        ax.plot(x, frame[column].to_numpy(dtype=float), marker=".", markersize=4, linewidth=1,
                color=colors[label], label=label)
    if 0 < len(keys) <= max_labels:
        ax.set_xticks(range(len(keys)), [shorten_key(str(k), 32) for k in keys], rotation=90)
    else:
        ax.set_xlabel("tensor (in key order)")
    ax.set_ylabel(column)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(frames) > 1:
        ax.legend(loc="best")
    return fig


def figure_to_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """The figure rendered as PNG bytes (Agg; works without a display)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or STYLE["dpi"])
    return buf.getvalue()
