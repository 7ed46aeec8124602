"""Matplotlib figures of a training run (a :class:`ckptviz.series.SeriesReport`'s matrices): a heatmap of
layers x checkpoints (relative change by default) and the norm of every layer over the run, both in
model order and readable with a thousand layers: rows beyond ``MAX_ROWS`` are merged in runs of
neighbours (the largest value of the run shown), and norms are drawn as one line per layer coloured by
depth. They take DataFrames (keys or patterns x checkpoints) and never open files."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from .plots import STYLE, _auto_log, _styled, shorten_key

MAX_ROWS = 60  # heatmap rows drawn; more are merged, neighbours together
MAX_COLUMN_LABELS = 24
FROZEN_COLOR = "#d9d9d9"  # a cell whose value is exactly 0 (nothing changed)
NOTE_COLOR = "#666666"
INF_COLOR = "#b2182b"
METRIC_LABELS = {"rel_change": "relative change ||b - a|| / ||a||", "max_abs_change": "max |b - a|",
                 "norm": "L2 norm", "changed_frac": "fraction of elements changed", "nonfinite": "NaN/Inf elements"}


def merge_rows(matrix: pd.DataFrame, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """``matrix`` with at most ``max_rows`` rows: runs of neighbouring rows merged into one, holding the
    largest value of the run per column (NaN only where the whole run is), labelled ``first (+n more)``."""
    n = len(matrix)
    if n <= max_rows:
        return matrix
    edges = np.linspace(0, n, max_rows + 1).round().astype(int)
    values = matrix.to_numpy(dtype=float)
    rows, labels = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = values[lo:hi]
        top = np.where(np.isnan(block), -np.inf, block).max(0)
        rows.append(np.where(np.isnan(block).all(0), np.nan, top))
        labels.append(f"{shorten_key(str(matrix.index[lo]), 30)} (+{hi - lo - 1} more)" if hi - lo > 1
                      else str(matrix.index[lo]))
    return pd.DataFrame(rows, index=pd.Index(labels, name=matrix.index.name), columns=matrix.columns)


def heat_norm(values: np.ndarray, log: bool | None = None) -> tuple[Normalize, bool]:
    """The colour scale of a heatmap of ``values`` and whether it is logarithmic (``log`` None: when the
    finite values span more than two decades)."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    use_log = bool(log if log is not None else _auto_log(finite)) and positive.size > 0
    if use_log:
        return LogNorm(vmin=float(positive.min()), vmax=float(positive.max())), True
    return Normalize(vmin=0.0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0), False


def cell_colors(values: np.ndarray, log: bool | None = None) -> tuple[np.ndarray, Normalize, bool]:
    """Hex colours of a heatmap's cells as :func:`series_heatmap_figure` paints them (exact zeros grey,
    infinities red, NaN ``""``: blank), with the colour scale and whether it is logarithmic."""
    from matplotlib.colors import to_hex

    norm, use_log = heat_norm(values, log)
    rgba = _cmap()(norm(np.where(np.isfinite(values) & ((values > 0) | (not use_log)), values, np.nan)))
    out = np.array([to_hex(c) for c in rgba.reshape(-1, 4)], dtype=object).reshape(values.shape)
    out[values == 0] = FROZEN_COLOR
    out[np.isinf(values)] = INF_COLOR
    out[np.isnan(values)] = ""
    return out, norm, use_log


@_styled
def series_heatmap_figure(matrix: pd.DataFrame, *, metric: str = "rel_change", title: str = "",
                          log: bool | None = None, max_rows: int = MAX_ROWS) -> Figure:
    """Layers (rows, model order) x checkpoints (columns, run order) coloured by ``metric``; exact zeros
    (frozen) in grey, missing values (a key's first checkpoint, absent, shape changed) blank. ``log``:
    None picks a log colour scale when the values span more than two decades."""
    shown = merge_rows(matrix, max_rows)
    values = shown.to_numpy(dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(min(12.0, 3.2 + 0.32 * cols), min(14.0, 1.6 + 0.2 * rows)), dpi=STYLE["dpi"],
                 layout="constrained")
    ax = fig.add_subplot()
    norm, use_log = heat_norm(values, log)
    cmap = _cmap()
    masked = np.ma.masked_where(~np.isfinite(values) | ((values <= 0) if use_log else np.zeros_like(values, bool)),
                                values)
    ax.set_facecolor("white")
    zero = np.ma.masked_where(values != 0, np.ones_like(values))
    ax.imshow(zero, aspect="auto", cmap=_solid(FROZEN_COLOR), interpolation="nearest", vmin=0, vmax=1)
    image = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    inf = np.argwhere(np.isinf(values))
    if inf.size:
        ax.scatter(inf[:, 1], inf[:, 0], marker="x", color=INF_COLOR, s=12, label="infinite")
    fig.colorbar(image, ax=ax, label=METRIC_LABELS.get(metric, metric), shrink=0.8)
    ax.set_yticks(range(rows), [shorten_key(str(k), 44) for k in shown.index])
    step = max(1, int(np.ceil(cols / MAX_COLUMN_LABELS)))
    ax.set_xticks(range(0, cols, step), [str(c) for c in shown.columns[::step]], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.grid(False)
    merged = f"; {len(matrix)} rows merged into {rows}" if rows < len(matrix) else ""
    ax.set_xlabel(f"checkpoint ({cols}){merged}\ngrey: unchanged, blank: not compared")
    ax.set_title(title or METRIC_LABELS.get(metric, metric) + " per layer")
    return fig


@_styled
def series_norms_figure(matrix: pd.DataFrame, *, title: str = "", log: bool | None = None,
                        label_top: int = 5) -> Figure:
    """One line per layer (rows of ``matrix``: norms) over the checkpoints, coloured from the first
    layer to the last in model order; the ``label_top`` layers of largest final norm are named."""
    values = matrix.to_numpy(dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(STYLE["figsize"][0] + 1.6, STYLE["figsize"][1] + 0.6), dpi=STYLE["dpi"],
                 layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(cols, dtype=float)
    segments = [np.column_stack([x, v]) for v in values]
    depth = Normalize(vmin=0, vmax=max(rows - 1, 1))
    lines = LineCollection(segments, cmap="viridis", norm=depth, linewidths=1.0 if rows > 50 else 1.6,
                           alpha=0.7 if rows > 50 else 0.95)
    lines.set_array(np.arange(rows))
    ax.add_collection(lines)
    finite = values[np.isfinite(values)]
    use_log = log if log is not None else _auto_log(finite)
    if use_log:
        ax.set_yscale("log", nonpositive="clip")
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if use_log:
            pos = finite[finite > 0]
            lo = float(pos.min()) if pos.size else 1e-12
            ax.set_ylim(lo / 1.5, hi * 1.5)
        else:
            pad = (hi - lo) * 0.05 or 1.0
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(-0.2, cols - 0.8 if cols > 1 else 0.2)
    last = np.array([v[np.isfinite(v)][-1] if np.isfinite(v).any() else -np.inf for v in values])
    for i in np.argsort(-last, kind="stable")[:min(label_top, rows)]:
        if np.isfinite(last[i]):
            ax.annotate(shorten_key(str(matrix.index[i]), 32), (cols - 1, last[i]), fontsize=7,
                        color=lines.cmap(depth(i)), xytext=(4, 0), textcoords="offset points", va="center")
    bar = fig.colorbar(lines, ax=ax, shrink=0.8)
    bar.set_label(f"layer, in model order ({rows})")
    step = max(1, int(np.ceil(cols / MAX_COLUMN_LABELS)))
    ax.set_xticks(range(0, cols, step), [str(c) for c in matrix.columns[::step]], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_ylabel("L2 norm")
    ax.set_title(title or "norm per layer over the run")
    return fig


def _cmap():
    import matplotlib

    return matplotlib.colormaps["magma_r"].copy()


def _solid(color: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([color])
