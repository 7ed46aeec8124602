"""CheckpointSeries: the notebook widget over ``ckptviz.diff_series``. A run (a folder of checkpoints, or
paths), a reference (each checkpoint against the previous one or the first) and a Read button; then a
heatmap of layers x checkpoints (click a cell: that checkpoint's detailed diff against its reference
opens below), the flags (frozen, norm exploding, NaN/Inf) in the shared table, and every layer's norm
over the run. It only arranges the SeriesReport and calls core verbs."""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..diff import DiffReport
from ..errors import CheckpointError, UnsafeCheckpointError
from ..plots import figure_to_png
from ..plots_series import MAX_ROWS, METRIC_LABELS, cell_colors, merge_rows
from ..series import FLAG_COLOURS, FLAGS, SeriesReport, diff_series
from .diff_view import CheckpointDiff, number
from .heatmap_view import HeatmapView
from .pager import TableSource
from .panels import card, show_png
from .table import KeyTable
from .working import Working

HEAT_METRICS = ("rel_change", "max_abs_change", "changed_frac", "norm", "nonfinite")
FOLDABLE = ("rel_change", "max_abs_change", "norm", "nonfinite")  # what SeriesReport.folded() aggregates
PICK_HINT = "<i>click a cell of the heatmap (or a flag) to compare that checkpoint with its reference</i>"


def _flag_badge(flag: str) -> str:
    return (f"<span class='ckptviz-flag ckptviz-flag-{flag}' style='background:{FLAG_COLOURS[flag]};"
            f"color:#1f2328;padding:1px 5px;border-radius:3px'>{flag}</span>")


class FlagsSource(TableSource):
    """A SeriesReport's flags: one row per finding, filtered by flag."""

    COLUMNS = ["key", "flag", "label", "detail"]
    FILTERS = ("all", *FLAGS)
    SEARCH = ["key"]
    COUNTED = ("flag",)
    EMPTY = "no flags"

    def __init__(self, report: SeriesReport):
        super().__init__(report.flags)
        self.report = report

    def passes(self, choice: str) -> np.ndarray | None:
        return None if choice == "all" else (self.frame["flag"] == choice).to_numpy()

    def display(self, rows: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({
            "key": rows["key"].map(html.escape),
            "flag": rows["flag"].map(_flag_badge),
            "label": rows["label"].map(lambda v: html.escape(v) if isinstance(v, str) else "—"),
            "detail": rows["detail"].map(html.escape),
        }).reset_index(drop=True)

    def counts_html(self) -> str:
        s = self.report.summary
        badges = " ".join(f"{_flag_badge(f)} {s[f]}" for f in FLAGS)
        return (f"<div>{badges} <span style='color:#666'>({s['checkpoints']} checkpoints, {s['keys']} keys; "
                "select a flag to open the checkpoint where it appears)</span></div>")


class FlagsTable(KeyTable):
    """The flags of a run, in the table every ckptviz widget uses."""

    CSS = {"root": "ckptviz-series-flags", "counts": "ckptviz-series-counts", "filter": "ckptviz-series-filter",
           "search": "ckptviz-series-search", "table": "ckptviz-series-flags-table"}

    def show(self, report: SeriesReport | None) -> None:
        self.use(FlagsSource(report) if report is not None else None)

    def _empty_html(self) -> str:
        return "<i>read a run to see its flags</i>"


class CheckpointSeries(Working, w.VBox):
    """A training run at a glance: which layers moved, which froze, when a norm exploded or NaN appeared.

    ``run`` is a folder of checkpoints (``epoch=1.ckpt`` ... , ordered by the step saved in them or in
    their names) or a sequence of paths; given, it is read at once. Click a heatmap cell (or a flag) to
    see that checkpoint's :class:`CheckpointDiff` against its reference. ``.report`` is the SeriesReport
    shown, ``.pair`` the DiffReport opened, ``.error`` the last error, ``.timings`` what steps took.
    """

    def __init__(self, run: str | os.PathLike | Sequence[Any] | None = None, *, reference: str = "previous",
                 metric: str = "rel_change", order: str | None = None, trust: bool = False):
        self.report: SeriesReport | None = None
        self.error: str | None = None
        self.timings: dict[str, float] = {}
        self.order = order
        self.shown: pd.DataFrame | None = None  # the heatmap's values (rows x checkpoints), as drawn
        self.norms_figure: Figure | None = None
        self._row_keys: list[str | None] = []  # per heatmap row: its key, or None for a pattern / merged run
        self._given: list[Any] | None = None  # a sequence given in code, used while the path box is untouched
        if run is not None and not isinstance(run, (str, os.PathLike)):
            self._given = list(run)
        text = os.fspath(run) if isinstance(run, (str, os.PathLike)) else (
            f"{len(self._given)} checkpoints given in code" if self._given is not None else "")
        self._given_text = text
        self.path = w.Text(value=text, placeholder="folder of a run: epoch=1.ckpt, epoch=2.ckpt, …",
                           description="run", layout=w.Layout(width="460px"))
        self.path.add_class("ckptviz-series-path")
        self.reference = w.ToggleButtons(options=[("vs previous", "previous"), ("vs first", "first")],
                                         value=reference, style={"button_width": "auto"})
        self.reference.add_class("ckptviz-series-reference")
        self.metric = w.Dropdown(options=[(METRIC_LABELS.get(m, m), m) for m in HEAT_METRICS], value=metric,
                                 description="colour", layout=w.Layout(width="380px"))
        self.metric.add_class("ckptviz-series-metric")
        self.read_button = w.Button(description="Read run", button_style="primary", icon="line-chart",
                                    layout=w.Layout(width="auto"))
        self.read_button.add_class("ckptviz-series-read")
        self.trust = w.Checkbox(value=trust, indent=False, layout=w.Layout(display="none"),
                                description="Trust these files: I know where they come from")
        self.trust.add_class("ckptviz-trust")
        self.message = w.HTML()
        self.message.add_class("ckptviz-series-message")
        self.progress = w.Output()
        self.heatmap = HeatmapView(empty="read a run to see how each layer changed")
        self.heatmap.add_class("ckptviz-series-heatmap")
        self.norms = w.Output()
        self.norms.add_class("ckptviz-series-norms")
        self.flags_table = FlagsTable()
        self.pair_header = w.HTML(PICK_HINT)
        self.pair_header.add_class("ckptviz-series-pair-header")
        self.pair_view = CheckpointDiff()
        self.pair_view.children[0].layout.display = "none"  # the pair comes from the run, not from pickers
        self.pair_view.compare_button.layout.display = "none"
        self.pair_view.layout.display = "none"

        self.read_button.on_click(lambda _: self.read())
        self.metric.observe(lambda _: self._draw(), names="value")
        self.reference.observe(self._on_reference, names="value")
        self.trust.observe(lambda change: self.read() if change["new"] else None, names="value")
        self.heatmap.on_msg(self._on_click)
        self.flags_table.register_callback(lambda _: self._on_flag())

        super().__init__([
            w.HBox([self.path, self.reference, self.read_button], layout=w.Layout(align_items="center",
                                                                                    flex_flow="row wrap")),
            self.trust, self.message, self.progress,
            card("Layers × checkpoints (click a cell to open that pair)", self.metric, self.heatmap),
            w.HBox([card("Flags", self.flags_table, width="55%"),
                    card("Norm of each layer over the run", self.norms, width="45%")],
                   layout=w.Layout(width="100%")),
            card("Checkpoint vs its reference", self.pair_header, self.pair_view),
        ])
        self.add_class("ckptviz-series")
        if run is not None:
            self.read()

    # ---- public verbs --------------------------------------------------------------------
    @property
    def pair(self) -> DiffReport | None:
        """The DiffReport of the pair opened below the heatmap (None before a click)."""
        return self.pair_view.report if self.pair_view.layout.display != "none" else None

    def read(self, run: str | os.PathLike | Sequence[Any] | None = None) -> SeriesReport | None:
        """Read the run (``run``, or the folder in the box) once and show it; errors go to the message line."""
        if run is not None:
            if isinstance(run, (str, os.PathLike)):
                self._given, self.path.value = None, os.fspath(run)
            else:
                self._given = list(run)
                self._given_text = self.path.value = f"{len(self._given)} checkpoints given in code"
        source: Any = self._given if self._given is not None and self.path.value == self._given_text else None
        if source is None:
            source = os.path.expanduser(self.path.value.strip())
            if not source:
                self._say("Type the folder of a training run (its checkpoints side by side) and press Read run.",
                          error=True)
                return None
        what = html.escape(source if isinstance(source, str) else self.path.value)
        started = time.perf_counter()
        with self._work(f"reading every checkpoint of <code>{what}</code> once…"):
            with self.progress:  # tqdm.auto draws its bar here for big runs
                try:
                    report = diff_series(source, reference=self.reference.value, order=self.order,
                                         trust=self.trust.value)
                finally:
                    self.progress.clear_output()
            self.report = report
            self.timings["series"] = time.perf_counter() - started
            self.trust.layout.display = "" if self.trust.value else "none"
            self._draw()
            self.flags_table.show(report)
            self._draw_norms()
            self._close_pair()
            s = report.summary
            found = ", ".join(f"{s[f]} {f}" for f in FLAGS if s[f]) or "no flags"
            self._say(f"✓ {s['checkpoints']} checkpoints × {s['keys']} keys read in {self.timings['series']:.2f} s "
                      f"(each against the {report.reference} one): {found}. Click a cell to open that pair.")
        return self.report

    def open_pair(self, checkpoint: int, key: str | None = None, *, other: int | None = None) -> DiffReport | None:
        """Show the detailed diff of checkpoint ``checkpoint`` (a position in the run) against its reference
        (or ``other``) below the heatmap, with ``key``'s row selected when given."""
        report = self.report
        if report is None:
            self._say("Read a run first.", error=True)
            return None
        n = len(report.labels)
        if not 0 <= checkpoint < n:
            self._say(f"No checkpoint {checkpoint}: this run has {n} (0 … {n - 1}).", error=True)
            return None
        ref = report.reference_of(checkpoint) if other is None else other
        label = html.escape(report.labels[checkpoint])
        if ref is None:
            self._close_pair()
            self.pair_header.value = (f"<b>{label}</b> is the first checkpoint of the run: there is nothing before it "
                                      "to compare it with. Click a cell of a later checkpoint.")
            return None
        pv = self.pair_view
        with self._work(f"comparing <code>{label}</code> with <code>{html.escape(report.labels[ref])}</code>…"):
            for side, j in (("a", ref), ("b", checkpoint)):
                pv.set_source(side, report.checkpoints[j])
                chooser = getattr(pv, f"side_{side}").section
                if report.sections[j] in [v for _, v in chooser.options]:
                    chooser.value = report.sections[j]
                if pv.error:
                    raise CheckpointError(pv.error)
            if pv.compare() is None:
                raise CheckpointError(pv.error or "the comparison failed")
            pv.layout.display = ""
            self.pair_header.value = (f"<b>{label}</b> against <b>{html.escape(report.labels[ref])}</b> "
                                      f"(its {'previous' if ref == checkpoint - 1 else 'reference'} checkpoint)"
                                      + (f"; key <code>{html.escape(key)}</code>" if key else ""))
            self._mark(checkpoint, key)
            if key is not None:
                frame = pv.report.frame
                hit = frame.index[(frame["key"] == key) | (frame["key_b"] == key)]
                if len(hit):
                    pv.table.select([hit[0]])
            self._say(f"✓ opened {label} against {html.escape(report.labels[ref])} below.")
        return self.pair

    # ---- drawing -------------------------------------------------------------------------
    def _draw(self) -> None:
        report = self.report
        if report is None:
            return
        metric = self.metric.value
        fold = len(report.keys) > MAX_ROWS and metric in FOLDABLE
        matrix = report.folded(metric) if fold else report.matrix(metric)
        shown = merge_rows(matrix, MAX_ROWS)
        self.shown = shown
        values = shown.to_numpy(dtype=float)
        colours, norm, log = cell_colors(values)
        keys = set(report.keys)
        self._row_keys = [r if r in keys else None for r in map(str, shown.index)]
        name = METRIC_LABELS.get(metric, metric)
        titles = [[f"{row}\n{col}: {name} = {'—' if v != v else number(float(v))}"
                   for col, v in zip(shown.columns, vals)] for row, vals in zip(map(str, shown.index), values)]
        merged = (f"; {len(matrix)} {'patterns' if fold else 'keys'} shown as {len(shown)} rows"
                  if len(shown) < len(matrix) else "")
        folded = f"; {len(report.keys)} keys folded into layer patterns" if fold else ""
        with self.heatmap.hold_sync():
            self.heatmap.rows = [str(r) for r in shown.index]
            self.heatmap.columns = [str(c) for c in shown.columns]
            self.heatmap.cells = colours.tolist()
            self.heatmap.titles = titles
            self.heatmap.selected = []
            self.heatmap.legend = (f"{name}: light {number(norm.vmin)} → dark {number(norm.vmax)}"
                                   f"{' (log scale)' if log else ''}; grey: unchanged, red: infinite, hatched: not "
                                   f"compared{folded}{merged}")

    def _draw_norms(self) -> None:
        self.norms_figure = self.report.norms_plot()
        show_png(self.norms, figure_to_png(self.norms_figure), "norm of each layer over the run")

    def _mark(self, checkpoint: int, key: str | None) -> None:
        row = self._row_keys.index(key) if key is not None and key in self._row_keys else None
        self.heatmap.selected = [row, checkpoint] if row is not None else []

    def _close_pair(self) -> None:
        self.pair_view.layout.display = "none"
        self.pair_header.value = PICK_HINT
        self.heatmap.selected = []

    # ---- events --------------------------------------------------------------------------
    def _busy_buttons(self) -> list[w.Button]:
        return [self.read_button]

    def _error_message(self, error: Exception, text: str) -> str | None:
        if isinstance(error, UnsafeCheckpointError):
            self.trust.layout.display = ""
            return (f"{text}\nTick “Trust these files” only if you know where they come from; ckptviz will then "
                    "read their tensors without running any of the above.")
        return super()._error_message(error, text)

    def _on_reference(self, _change) -> None:
        if self.report is not None:
            self._say("Reference changed: press Read run to measure the run against it.")

    def _on_click(self, _widget, content, _buffers) -> None:
        if content.get("type") != "click" or self.report is None:
            return
        row, col = int(content["row"]), int(content["col"])
        key = self._row_keys[row] if 0 <= row < len(self._row_keys) else None
        self.open_pair(col, key)
        if key is None and 0 <= row < len(self._row_keys) and self.pair is not None:
            self.heatmap.selected = [row, col]

    def _on_flag(self) -> None:
        labels = self.flags_table.selected
        if not labels or self.report is None:
            return
        row = self.flags_table.source.frame.loc[self.flags_table.focus if self.flags_table.focus is not None
                                                else labels[-1]]
        if pd.isna(row["checkpoint"]):  # frozen: the whole run; show its last step
            self.open_pair(len(self.report.labels) - 1, row["key"])
        else:
            self.open_pair(int(row["checkpoint"]), row["key"])

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # static exports (nbconvert) show the report instead
            bundle["text/html"] = self.report._repr_html_() if self.report is not None else (
                "<p class='ckptviz-series'>CheckpointSeries: no run read yet; run the notebook in Jupyter to use "
                "the widget.</p>")
        return bundle
