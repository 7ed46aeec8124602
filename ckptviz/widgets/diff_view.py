"""CheckpointDiff: the notebook widget over ``ckptviz.diff``. Two checkpoints (picked as files, or
given as paths, Checkpoints, models or state dicts), a Compare button, the per-key table sorted by how
much each tensor changed, the relative change per layer in model order, and for a selected row the
two value histograms overlaid beside the histogram of their difference. It only arranges the
DiffReport and calls core verbs."""

from __future__ import annotations

import html
import os
import time
from collections.abc import Mapping
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from ..checkpoint import Checkpoint, open_checkpoint
from ..diff import DIFF_KEYS, STATUS_COLOURS, STATUSES, DiffReport, diff
from ..errors import CheckpointError, UnsafeCheckpointError
from ..plots import diff_bar_figure, figure_to_png, overlay_and_difference_figure, shorten_key
from ..stats import summarize
from .files import FilePicker, human_size
from .pager import TableSource
from .panels import STAT_ROWS, _fmt, card, show_png, tensor_comparison
from .table import KeyTable, _shape
from .working import Working

FILTERS = ("all", "changed", "unchanged", *[s for s in STATUSES if s != "both"])
DISPLAY_COLUMNS = ["key", "key_b", "status", "rel_l2", "max_abs_diff", "cosine", "changed_frac", "shape_a", "shape_b",
                   "dtype_a", "dtype_b", "numel", "rule"]
COUNT_ROWS = ("numel", "nan", "inf")  # statistics that are counts, shown as integers
DIFF_LABEL = "b − a"
BEST_MATCH = ("best match", "")  # a Dropdown cannot select the value None; any section name may be ""


def _badge(status: str) -> str:
    return (f"<span class='ckptviz-status ckptviz-diff-status-{status}' style='background:{STATUS_COLOURS[status]};"
            f"color:#1f2328;padding:1px 5px;border:1px solid #ccc;border-radius:3px'>{status}</span>")


def number(v: float) -> str:
    """4 significant digits, but never "1" for a value that is not 1 (a cosine of 0.99999 has moved)."""
    text = f"{v:.4g}"
    return f"{v:.6f}" if text in ("1", "-1") and v not in (1.0, -1.0) else text


def _row_key(row: pd.Series) -> str:
    """The key ``DiffReport.pair`` takes for a row: a's key, or b's for a row only in b."""
    return row["key"] if isinstance(row["key"], str) else row["key_b"]


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A DiffReport frame as the browser shows it: escaped keys, status badges, shapes as text."""
    out = pd.DataFrame({
        "key": frame["key"].fillna("").map(html.escape),
        "key_b": frame["key_b"].fillna("").map(html.escape),
        "status": frame["status"].map(_badge),
        **{k: frame[k].astype(float) for k in DIFF_KEYS},
        "shape_a": frame["shape_a"].map(_shape),
        "shape_b": frame["shape_b"].map(_shape),
        "dtype_a": frame["dtype_a"].fillna(""),
        "dtype_b": frame["dtype_b"].fillna(""),
        "numel": frame["numel"],
        "rule": frame["rule"].fillna("").map(html.escape),
    })
    return out[DISPLAY_COLUMNS].reset_index(drop=True)


class DiffSource(TableSource):
    """A DiffReport's rows, most changed first, with its filters (and changed / unchanged)."""

    COLUMNS = DISPLAY_COLUMNS
    FILTERS = FILTERS
    SEARCH = ["key", "key_b"]
    COUNTED = ("status",)

    def __init__(self, report: DiffReport):
        super().__init__(report.by_change())
        self.report = report

    def group_keys(self) -> list[str]:
        return self.frame["key"].fillna(self.frame["key_b"]).tolist()

    def passes(self, choice: str) -> np.ndarray | None:
        frame = self.frame
        if choice == "changed":
            return (frame["changed_frac"] > 0).to_numpy()
        if choice == "unchanged":
            return (frame["changed_frac"] == 0).to_numpy()
        if choice != "all":
            return (frame["status"] == choice).to_numpy()
        return None

    def display(self, rows: pd.DataFrame) -> pd.DataFrame:
        out = display_frame(rows)
        for k in DIFF_KEYS:
            out[k] = out[k].map(lambda v: "" if v != v else number(v))
        out["numel"] = out["numel"].map(lambda v: "" if v != v else f"{int(v):,}")
        return out

    def group_cells(self, members: np.ndarray) -> dict[str, str]:
        cells = {"key_b": ""}
        for k in DIFF_KEYS:  # the range of each measure over the group
            v = self.frame[k].to_numpy(dtype=float)[members]
            v = v[~np.isnan(v)]
            cells[k] = "" if not len(v) else (number(v.min()) if v.min() == v.max()
                                              else f"{number(v.min())} … {number(v.max())}")
        cells["numel"] = f"{int(np.nansum(self.frame['numel'].to_numpy(dtype=float)[members])):,}"
        return cells

    def counts_html(self) -> str:
        badges = " ".join(f"{_badge(s)} {n}" for s, n in self.report.summary.items())
        frame = self.report.frame
        changed, compared = int((frame["changed_frac"] > 0).sum()), int(frame["changed_frac"].notna().sum())
        return (f"<div>{badges} <span style='color:#666'>({len(frame)} rows; values changed in {changed} of "
                f"{compared} compared tensors)</span></div>")


class DiffTable(KeyTable):
    """A DiffReport's rows, most changed first (largest ``rel_l2``), with a status filter (and changed /
    unchanged), key search and row selection; ``selected`` gives the report rows (frame index labels)."""

    CSS = {"root": "ckptviz-diff-report-table", "counts": "ckptviz-diff-counts", "filter": "ckptviz-diff-filter",
           "search": "ckptviz-diff-search", "table": "ckptviz-diff-table"}

    def __init__(self):
        self.report: DiffReport | None = None
        super().__init__()

    def show(self, report: DiffReport | None) -> None:
        self.report = report
        self.use(DiffSource(report) if report is not None else None)

    def _empty_html(self) -> str:
        return "<i>choose two checkpoints and press Compare</i>"


def difference(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor | None:
    """``tb - ta`` in float32 (float64 when either is float64); None when there is no element-wise
    difference to take (shapes differ, complex or meta tensors, dtypes without float values)."""
    if ta.shape != tb.shape or ta.is_complex() or tb.is_complex() or "meta" in (ta.device.type, tb.device.type):
        return None
    dtype = torch.float64 if torch.float64 in (ta.dtype, tb.dtype) else torch.float32
    try:
        return tb.detach().to(dtype) - ta.detach().to(dtype)
    except (RuntimeError, TypeError, NotImplementedError):  # quantized, packed
        return None


def pair_comparison(ta: torch.Tensor | None, tb: torch.Tensor | None, bins: int = 64):
    """Statistics table (``STAT_ROWS`` by columns a, b and their difference b − a) and histograms
    (``a`` and ``b`` over one shared range, the difference over its own) of one key's two tensors;
    either may be None."""
    table, hists = tensor_comparison(ta, tb, bins)
    table = table.rename(columns={"checkpoint": "a", "model": "b"})
    hists = {"a": hists.get("checkpoint"), "b": hists.get("model"), "difference": None}
    d = difference(ta, tb) if ta is not None and tb is not None else None
    if d is not None:
        stats, hists["difference"] = summarize(d, bins)
        table[DIFF_LABEL] = [stats.get(k) for k in STAT_ROWS]
    return table, hists


def _stat(name: str, v) -> str:
    if v is None or v != v:
        return "—"
    return f"{int(v):,}" if name in COUNT_ROWS else _fmt(v)


def stats_html(table: pd.DataFrame) -> str:
    """A ``pair_comparison`` table as compact HTML: one row per tensor (a, b, b − a), a column per statistic."""
    rows = table.T
    cells = pd.DataFrame({k: [_stat(k, v) for v in rows[k]] for k in rows.columns}, index=rows.index)
    return cells.to_html(classes="ckptviz-diff-stats", border=0)


class DiffRowPanel(w.VBox):
    """The selected row: its keys and status, the diff numbers, the overlaid histograms beside the
    histogram of the difference, and statistics of a, b and b − a."""

    def __init__(self):
        self.figure: Figure | None = None  # the figure shown, for code and tests
        self.header = w.HTML("<i>select a row to see its tensors</i>")
        self.header.add_class("ckptviz-diff-row-header")
        self.numbers = w.HTML()
        self.numbers.add_class("ckptviz-diff-numbers")
        self.output = w.Output()
        self.output.add_class("ckptviz-diff-histogram")
        super().__init__([self.header, self.output, self.numbers])
        self.add_class("ckptviz-diff-row")

    def clear(self, message: str = "<i>select a row to see its tensors</i>") -> None:
        self.header.value, self.numbers.value = message, ""
        self.output.outputs = ()
        self.figure = None

    def show(self, report: DiffReport, label: int) -> None:
        row = report.frame.loc[label]
        key = _row_key(row)
        ta, tb = report.pair(key)
        keys = html.escape(key) + (f" ↔ {html.escape(row['key_b'])}" if isinstance(row["key_b"], str)
                                   and row["key_b"] != key else "")
        self.header.value = (f"<b title='{html.escape(key)}'>{keys}</b> {_badge(row['status'])}<br>"
                             f"a: {_desc(row, 'a')} &nbsp;|&nbsp; b: {_desc(row, 'b')}")
        table, hists = pair_comparison(ta, tb)
        numbers = " &nbsp; ".join(f"<b>{k}</b> {number(float(row[k]))}" for k in DIFF_KEYS)
        self.numbers.value = f"<div>{numbers}</div>" + (stats_html(table) if len(table.columns) else "")
        if hists["a"] is None and hists["b"] is None:
            self.output.outputs = ()
            self.figure = None
            return
        self.figure = overlay_and_difference_figure(hists["a"], hists["b"], hists["difference"],
                                                    title=shorten_key(key, 70))
        show_png(self.output, figure_to_png(self.figure), f"histograms of {key}")


def _desc(row: pd.Series, side: str) -> str:
    shape = row[f"shape_{side}"]
    return "—" if not isinstance(shape, tuple) else f"{_shape(shape)} {row[f'dtype_{side}']}"


class _Side(w.VBox):
    """One side of the comparison: a file picker, or an object given in code, and its section."""

    def __init__(self, name: str, start_dir: str | os.PathLike | None, path: str | None):
        self.name = name
        self.source: Any = None  # what diff() gets: a Checkpoint, an nn.Module or a mapping of tensors
        self.path: str | None = None
        self.picker = FilePicker(start_dir, path=path)
        self.picker.listing.rows = 5
        self.info = w.HTML(f"<i>no checkpoint {name} yet</i>")
        self.info.add_class("ckptviz-diff-source")
        self.trust = w.Checkbox(value=False, indent=False, layout=w.Layout(display="none"),
                                description="Trust this file: I know where it comes from")
        self.trust.add_class("ckptviz-trust")
        self.section = w.Dropdown(description="section", options=[BEST_MATCH], layout=w.Layout(width="auto"))
        self.section.add_class("ckptviz-diff-section")
        super().__init__([w.HTML(f"<b>Checkpoint {name}</b>"), self.picker, self.trust, self.info, self.section],
                         layout=w.Layout(border="1px solid #ddd", padding="6px", margin="2px", width="50%"))
        self.add_class(f"ckptviz-diff-side-{name}")

    @property
    def chosen_section(self) -> str | None:
        """The section picked, or None for the best match."""
        return None if self.section.index in (None, 0) else self.section.value

    def use(self, source: Any, *, trust: bool = False) -> None:
        """Take a path (opened now, lazily: nothing but its listing is read), a Checkpoint, an
        ``nn.Module`` or a state dict. Raises the CheckpointError of a file that cannot be opened."""
        self.source, self.path = None, None
        self.section.options = [BEST_MATCH]
        self.info.value = ""
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            self.trust.value = trust
            try:
                source = open_checkpoint(self.path, trust=trust)
            except UnsafeCheckpointError:
                self.trust.layout.display = ""
                raise
            self.trust.layout.display = "" if source.unsafe_globals else "none"
        if isinstance(source, Checkpoint):
            self.section.options = [BEST_MATCH] + [
                (f"{s or '(top level)'} — {len(source._section(s))} tensors", s) for s in source.sections]
            name = html.escape(os.path.basename(source.path) if source.path else "checkpoint")
            self.info.value = (f"<b title='{html.escape(str(source.path))}'>{name}</b>: {source.format}, "
                               f"{human_size(source.nbytes)}")
        elif isinstance(source, nn.Module):
            self.info.value = f"<b>{type(source).__name__}</b> (a live model, {len(source.state_dict())} tensors)"
        elif isinstance(source, Mapping):
            self.info.value = f"<b>state dict</b> ({len(source)} entries)"
        else:
            raise CheckpointError(f"checkpoint {self.name}: expected a path, a ckptviz.Checkpoint, an nn.Module or "
                                  f"a state dict, got {type(source).__name__}")
        self.section.layout.display = "" if isinstance(source, Checkpoint) else "none"
        self.source = source


class CheckpointDiff(Working, w.VBox):
    """Compare two checkpoints key by key: which tensors changed and by how much, and how.

    ``a`` and ``b`` may be paths, Checkpoints, ``nn.Module`` objects or state dicts; given both, they
    are compared at once. Otherwise pick files and press Compare. ``.report`` is the DiffReport shown
    (None before a comparison), ``.error`` the last error, ``.timings`` what the last steps took.
    """

    def __init__(self, a: Any = None, b: Any = None, *, start_dir: str | os.PathLike | None = None):
        self.report: DiffReport | None = None
        self.error: str | None = None
        self.timings: dict[str, float] = {}
        self.bars_figure: Figure | None = None
        if start_dir is None:
            given = next((x for x in (a, b) if isinstance(x, (str, os.PathLike))), None)
            start_dir = os.path.dirname(os.path.abspath(os.fspath(given))) if given is not None else None
        self.side_a = _Side("a", start_dir, os.fspath(a) if isinstance(a, (str, os.PathLike)) else None)
        self.side_b = _Side("b", start_dir, os.fspath(b) if isinstance(b, (str, os.PathLike)) else None)
        self.compare_button = w.Button(description="Compare", button_style="primary", icon="exchange",
                                       layout=w.Layout(width="auto"))
        self.compare_button.add_class("ckptviz-diff-compare")
        self.message = w.HTML()
        self.message.add_class("ckptviz-diff-message")
        self.table = DiffTable()
        self.bars = w.Output()
        self.bars.add_class("ckptviz-diff-bars")
        self.row_panel = DiffRowPanel()

        for side in (self.side_a, self.side_b):
            side.picker.register_callback(lambda picker, side=side: self.set_source(side.name, picker.selected))
            side.trust.observe(lambda change, side=side: self._on_trust(side, change["new"]), names="value")
        self.compare_button.on_click(lambda _: self.compare())
        self.table.register_callback(lambda _: self._on_select())
        self._quiet = False

        super().__init__([
            w.HBox([self.side_a, self.side_b], layout=w.Layout(width="100%")),
            w.HBox([self.compare_button, self.message], layout=w.Layout(align_items="center")),
            card("Keys, most changed first", self.table),
            w.HBox([card("Relative change per layer, in model order", self.bars, width="40%"),
                     card("Selected key", self.row_panel, width="60%")], layout=w.Layout(width="100%")),
        ])
        self.add_class("ckptviz-diff")
        self.add_class("ckptviz-diff-widget")
        for name, source in (("a", a), ("b", b)):
            if source is not None:
                self.set_source(name, source)
        if self.side_a.source is not None and self.side_b.source is not None:
            self.compare()

    # ---- public verbs --------------------------------------------------------------------
    def set_source(self, side: str, source: Any, *, trust: bool = False) -> None:
        """Use ``source`` (a path, Checkpoint, nn.Module or state dict) as checkpoint ``side`` ("a" or "b");
        errors are shown in the widget and kept in ``.error``."""
        target = {"a": self.side_a, "b": self.side_b}[side]
        what = html.escape(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        with self._work(f"opening {side}: <code>{what}</code>…"):
            self._quiet = True
            try:
                target.use(source, trust=trust)
            finally:
                self._quiet = False
            if self.report is not None:
                self._say(f"Checkpoint {side} changed: press Compare to compare again.")

    def compare(self) -> DiffReport | None:
        """Compare checkpoint a with checkpoint b and show the result."""
        a, b = self.side_a, self.side_b
        if a.source is None or b.source is None:
            missing = " and ".join(s.name for s in (a, b) if s.source is None)
            self._say(f"Choose checkpoint {missing} first (a file in the list, or a path and Open).", error=True)
            return None
        started = time.perf_counter()
        with self._work("comparing every tensor of a with its counterpart in b…"):
            report = diff(a.source, b.source, section_a=a.chosen_section, section_b=b.chosen_section, progress=False)
            self.report = report
            self.timings["diff"] = time.perf_counter() - started
            self.table.show(report)
            self.row_panel.clear()
            self._show_bars(report)
            self.timings["compare_to_view"] = time.perf_counter() - started
            changed = int((report.frame["changed_frac"] > 0).sum())
            self._say(f"✓ {len(report.frame)} keys compared in {self.timings['diff']:.2f} s "
                      f"(sections: a <code>{html.escape(report.section_a or '(top level)')}</code>, b "
                      f"<code>{html.escape(report.section_b or '(top level)')}</code>); values changed in "
                      f"{changed}. Select a row to see its histograms.")
        return self.report

    # ---- internals -----------------------------------------------------------------------
    def _busy_buttons(self) -> list[w.Button]:
        return [self.compare_button]

    def _error_message(self, error: Exception, text: str) -> str | None:
        if isinstance(error, UnsafeCheckpointError):
            return (f"{text}\nTick “Trust this file” only if you know where it comes from; ckptviz will then "
                    "read its tensors without running any of the above.")
        return text

    def _on_trust(self, side: _Side, trusted: bool) -> None:
        if not self._quiet and trusted and side.path:
            self.set_source(side.name, side.path, trust=True)

    def _show_bars(self, report: DiffReport) -> None:
        names = [os.path.basename(ck.path) if ck.path else side for ck, side in ((report.a, "a"), (report.b, "b"))]
        self.bars_figure = diff_bar_figure(report.frame, title=" → ".join(names))
        show_png(self.bars, figure_to_png(self.bars_figure), "relative change per layer")

    def _on_select(self) -> None:
        labels = self.table.selected
        if not labels or self.report is None:
            self.row_panel.clear()
            return
        with self._work("reading the two tensors…"):
            self.row_panel.show(self.report, self.table.focus if self.table.focus is not None else labels[-1])

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # static exports (nbconvert) show the styled report instead
            bundle["text/html"] = self.report._repr_html_() if self.report is not None else (
                "<p class='ckptviz-diff'>CheckpointDiff: no comparison yet; run the notebook in Jupyter to use "
                "the widget.</p>")
        return bundle
