"""Matplotlib figures of ckptviz results: histograms (one, or several overlaid such as checkpoint vs
model, or two checkpoints beside their difference) and per-layer plots (a statistic per key, std and
norm per layer, relative change per layer between two checkpoints), in one look (``STYLE``). Figures
are built with the object API (``matplotlib.figure.Figure``, no pyplot state), so they render headless
and in notebooks alike; they take Histogram objects, DataFrames and arrays, and never open files."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import matplotlib as mpl
import numpy as np
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


# ---- per-layer figures ----------------------------------------------------------------------------
LABELLED_MAX = 30  # up to this many layers: one labelled horizontal bar each; more: an index axis
BARS_MAX = 1000  # up to this many keys on the index axis: bars; more: one vertical line per key
SPARSE_LABELS = 10  # keys named along an index axis
NOTE_COLOR = "0.4"
DEAD_COLOR = "#9e9e9e"
NONFINITE_COLOR = "#d62728"
DIFF_COLORS = {"bar": "#1f77b4", "difference": "#ff7f0e"}
VALUE_LABELS = {
    "std": "std", "l2": "L2 norm", "abs_max": "max |value|", "mean": "mean",
    "rel_l2": "relative change ||b − a|| / ||a||", "max_abs_diff": "max |b − a|",
    "cosine": "cosine similarity of a and b", "changed_frac": "fraction of values changed",
}


def _layer_keys(frame: pd.DataFrame) -> list[str]:
    """The key of each row: the ``key`` column (``key_b`` where a row has no ``key``), else the index."""
    if "key" in frame.columns:
        keys = frame["key"]
        if "key_b" in frame.columns:
            keys = keys.where(keys.notna(), frame["key_b"])
        return [str(k) for k in keys]
    return [str(k) for k in frame.index]


def _auto_log(values: np.ndarray) -> bool:
    """A log scale pays off when the positive finite values span more than two decades."""
    pos = values[np.isfinite(values) & (values > 0)]
    return len(pos) > 1 and pos.max() / pos.min() > 100


def _label_layers(ax, keys: list[str], positions, *, horizontal: bool, total: int | None = None) -> None:
    """Name the layers along ``ax``: every key on a horizontal-bar axis (first layer on top), or about
    ``SPARSE_LABELS`` of them, with their index, along an index axis."""
    if horizontal:
        ax.set_yticks(list(positions), [shorten_key(k, 36) for k in keys])
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.grid(False, axis="y")
        return
    positions = list(positions)
    picks = sorted({round(i * (len(positions) - 1) / max(SPARSE_LABELS - 1, 1)) for i in range(SPARSE_LABELS)})
    picks = [i for i in picks if i < len(positions)]
    ax.set_xticks([positions[i] for i in picks], [f"{positions[i]}: {shorten_key(keys[i], 30)}" for i in picks],
                  rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, (total if total is not None else len(positions)) - 0.5)


def _mark_layers(ax, positions, *, horizontal: bool, color: str, label: str) -> None:
    """Shade the bands of ``positions`` (layer slots) on ``ax``; one legend entry for them all."""
    span = ax.axhspan if horizontal else ax.axvspan
    for n, p in enumerate(positions):
        span(p - 0.5, p + 0.5, color=color, alpha=0.18, linewidth=0, label=label if n == 0 else None)


@_styled
def layer_summary_figure(frame: pd.DataFrame, columns: Iterable[str] = ("std", "l2"), *, title: str = "",
                         log: bool | None = None) -> Figure:
    """Per-layer statistics (columns of ``stats_frame`` output, indexed by key) in model order, one
    panel per column, to spot dead or exploding layers. Up to ``LABELLED_MAX`` keys: horizontal bars,
    one labelled row per key; more: values against the layer index with a few keys named. Layers
    that are all zeros are shaded grey, layers holding NaN or Inf red (when the frame has the
    ``zero_frac``/``nan``/``inf`` columns). ``log``: None picks a log scale per panel when the values
    span more than two decades."""
    columns = list(columns)
    keys = _layer_keys(frame)
    n = len(keys)
    horizontal = n <= LABELLED_MAX
    if horizontal:
        fig = Figure(figsize=(2.8 + 2.6 * len(columns), max(STYLE["figsize"][1], 0.24 * n + 1.3)),
                     dpi=STYLE["dpi"], layout="constrained")
        axes = fig.subplots(1, len(columns), sharey=True, squeeze=False)[0]
    else:
        fig = Figure(figsize=(8.0, 1.9 * len(columns) + 1.6), dpi=STYLE["dpi"], layout="constrained")
        axes = fig.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
    dead = _flagged(frame, "zero_frac", lambda v: v >= 1) | _flagged(frame, "l2", lambda v: v == 0)
    nonfinite = _flagged(frame, "nan", lambda v: v > 0) | _flagged(frame, "inf", lambda v: v > 0)
    colors = colors_for(columns)
    for ax, column in zip(axes, columns):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        if horizontal:
            ax.barh(range(n), np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), height=0.7,
                    color=colors[column])
            ax.set_xlabel(VALUE_LABELS.get(column, column))
        else:
            ax.plot(range(n), values, marker=".", markersize=4, linewidth=1, color=colors[column])
            ax.set_ylabel(VALUE_LABELS.get(column, column))
        if log if log is not None else _auto_log(values):
            (ax.set_xscale if horizontal else ax.set_yscale)("log", nonpositive="clip")
        _mark_layers(ax, np.flatnonzero(dead), horizontal=horizontal, color=DEAD_COLOR, label="all zeros")
        _mark_layers(ax, np.flatnonzero(nonfinite), horizontal=horizontal, color=NONFINITE_COLOR,
                     label="holds NaN/Inf")
        if n == 0:
            ax.text(0.5, 0.5, "no tensors", transform=ax.transAxes, ha="center", va="center", color=NOTE_COLOR)
    if n:
        if horizontal:
            _label_layers(axes[0], keys, range(n), horizontal=True)
        else:
            _label_layers(axes[-1], keys, range(n), horizontal=False)
            axes[-1].set_xlabel(f"layer index, in model order ({n} tensors)")
    if dead.any() or nonfinite.any():
        axes[0].legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def _flagged(frame: pd.DataFrame, column: str, test: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Rows where ``test(frame[column])`` holds; none when the frame has no such column."""
    if column not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return np.asarray(test(values), dtype=bool) & ~np.isnan(values)


@_styled
def diff_bar_figure(frame: pd.DataFrame, *, column: str = "rel_l2", top: int | None = None, title: str = "",
                    log: bool | None = None) -> Figure:
    """How much each layer changed between two checkpoints (a column of a DiffReport's frame, by
    default the relative change ``rel_l2``), one bar per key in model order. ``top`` keeps the
    ``top`` most changed keys (largest values; smallest for ``cosine``), still in model order. Keys
    with no value (in one file only, or shapes that differ) or an infinite one (``rel_l2`` of a tensor
    that was all zeros in a) have no bar and are counted in the axis label.
    Up to ``LABELLED_MAX`` bars: horizontal and labelled by key; more: against the layer index (above
    ``BARS_MAX``, one vertical line per key instead of a bar).
    ``log``: None picks a log scale when the values span more than two decades."""
    keys = _layer_keys(frame)
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    shown = np.flatnonzero(np.isfinite(values))
    missing, infinite = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if top is not None and 0 <= top < len(shown):
        order = np.argsort(values[shown] if column == "cosine" else -values[shown], kind="stable")
        shown = np.sort(shown[order[:top]])
    horizontal = len(shown) <= LABELLED_MAX
    if horizontal:
        fig = Figure(figsize=(STYLE["figsize"][0] + 1.4, max(STYLE["figsize"][1], 0.24 * len(shown) + 1.4)),
                     dpi=STYLE["dpi"], layout="constrained")
    else:
        fig = Figure(figsize=(8.0, STYLE["figsize"][1] + 0.6), dpi=STYLE["dpi"], layout="constrained")
    ax = fig.add_subplot()
    use_log = log if log is not None else _auto_log(values[shown])
    notes = []
    if top is not None and len(shown) < len(values) - missing - infinite:
        notes.append(f"top {len(shown)} of {len(values) - missing - infinite}")
    if missing:
        notes.append(f"{missing} not compared: in one file only or shapes differ")
    if infinite:
        notes.append(f"{infinite} infinite: zero in a, not in b")
    zeros = int((values[shown] == 0).sum())
    if use_log and zeros:
        notes.append(f"{zeros} unchanged (no bar on a log scale)")
    note = "\n(" + "; ".join(notes) + ")" if notes else ""
    if horizontal:
        ax.barh(range(len(shown)), values[shown], height=0.7, color=DIFF_COLORS["bar"])
        if len(shown):
            _label_layers(ax, [keys[i] for i in shown], range(len(shown)), horizontal=True)
        ax.set_xlabel(VALUE_LABELS.get(column, column) + note)
    else:
        if len(shown) <= BARS_MAX:
            ax.bar(shown, values[shown], width=0.8, color=DIFF_COLORS["bar"])
        else:  # one line per key, drawn as one collection: 10,000 bar patches take seconds, this milliseconds
            bottom = float(values[shown][values[shown] > 0].min()) / 2 if use_log and (values[shown] > 0).any() else 0.0
            ax.vlines(shown, bottom, values[shown], colors=DIFF_COLORS["bar"], linewidth=0.6)
        _label_layers(ax, [keys[i] for i in shown], shown, horizontal=False, total=len(values))
        ax.set_xlabel(f"layer index, in model order ({len(values)} keys)" + note)
        ax.set_ylabel(VALUE_LABELS.get(column, column))
    if use_log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log", nonpositive="clip")
    if not len(shown):
        ax.text(0.5, 0.5, "no tensors to compare", transform=ax.transAxes, ha="center", va="center",
                color=NOTE_COLOR)
    if title:
        ax.set_title(title)
    return fig


@_styled
def overlay_and_difference_figure(hist_a: Histogram | None, hist_b: Histogram | None, hist_diff: Histogram | None,
                                  *, title: str = "", labels: tuple[str, str] = ("a", "b"),
                                  log: bool = False) -> Figure:
    """Two histograms of one tensor in two checkpoints overlaid (left; best over one shared range)
    and the histogram of their element-wise difference b − a (right, with zero marked). Any of the
    three may be None: a key in one file only, or shapes that differ (no difference to show)."""
    fig = Figure(figsize=(2 * STYLE["figsize"][0] - 1.4, STYLE["figsize"][1]), dpi=STYLE["dpi"],
                 layout="constrained")
    left, right = fig.subplots(1, 2)
    name_a, name_b = labels
    pair = {name: h for name, h in ((name_a, hist_a), (name_b, hist_b)) if h is not None}
    diff_label = f"{name_b} − {name_a}"
    colors = colors_for([name_a, name_b])
    colors[diff_label] = DIFF_COLORS["difference"]
    _draw_histograms(left, pair, log=log, colors=colors)
    left.set_title(f"{name_a} and {name_b} overlaid" if len(pair) == 2 else "values")
    if hist_diff is None:
        right.text(0.5, 0.5, "no element-wise difference\n(a key in one file only, or shapes differ)",
                   transform=right.transAxes, ha="center", va="center", color=NOTE_COLOR)
        right.set_xticks([])
        right.set_yticks([])
    else:
        _draw_histograms(right, {diff_label: hist_diff}, log=log, colors=colors)
        if hist_diff.edges[0] <= 0 <= hist_diff.edges[-1]:
            right.axvline(0, color="0.3", linewidth=0.8, linestyle="--")
        right.set_xlabel(diff_label)
    right.set_title(f"difference {diff_label}")
    if title:
        fig.suptitle(title)
    return fig


def figure_to_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """The figure rendered as PNG bytes (Agg; works without a display)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or STYLE["dpi"])
    return buf.getvalue()


@_styled
def status_by_layer_figure(frame: pd.DataFrame, colors: Mapping[str, str], *, status: str = "status",
                           title: str = "") -> Figure:
    """How many keys of each status (a column of a Report's or DiffReport's frame) each layer holds, as
    stacked bars in model order, one colour per status (``colors``, in stacking order; statuses with no
    key are left out). A layer is a key's path up to its first numeric index (``model.layers.3``), or
    its module. Up to ``LABELLED_MAX`` layers: horizontal and labelled; more: against the layer index."""
    from .fold import layer_of

    keys = frame["key"] if "key" in frame.columns else pd.Series(frame.index, dtype=object)
    for other in ("key_b", "ckpt_key"):  # a row on the second side only is named by its key there
        if other in frame.columns:
            keys = keys.where(keys.notna(), frame[other])
    layers = layer_of(pd.Series(keys.to_numpy(dtype=object), dtype=object))
    counts = pd.crosstab(pd.Categorical(layers, categories=pd.unique(layers)), frame[status].to_numpy())
    names = [s for s in colors if s in counts.columns] + [s for s in counts.columns if s not in colors]
    names_of_layers, n = [str(k) for k in counts.index], len(counts)
    horizontal = n <= LABELLED_MAX
    height = max(STYLE["figsize"][1], 0.24 * n + 1.4) if horizontal else STYLE["figsize"][1] + 0.6
    fig = Figure(figsize=(STYLE["figsize"][0] + 1.4 if horizontal else 8.0, height), dpi=STYLE["dpi"],
                 layout="constrained")
    ax = fig.add_subplot()
    below = np.zeros(n)
    for name in names:
        values = counts[name].to_numpy(dtype=float)
        draw = ax.barh if horizontal else ax.bar
        extent = {"left": below} if horizontal else {"bottom": below}
        draw(range(n), values, 0.7 if horizontal else 0.8, **extent, color=colors.get(name, "0.7"),
             edgecolor="0.45", linewidth=0.4, label=f"{name} ({int(values.sum()):,})")
        below = below + values
    if n:
        _label_layers(ax, names_of_layers, range(n), horizontal=horizontal)
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no keys", transform=ax.transAxes, ha="center", va="center", color=NOTE_COLOR)
    label = f"keys per layer ({len(frame):,} keys in {n} layers)"
    if horizontal:
        ax.set_xlabel("keys")
    else:
        ax.set_ylabel("keys")
        ax.set_xlabel("layer index, in model order")
    ax.set_title(title or label)
    return fig
