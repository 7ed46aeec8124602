"""KeyTable: the one table of every ckptviz widget (a filter, a fold switch, and a PagedView the
kernel fills one page at a time from a :class:`~ckptviz.widgets.pager.Pager`), and ReportTable, the
inspector's: a Report's comparison, or the checkpoint alone before a model is picked."""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as w
import numpy as np
import pandas as pd

from ..checkpoint import Checkpoint, human_size
from ..compare import STATUS_COLOURS, STATUSES, Report
from .paged_view import PagedView
from .pager import GROUP, ROW, Pager, TableSource

FILTERS = ("all", "problems", *STATUSES)
DISPLAY_COLUMNS = ["key", "ckpt_key", "status", "model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype",
                   "model_device", "ckpt_device", "rule", "loaded", "nan/inf"]
CKPT_COLUMNS = ["key", "shape", "dtype", "device", "numel", "size", "file", "nan/inf"]


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


class KeyTable(w.VBox):
    """One row per key of a result frame (a :class:`TableSource`): filter buttons, a fold switch, and
    the paged browser view. Python holds the frame, the filter, the search, the sort, the page and
    the selection; the browser holds one page. ``selected`` gives the frame rows (index labels) picked,
    ``focus`` the row clicked last."""

    CSS = {"root": "", "counts": "", "filter": "", "search": "", "table": ""}

    def __init__(self):
        self.pager = Pager()
        self.searches = 0
        self._callbacks: list[Callable[[KeyTable], None]] = []
        self._quiet = False
        self.counts = w.HTML()
        self.filter = w.ToggleButtons(options=("all",), value="all", style={"button_width": "auto"})
        self.fold = w.ToggleButton(value=False, description="fold layer patterns", icon="compress",
                                   tooltip="keys that differ only in numeric indices as one row each",
                                   layout=w.Layout(width="auto"))
        self.fold.add_class("ckptviz-fold")
        self.view = PagedView(search_class=self.CSS["search"])
        for name, widget in (("counts", self.counts), ("filter", self.filter), ("table", self.view)):
            widget.add_class(self.CSS[name])
        self.filter.observe(self._on_filter, names="value")
        self.fold.observe(self._on_fold, names="value")
        self.view.observe(self._on_search, names="search")
        self.view.on_msg(self._on_msg)
        super().__init__([self.counts, w.HBox([self.filter, self.fold]), self.view])
        self.add_class(self.CSS["root"])
        self.use(None)

    # ---- what is shown -----------------------------------------------------------------
    @property
    def source(self) -> TableSource | None:
        return self.pager.source

    def use(self, source: TableSource | None, *, keep: bool = False) -> None:
        """Show ``source``; ``keep`` keeps selection, expansions and page (the same rows, new values)."""
        old = self.pager.selected.copy()
        self.pager.set_source(source, keep=keep)
        self._quiet = True
        filters = source.FILTERS if source is not None else ("all",)
        if tuple(self.filter.options) != tuple(filters):
            self.filter.options = filters
        self.filter.value = self.pager.choice if self.pager.choice in filters else "all"
        self.pager.choice = self.filter.value
        self.fold.value = self.pager.is_folded
        self._quiet = False
        self.refresh()
        if old != self.pager.selected:
            self._changed()

    def refresh(self) -> None:
        """Send the current page to the browser."""
        view = self.pager.view()
        src = self.source
        with self.view.hold_sync():
            self.view.columns = view["columns"]
            self.view.sort = view["sort"]
            self.view.page, self.view.pages = view["page"], view["pages"]
            self.view.page_size = self.pager.page_size
            self.view.info = view["info"]
            self.view.empty = "no rows" if src is not None else "nothing to show yet"
            self.view.rows = view["rows"]
        self.counts.value = src.counts_html() if src is not None else self._empty_html()

    def _empty_html(self) -> str:
        return ""

    def shown(self) -> pd.DataFrame:
        """Every row that passes the filter and search, as the browser shows rows (flat, in order)."""
        src = self.source
        if src is None:
            return pd.DataFrame(columns=[])
        return src.display(src.frame.iloc[self.pager.order()])

    # ---- selection ---------------------------------------------------------------------
    def register_callback(self, callback: Callable[[KeyTable], None]) -> None:
        """Call ``callback(table)`` whenever the selection changes."""
        self._callbacks.append(callback)

    @property
    def selected(self) -> list:
        """Frame index labels of the selected rows, in frame order."""
        if self.source is None or not self.pager.selected:
            return []
        return list(self.source.frame.index[sorted(self.pager.selected)])

    @property
    def focus(self):
        """The frame index label of the row clicked last, if it is still selected."""
        f = self.pager.focus
        if self.source is None or f is None or f not in self.pager.selected:
            return None
        return self.source.frame.index[f]

    def select(self, labels: list) -> None:
        """Select frame rows by index label (the last one becomes the focus)."""
        if self.source is None:
            return
        index = self.source.frame.index
        positions = [int(p) for p in index.get_indexer(list(labels)) if p >= 0]
        self.pager.selected = set(positions)
        self.pager.focus = positions[-1] if positions else None
        self.refresh()
        self._changed()

    def _changed(self) -> None:
        for cb in self._callbacks:
            cb(self)

    # ---- browser events ----------------------------------------------------------------
    def _on_filter(self, change) -> None:
        if not self._quiet:
            self.pager.choice, self.pager.page = change["new"], 0
            self.refresh()

    def _on_fold(self, change) -> None:
        if not self._quiet:
            self.pager.folded, self.pager.page = bool(change["new"]), 0
            self.refresh()

    def _on_search(self, change) -> None:
        self.searches += 1  # queries received (the browser debounces typing into one)
        self.pager.search, self.pager.page = change["new"], 0
        self.refresh()

    def _on_msg(self, _widget, content, _buffers) -> None:
        kind = content.get("type")
        pager = self.pager
        if kind == "page":
            pager.page = max(0, min(int(content["page"]), pager.pages - 1))
        elif kind == "page_size":
            first = pager.page * pager.page_size
            pager.page_size = max(5, min(int(content["size"]), 500))
            pager.page = first // pager.page_size
        elif kind == "sort":
            column, ascending = pager.sort
            name = content.get("column") or None
            pager.sort = (name, not ascending) if name == column else (name, True)
            pager.page = 0
        elif kind == "expand":
            pager.toggle_group(int(content["id"]))
        elif kind == "click":
            before = (pager.selected.copy(), pager.focus)
            pager.click(GROUP if content.get("kind") == "group" else ROW, int(content["id"]),
                        toggle=bool(content.get("toggle")), extend=bool(content.get("extend")))
            self.refresh()
            if (pager.selected, pager.focus) != before:
                self._changed()
            return
        self.refresh()


class ReportSource(TableSource):
    """A Report's frame: status filters, status badges, the loaded mark and NaN/Inf badges."""

    COLUMNS = DISPLAY_COLUMNS
    FILTERS = FILTERS
    SEARCH = ["key", "ckpt_key"]
    COUNTED = ("status",)

    def __init__(self, report: Report, loaded: set[str], nonfinite: dict[str, str]):
        super().__init__(report.frame)
        self.report, self.loaded, self.nonfinite = report, loaded, nonfinite
        self._status = report.frame["status"].to_numpy()

    @property
    def folding(self):
        return self.report.folding  # the same keys: folded once per report

    def passes(self, choice: str) -> np.ndarray | None:
        if choice == "all":
            return None
        if choice == "problems":
            return self._status != "match"
        return self._status == choice

    def display(self, rows: pd.DataFrame) -> pd.DataFrame:
        return display_frame(rows, self.loaded, self.nonfinite)

    def group_cells(self, members: np.ndarray) -> dict[str, str]:
        keys = self.frame["key"].to_numpy()[members]
        ckpt = self.frame["ckpt_key"].to_numpy()[members]
        loaded = sum(1 for k in keys.tolist() if k in self.loaded) if self.loaded else 0
        bad = sum(1 for k in ckpt.tolist() if k in self.nonfinite) if self.nonfinite else 0
        return {"loaded": f"✓ {loaded:,}" if loaded else "",
                "nan/inf": _nonfinite_badge(f"{bad:,} tensors") if bad else "",
                "ckpt_key": ""}

    def sort_values(self, column: str):
        if column == "loaded":
            return self.frame["key"].isin(self.loaded).to_numpy()
        if column == "nan/inf":
            return self.frame["ckpt_key"].isin(list(self.nonfinite)).to_numpy()
        return super().sort_values(column)

    def counts_html(self) -> str:
        badges = " ".join(f"{_badge(s)} {n}" for s, n in self.report.summary.items())
        return f"<div>{badges} <span style='color:#666'>({len(self.frame)} rows)</span></div>"


class CheckpointSource(TableSource):
    """A checkpoint section alone (no model yet): key, shape, dtype, saved device, numel, size, file."""

    COLUMNS = CKPT_COLUMNS
    SEARCH = ["key"]

    def __init__(self, ck: Checkpoint, section: str | None, nonfinite: dict[str, str]):
        self.checkpoint, self.section = ck, ck.resolve(section)
        frame = ck.tensors(section).reset_index()
        super().__init__(frame)
        self.nonfinite = nonfinite

    def display(self, rows: pd.DataFrame) -> pd.DataFrame:
        nonfinite = self.nonfinite
        return pd.DataFrame({
            "key": rows["key"].map(html.escape),
            "shape": rows["shape"].map(_shape),
            "dtype": rows["dtype"].fillna(""),
            "device": rows["device"].fillna(""),
            "numel": rows["numel"].map("{:,}".format),
            "size": rows["nbytes"].map(human_size),
            "file": rows["file"].fillna("").map(lambda f: html.escape(str(f).rsplit("/", 1)[-1])),
            "nan/inf": rows["key"].map(lambda k: _nonfinite_badge(nonfinite[k]) if k in nonfinite else ""),
        }).reset_index(drop=True)

    def group_cells(self, members: np.ndarray) -> dict[str, str]:
        numel = int(self.frame["numel"].to_numpy()[members].sum())
        size = int(self.frame["nbytes"].to_numpy()[members].sum())
        keys = self.frame["key"].to_numpy()[members]
        bad = sum(1 for k in keys.tolist() if k in self.nonfinite) if self.nonfinite else 0
        return {"numel": f"{numel:,}", "size": human_size(size),
                "nan/inf": _nonfinite_badge(f"{bad:,} tensors") if bad else ""}

    def sort_values(self, column: str):
        if column == "size":
            return self.frame["nbytes"].to_numpy()
        if column == "nan/inf":
            return self.frame["key"].isin(list(self.nonfinite)).to_numpy()
        return super().sort_values(column)

    def counts_html(self) -> str:
        f = self.frame
        total = int(f["nbytes"].sum())
        dtypes = f.groupby("dtype")["nbytes"].sum().sort_values(ascending=False)
        by = ", ".join(f"{html.escape(str(d))} {human_size(int(b))}" for d, b in dtypes.head(4).items())
        return (f"<div class='ckptviz-ckpt-counts'><b>{len(f):,} tensors</b>, {human_size(total)} "
                f"<span style='color:#666'>({by}) in section "
                f"<code>{html.escape(self.section or '(top level)')}</code>; checkpoint only: pick a model to "
                "compare</span></div>")


class ReportTable(KeyTable):
    """The inspector's table: a Report's comparison (``show``), or a checkpoint section alone before a
    model is picked (``show_checkpoint``). ``selected`` gives the frame rows (index labels) picked:
    the report's, or ``checkpoint_frame``'s."""

    CSS = {"root": "ckptviz-report-table", "counts": "ckptviz-counts", "filter": "ckptviz-status-filter",
           "search": "ckptviz-search", "table": "ckptviz-table"}

    def __init__(self):
        self.report: Report | None = None
        self.checkpoint_source: CheckpointSource | None = None
        self.loaded: set[str] = set()
        self.nonfinite: dict[str, str] = {}  # checkpoint key -> "NaN 3, Inf 1", from a scan of this section
        super().__init__()

    @property
    def checkpoint_frame(self) -> pd.DataFrame | None:
        """The checkpoint-only rows (one per tensor), when no report is shown."""
        return self.checkpoint_source.frame if self.checkpoint_source is not None else None

    def show(self, report: Report | None, loaded: set[str] | None = None) -> None:
        keep = report is not None and self.report is not None and len(report.frame) == len(self.report.frame) \
            and report.frame.index.equals(self.report.frame.index) and loaded is not None
        self.report, self.checkpoint_source = report, None
        self.loaded = set(loaded or ())
        self.use(ReportSource(report, self.loaded, self.nonfinite) if report is not None else None, keep=keep)

    def show_checkpoint(self, ck: Checkpoint, section: str | None = None) -> None:
        self.report, self.loaded = None, set()
        self.checkpoint_source = CheckpointSource(ck, section, self.nonfinite)
        self.use(self.checkpoint_source)

    def mark_nonfinite(self, flags: dict[str, str]) -> None:
        """Badge the rows whose checkpoint key is in ``flags`` (checkpoint key -> "NaN 3, Inf 1")."""
        self.nonfinite = dict(flags)
        src = self.source
        if src is not None:
            src.nonfinite = self.nonfinite
            self.refresh()

    def _empty_html(self) -> str:
        return "<i>open a checkpoint to see its tensors; pick a model to compare</i>"
