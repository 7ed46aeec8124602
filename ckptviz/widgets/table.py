"""ReportTable: the per-key table of a Report, with status filter, key search, sorting and row
selection, on KeyTable (the same for any per-key result frame, such as a DiffReport's). Python holds
the state; the browser table (itables' DataTables widget) only shows it."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from contextlib import nullcontext

import ipywidgets as w
import pandas as pd
from itables.widget import ITable

from ..compare import STATUS_COLOURS, STATUSES, Report

FILTERS = ("all", "problems", *STATUSES)
DISPLAY_COLUMNS = ["key", "ckpt_key", "status", "model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype",
                   "model_device", "ckpt_device", "rule", "loaded", "nan/inf"]
# itables' ITable.update() recomputes the table from its own defaults for every option it is not given
# (allow_html, maxBytes, layout...), so every update must pass these again.
TABLE_OPTIONS = dict(select=True, allow_html=True, showIndex=False, maxBytes=0, pageLength=15,
                     lengthMenu=[15, 50, 200, 1000], layout={"topEnd": None}, classes="display compact nowrap",
                     scrollX=True, deferRender=True)


def _shape(v) -> str:
    return "" if not isinstance(v, tuple) else "(" + ", ".join(str(s) for s in v) + ")"


def _badge(status: str) -> str:
    return (f"<span class='ckptviz-status ckptviz-status-{status}' "
            f"style='background:{STATUS_COLOURS[status]};color:#1f2328;padding:1px 5px;border-radius:3px'>"
            f"{status}</span>")


def _nonfinite_badge(text: str) -> str:
    return (f"<span class='ckptviz-nonfinite' style='background:#fbd9d7;color:#b00020;padding:1px 5px;"
            f"border-radius:3px'>{html.escape(text)}</span>")


def display_frame(frame: pd.DataFrame, loaded: set[str], nonfinite: dict[str, str] | None = None) -> pd.DataFrame:
    """The report frame as the browser shows it: strings, status badges, a loaded mark, and a badge on
    the rows whose checkpoint tensor holds NaN or Inf (``nonfinite``: checkpoint key -> "NaN 3, Inf 1")."""
    nonfinite = nonfinite or {}
    out = pd.DataFrame({
        "key": frame["key"].fillna("").map(html.escape),
        "ckpt_key": frame["ckpt_key"].fillna("").map(html.escape),
        "status": frame["status"].map(_badge),
        "model_shape": frame["model_shape"].map(_shape),
        "ckpt_shape": frame["ckpt_shape"].map(_shape),
        "model_dtype": frame["model_dtype"].fillna(""),
        "ckpt_dtype": frame["ckpt_dtype"].fillna(""),
        "model_device": frame["model_device"].fillna(""),
        "ckpt_device": frame["ckpt_device"].fillna(""),
        "rule": frame["rule"].fillna("").map(html.escape),
        "loaded": frame["key"].map(lambda k: "✓" if k in loaded else ""),
        "nan/inf": frame["ckpt_key"].map(lambda k: _nonfinite_badge(nonfinite[k]) if k in nonfinite else ""),
    })
    return out.reset_index(drop=True)


def search_keys(frame: pd.DataFrame, text: str, columns: list[str]) -> pd.DataFrame:
    """The rows of ``frame`` where any of the key ``columns`` matches ``text`` (a regex, or plain text
    when it is not a valid one; case-insensitive). Blank text keeps every row."""
    text = text.strip()
    if not text:
        return frame
    try:
        pattern = re.compile(text, re.IGNORECASE)
    except re.error:
        pattern = re.compile(re.escape(text), re.IGNORECASE)
    keys = frame[columns[0]].fillna("")
    for column in columns[1:]:
        keys = keys + " " + frame[column].fillna("")
    return frame[keys.map(lambda s: bool(pattern.search(s)))]


class KeyTable(w.VBox):
    """One row per key of a result frame in itables' DataTables widget, with a filter, a key search and
    row selection; Python holds the state. ``selected`` gives the frame rows (index labels) picked.
    Subclasses name their filters, columns and CSS classes, and say which rows pass (``visible``) and
    how they look in the browser (``display``)."""

    FILTERS: tuple[str, ...] = ("all",)
    COLUMNS: list[str] = []
    CSS = {"root": "", "counts": "", "filter": "", "search": "", "table": ""}
    FLOAT_FORMAT: Callable[[float], str] | None = None  # how itables writes the floats (it sorts on the values)

    def __init__(self):
        self._rows: list[int] = []  # frame index label of each displayed row
        self._callbacks: list[Callable[[KeyTable], None]] = []
        self.counts = w.HTML()
        self.filter = w.ToggleButtons(options=self.FILTERS, value="all", style={"button_width": "auto"})
        self.search = w.Text(placeholder="search keys (text or regex)", continuous_update=True,
                             layout=w.Layout(width="260px"))
        self.table = ITable(pd.DataFrame(columns=self.COLUMNS), **TABLE_OPTIONS)
        for name in ("counts", "filter", "search", "table"):
            getattr(self, name).add_class(self.CSS[name])
        self.filter.observe(lambda _: self.refresh(), names="value")
        self.search.observe(lambda _: self.refresh(), names="value")
        self.table.observe(self._on_select, names="selected_rows")
        super().__init__([self.counts, w.HBox([self.filter, self.search]), self.table])
        self.add_class(self.CSS["root"])
        self.counts.value = self._counts_html()

    def register_callback(self, callback: Callable[[KeyTable], None]) -> None:
        """Call ``callback(table)`` whenever the selection changes."""
        self._callbacks.append(callback)

    def visible(self) -> pd.DataFrame:
        """The frame rows that pass the filter and the key search."""
        raise NotImplementedError

    def display(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` as the browser shows it (``COLUMNS``, strings and badges)."""
        raise NotImplementedError

    def _counts_html(self) -> str:
        return ""

    def refresh(self) -> None:
        frame = self.visible()
        self._rows = list(frame.index)
        self.counts.value = self._counts_html()
        shown = self.display(frame) if len(frame) else pd.DataFrame(columns=self.COLUMNS)
        floats = pd.option_context("display.float_format", self.FLOAT_FORMAT) if self.FLOAT_FORMAT else nullcontext()
        with floats:  # itables formats the floats inside update()
            self.table.update(shown, selected_rows=[], **TABLE_OPTIONS)

    @property
    def selected(self) -> list[int]:
        """Frame index labels of the selected rows."""
        return [self._rows[i] for i in self.table.selected_rows if 0 <= i < len(self._rows)]

    def select(self, labels: list[int]) -> None:
        """Select frame rows by index label (those not visible are ignored)."""
        pos = {label: i for i, label in enumerate(self._rows)}
        self.table.selected_rows = [pos[label] for label in labels if label in pos]

    def _on_select(self, _change) -> None:
        for cb in self._callbacks:
            cb(self)


class ReportTable(KeyTable):
    """Shows a Report's frame; ``selected`` gives the report rows (frame index labels) picked."""

    FILTERS = FILTERS
    COLUMNS = DISPLAY_COLUMNS
    CSS = {"root": "ckptviz-report-table", "counts": "ckptviz-counts", "filter": "ckptviz-status-filter",
           "search": "ckptviz-search", "table": "ckptviz-table"}

    def __init__(self):
        self.report: Report | None = None
        self.loaded: set[str] = set()
        self.nonfinite: dict[str, str] = {}  # checkpoint key -> "NaN 3, Inf 1", from a scan of this report's section
        super().__init__()

    def show(self, report: Report | None, loaded: set[str] | None = None) -> None:
        self.report = report
        self.loaded = set(loaded or ())
        self.refresh()

    def mark_nonfinite(self, flags: dict[str, str]) -> None:
        """Badge the rows whose checkpoint key is in ``flags`` (checkpoint key -> "NaN 3, Inf 1")."""
        self.nonfinite = dict(flags)
        self.refresh()

    def visible(self) -> pd.DataFrame:
        """The report rows that pass the status filter and the key search."""
        if self.report is None:
            return pd.DataFrame(columns=DISPLAY_COLUMNS)
        frame = self.report.frame
        choice = self.filter.value
        if choice == "problems":
            frame = frame[frame["status"] != "match"]
        elif choice != "all":
            frame = frame[frame["status"] == choice]
        return search_keys(frame, self.search.value, ["key", "ckpt_key"])

    def display(self, frame: pd.DataFrame) -> pd.DataFrame:
        return display_frame(frame, self.loaded, self.nonfinite)

    def _counts_html(self) -> str:
        if self.report is None:
            return "<i>open a checkpoint and pick a model to see the comparison</i>"
        badges = " ".join(f"{_badge(s)} {n}" for s, n in self.report.summary.items())
        return f"<div>{badges} <span style='color:#666'>({len(self.report.frame)} rows)</span></div>"
