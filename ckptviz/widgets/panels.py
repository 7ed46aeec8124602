"""The inspector's panels: the selected tensor (statistics and histograms, checkpoint beside model,
with a warning when either holds NaN or Inf), devices and train/eval mode, the result of the last load
with its plain-PyTorch equivalent, and the section scan (NaN/Inf in every tensor, layer overview)."""

from __future__ import annotations

import base64
import html
import os
from collections import Counter
from collections.abc import Callable

import ipywidgets as w
import pandas as pd
import torch
from IPython.display import Image, display
from matplotlib.figure import Figure
from torch import nn

from ..checkpoint import Checkpoint, human_size
from ..compare import Report, model_tensors
from ..errors import CheckpointError
from ..load import LoadResult
from ..plots import figure_to_png, histogram_figure, layer_summary_figure, shorten_key
from ..snippet import torch_code
from ..stats import histogram, tensor_stats

CODE_STYLE = ("background:#f6f8fa;padding:6px;user-select:text;white-space:pre-wrap;word-break:normal;"
              "overflow-wrap:normal;font-size:85%")
STAT_ROWS = ["numel", "mean", "std", "min", "max", "abs_max", "l2", "zero_frac", "nan", "inf"]


def card(title: str, *children: w.Widget, css: str = "", width: str = "100%") -> w.VBox:
    """A titled, bordered box: how every ckptviz widget groups its parts."""
    box = w.VBox([w.HTML(f"<b>{title}</b>"), *children],
                 layout=w.Layout(border="1px solid #ddd", padding="6px", margin="2px", width=width))
    if css:
        box.add_class(css)
    return box


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tensor_comparison(ckpt: torch.Tensor | None, model: torch.Tensor | None, bins: int = 64):
    """Statistics table and histograms of a checkpoint tensor and its model counterpart (either may be None)."""
    stats, tensors = {}, {"checkpoint": ckpt, "model": model}
    for label, t in tensors.items():
        if t is not None and t.device.type != "meta":
            stats[label] = tensor_stats(t)
    lows = [s["min"] for s in stats.values() if s["numel"] and s["min"] == s["min"]]
    highs = [s["max"] for s in stats.values() if s["numel"] and s["max"] == s["max"]]
    rng = (min(lows), max(highs)) if lows and highs else None
    if rng is not None and rng[0] == rng[1]:
        rng = (rng[0] - 0.5, rng[1] + 0.5)
    hists = {label: histogram(tensors[label], bins=bins, range=rng) for label in stats if rng is not None}
    table = pd.DataFrame({label: [s.get(k) for k in STAT_ROWS] for label, s in stats.items()}, index=STAT_ROWS)
    return table, hists


class TensorPanel(w.VBox):
    """Shapes, dtypes, devices, statistics and histograms of the selected row."""

    def __init__(self):
        self.header = w.HTML("<i>select a row to see its tensor</i>")
        self.output = w.Output()
        self.output.add_class("ckptviz-histogram")
        super().__init__([self.header, self.output])
        self.add_class("ckptviz-tensor-panel")

    def clear(self, message: str = "<i>select a row to see its tensor</i>") -> None:
        self.header.value = message
        self.output.clear_output()

    def show(self, report: Report, model: nn.Module, label: int) -> None:
        row = report.frame.loc[label]
        ckpt = report.checkpoint.tensor(row["ckpt_key"], report.section) if isinstance(row["ckpt_key"], str) else None
        live = model_tensors(model).get(row["key"]) if isinstance(row["key"], str) else None
        title = row["key"] if isinstance(row["key"], str) else row["ckpt_key"]
        self.header.value = (
            f"<b title='{html.escape(title)}'>{html.escape(shorten_key(title, 60))}</b> "
            f"<span class='ckptviz-status-{row['status']}'>({row['status']})</span><br>"
            f"checkpoint: {_desc(row, 'ckpt')} &nbsp;|&nbsp; model: {_desc(row, 'model')}"
        )
        self._render(ckpt, live.detach() if live is not None else None, title)


    def show_checkpoint(self, ck: Checkpoint, section: str | None, key: str) -> None:
        """One checkpoint tensor alone (no model): what it is, its statistics and histogram."""
        info = ck.tensors(section).loc[key]
        shape = tuple(info["shape"]) if isinstance(info["shape"], tuple) else info["shape"]
        self.header.value = (f"<b title='{html.escape(key)}'>{html.escape(shorten_key(key, 60))}</b><br>"
                             f"checkpoint: {shape} {info['dtype']} saved on {info['device']}")
        self._render(ck.tensor(key, section), None, key)

    def _render(self, ckpt: torch.Tensor | None, live: torch.Tensor | None, title: str) -> None:
        """The statistics table and histograms of the two sides, and a NaN/Inf warning in the header."""
        table, hists = tensor_comparison(ckpt, live)
        self.header.value += nonfinite_warning(table)
        self.output.clear_output(wait=True)
        with self.output:
            if len(table.columns):
                display(table.map(_fmt))
            if hists:
                display(Image(figure_to_png(histogram_figure(hists, title=shorten_key(title, 50)))))


def _desc(row, side: str) -> str:
    shape = row[f"{side}_shape"]
    if not isinstance(shape, tuple):
        return "—"
    return f"{tuple(shape)} {row[f'{side}_dtype']} on {row[f'{side}_device']}"


def device_summary(report: Report, model: nn.Module) -> str:
    """Where the checkpoint's tensors were saved, where the model holds them, and what a load moves."""
    lines = []
    for r in report.device_moves().itertuples(index=False):
        if r.model_device == "meta":  # a load assigns them (load_partial(assign=True)) onto the CPU
            lines.append(f"{r.tensors} tensors saved on <b>{r.ckpt_device}</b> will be materialized on <b>cpu</b> "
                         "(the model holds them on meta, with no memory)")
            continue
        verb = "stay on" if r.ckpt_device == r.model_device else "will be copied to"
        lines.append(f"{r.tensors} tensors saved on <b>{r.ckpt_device}</b> {verb} <b>{r.model_device}</b>")
    held = Counter(report.frame["model_device"].dropna().value_counts().to_dict())  # the model's rows
    if len(held) > 1:
        parts = ", ".join(f"{d} ({n})" for d, n in held.most_common())
        lines.append(f"<span style='color:#b05a00'>⚠ the model is spread over several devices: {parts}</span>")
    elif held:
        lines.append(f"target device: <b>{next(iter(held))}</b>")
    return "<br>".join(lines) or "<i>nothing to load</i>"


class DevicePanel(w.VBox):
    """The device summary and a train/eval switch for the model."""

    def __init__(self):
        self.summary = w.HTML()
        self.summary.add_class("ckptviz-devices")
        self.mode = w.ToggleButtons(options=["train", "eval"], value="train", style={"button_width": "70px"},
                                    tooltips=["model.train()", "model.eval() (for inference after loading)"])
        self.mode.add_class("ckptviz-mode")
        self._model: nn.Module | None = None
        self.mode.observe(self._on_mode, names="value")
        super().__init__([self.summary, w.HBox([w.HTML("model mode:&nbsp;"), self.mode])])
        self.add_class("ckptviz-device-panel")

    def show(self, report: Report | None, model: nn.Module | None) -> None:
        self._model = model
        if model is not None:
            self.mode.value = "train" if model.training else "eval"
        self.summary.value = device_summary(report, model) if report is not None and model is not None else ""

    def _on_mode(self, change) -> None:
        if self._model is not None:
            self._model.train(change["new"] == "train")


class ResultPanel(w.VBox):
    """The last load: what loaded, what was skipped and why, what is still missing; and the code."""

    def __init__(self):
        self.summary = w.HTML()
        self.summary.add_class("ckptviz-result")
        self.code = w.HTML()
        self.code.add_class("ckptviz-code")
        super().__init__([self.summary, self.code])

    def show(self, result: LoadResult | None, message: str = "") -> None:
        if result is None:
            self.summary.value, self.code.value = message, ""
            return
        skipped = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>"
                          for k, v in list(result.skipped.items())[:50])
        missing = ", ".join(f"<code>{html.escape(k)}</code>" for k in result.missing_keys[:50])
        state = " (undone)" if result.undone else ""
        self.summary.value = (
            f"<div><b>{message or 'Loaded'}{state}:</b> {len(result.loaded)} tensors loaded, "
            f"{len(result.skipped)} skipped, {len(result.missing_keys)} still missing, "
            f"{len(result.unexpected_keys)} unexpected in the checkpoint.</div>"
            + (f"<div>skipped:<ul>{skipped}</ul></div>" if skipped else "")
            + (f"<div>still missing: {missing}</div>" if missing else "")
        )
        code = torch_code(result)
        self.code.value = (
            "<details open><summary>the same load in plain PyTorch</summary>"
            f"<pre style='{CODE_STYLE}'>{html.escape(code)}</pre></details>"
        )


# ---- NaN/Inf and the section scan ------------------------------------------------------------------
def nonfinite_text(nan: float, inf: float) -> str:
    """"NaN 3, Inf 1" (zero and undefined counts left out; "" when there is neither)."""
    return ", ".join(f"{name} {int(n):,}" for name, n in (("NaN", nan), ("Inf", inf)) if n == n and n > 0)


def nonfinite_warning(table: pd.DataFrame) -> str:
    """A red line naming each tensor (column of a ``tensor_comparison`` table) that holds NaN or Inf."""
    parts = [f"the {label} tensor holds {text}" for label in table.columns
             if (text := nonfinite_text(table.loc["nan", label] or 0, table.loc["inf", label] or 0))]
    if not parts:
        return ""
    return f"<div class='ckptviz-nonfinite' style='color:#b00020'><b>⚠ {html.escape('; '.join(parts))}</b></div>"


def show_png(output: w.Output, png: bytes, text: str = "figure") -> None:
    """Show PNG bytes in ``output`` by setting its outputs (works in a kernel and from plain Python)."""
    output.outputs = ({"output_type": "display_data", "metadata": {},
                       "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": text}},)


class ScanPanel(w.VBox):
    """Statistics of every tensor of the checkpoint section, on demand (``Checkpoint.stats``, with a
    progress bar): "Scan for NaN/Inf" names the tensors holding them and tells the callbacks (the
    inspector marks its table); "Layer overview" shows std and norm per layer in model order.
    ``source()`` gives the (checkpoint, section) to scan; results are kept until it changes."""

    def __init__(self, source: Callable[[], tuple[Checkpoint | None, str | None]]):
        self._source = source
        self._callbacks: list[Callable[[ScanPanel], None]] = []
        self._quiet = False
        self.stats: pd.DataFrame | None = None  # Checkpoint.stats of the scanned section
        self.scanned: tuple[Checkpoint, str | None] | None = None  # what ``stats`` describe
        self.figure: Figure | None = None  # the layer overview shown
        self.scan_button = w.Button(description="Scan for NaN/Inf", icon="search", layout=w.Layout(width="auto"))
        self.scan_button.add_class("ckptviz-scan")
        self.overview = w.ToggleButton(description="Layer overview", icon="bar-chart", layout=w.Layout(width="auto"),
                                       tooltip="std and norm of every tensor in model order")
        self.overview.add_class("ckptviz-layer-overview")
        self.progress = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="140px", visibility="hidden"))
        self.progress.add_class("ckptviz-scan-progress")
        self.message = w.HTML()
        self.message.add_class("ckptviz-scan-message")
        self.output = w.Output(layout=w.Layout(display="none"))
        self.output.add_class("ckptviz-layer-figure")
        self.scan_button.on_click(lambda _: self.scan())
        self.overview.observe(self._on_overview, names="value")
        super().__init__([w.HBox([self.scan_button, self.overview, self.progress, self.message]), self.output])
        self.add_class("ckptviz-scan-panel")

    def register_callback(self, callback: Callable[[ScanPanel], None]) -> None:
        """Call ``callback(panel)`` after each scan, and when its results are forgotten."""
        self._callbacks.append(callback)

    @property
    def nonfinite(self) -> dict[str, str]:
        """Checkpoint key -> "NaN 3, Inf 1" for the scanned tensors that hold NaN or Inf."""
        if self.stats is None:
            return {}
        bad = self.stats[(self.stats["nan"] > 0) | (self.stats["inf"] > 0)]
        return {k: nonfinite_text(r["nan"], r["inf"]) for k, r in bad.iterrows()}

    def _current(self) -> bool:
        ck, section = self._source()
        return self.scanned is not None and self.scanned[0] is ck and self.scanned[1] == section

    def sync(self) -> None:
        """Forget the results when the source no longer gives the checkpoint and section they describe
        (callbacks are told, as after a scan, when there were results)."""
        if not self._current():
            had = self.stats is not None
            self.stats, self.scanned, self.figure = None, None, None
            self.message.value = ""
            self.output.outputs = ()
            self._overview_off()
            if had:
                for cb in self._callbacks:
                    cb(self)

    def scan(self) -> pd.DataFrame | None:
        """Statistics of every tensor in the section (once per checkpoint and section); errors are shown."""
        ck, section = self._source()
        if ck is None:
            self.message.value = "<span class='ckptviz-error' style='color:#b00020'>Open a checkpoint first.</span>"
            return None
        if not self._current():
            self.message.value = "Working: reading every tensor…"
            self.progress.value, self.progress.layout.visibility = 0.0, "visible"
            try:
                self.stats = ck.stats(section, progress=False, tick=lambda f: setattr(self.progress, "value", f))
                self.scanned = (ck, section)
            except Exception as e:  # noqa: BLE001 - the widget must never show a raw traceback
                kind = "" if isinstance(e, CheckpointError) else f"Unexpected error ({type(e).__name__}): "
                self.message.value = (f"<span class='ckptviz-error' style='color:#b00020'>"
                                      f"{html.escape(kind + str(e))}</span>")
                return None
            finally:
                self.progress.layout.visibility = "hidden"
        self.message.value = self._summary()
        for cb in self._callbacks:
            cb(self)
        return self.stats

    def _summary(self) -> str:
        bad = self.nonfinite
        if not bad:
            return f"✓ {len(self.stats)} tensors scanned: no NaN or Inf"
        named = ", ".join(f"<code>{html.escape(shorten_key(k, 40))}</code> ({v})" for k, v in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return (f"<span class='ckptviz-nonfinite' style='color:#b00020'><b>⚠ {len(bad)} of {len(self.stats)} "
                f"tensors hold NaN or Inf</b>: {named}{more}</span>")

    def _on_overview(self, change) -> None:
        if self._quiet:
            return
        if not change["new"]:
            self.output.layout.display = "none"
            return
        stats = self.scan()
        if stats is None:
            self._overview_off()
            return
        ck, section = self.scanned
        name = os.path.basename(ck.path) if ck.path else "checkpoint"
        self.figure = layer_summary_figure(stats, title=f"{name} [{section or '(top level)'}]: per-layer statistics")
        show_png(self.output, figure_to_png(self.figure), "layer overview")
        self.output.layout.display = ""

    def _overview_off(self) -> None:
        self.output.layout.display = "none"
        self._quiet = True
        self.overview.value = False
        self._quiet = False


class SizePanel(w.VBox):
    """What makes the checkpoint section this big: its bytes by layer, layer pattern, dtype or file
    (``Checkpoint.sizes``), the ten largest groups."""

    CHOICES = (("size by …", ""), ("size by layer", "layer"), ("by layer pattern", "pattern"), ("by dtype", "dtype"),
               ("by file", "file"))

    def __init__(self):
        # nothing is computed until a grouping is chosen (a 500,000-key section takes a second)
        self.by = w.Dropdown(options=self.CHOICES, value="", layout=w.Layout(width="auto"),
                             tooltip="what makes this checkpoint this big")
        self.by.add_class("ckptviz-size-by")
        self.table = w.HTML()
        self.table.add_class("ckptviz-sizes")
        self._source: tuple[Checkpoint, str | None] | None = None
        self.by.observe(lambda _: self._draw(), names="value")
        super().__init__([self.by, self.table])
        self.add_class("ckptviz-size-panel")

    def show(self, ck: Checkpoint | None, section: str | None = None) -> None:
        self._source = (ck, section) if ck is not None and ck.sections else None
        self._draw()

    def _draw(self) -> None:
        if self._source is None or not self.by.value:
            self.table.value = ""
            return
        ck, section = self._source
        sizes = ck.sizes(section, by=self.by.value)
        rows = "".join(
            f"<tr><td title='{html.escape(str(k))}'>{html.escape(shorten_key(str(k), 48))}</td>"
            f"<td style='text-align:right'>{int(r['tensors']):,}</td>"
            f"<td style='text-align:right'>{human_size(int(r['nbytes']))}</td>"
            f"<td style='text-align:right'>{r['share']:.1%}</td></tr>"
            for k, r in sizes.head(10).iterrows())
        more = f"<div style='color:#666'>and {len(sizes) - 10:,} more</div>" if len(sizes) > 10 else ""
        self.table.value = (f"<table style='font-size:85%'><tr><th>{html.escape(self.by.value)}</th><th>tensors</th>"
                            f"<th>size</th><th>share</th></tr>{rows}</table>{more}")
