"""The inspector's panels: the selected tensor (statistics and histograms, checkpoint beside model),
devices and train/eval mode, and the result of the last load with its plain-PyTorch equivalent."""

from __future__ import annotations

import html
from collections import Counter

import ipywidgets as w
import pandas as pd
import torch
from IPython.display import Image, display
from torch import nn

from ..compare import Report, model_tensors
from ..load import LoadResult
from ..plots import figure_to_png, histogram_figure, shorten_key
from ..snippet import torch_code
from ..stats import histogram, tensor_stats

CODE_STYLE = ("background:#f6f8fa;padding:6px;user-select:text;white-space:pre-wrap;word-break:normal;"
              "overflow-wrap:normal;font-size:85%")
STAT_ROWS = ["numel", "mean", "std", "min", "max", "abs_max", "l2", "zero_frac", "nan", "inf"]


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
        table, hists = tensor_comparison(ckpt, live.detach() if live is not None else None)
        self.output.clear_output(wait=True)
        with self.output:
            if len(table.columns):
                display(table.map(_fmt))
            if hists:
                fig = histogram_figure(hists, title=shorten_key(title, 50))
                display(Image(figure_to_png(fig)))


def _desc(row, side: str) -> str:
    shape = row[f"{side}_shape"]
    if not isinstance(shape, tuple):
        return "—"
    return f"{tuple(shape)} {row[f'{side}_dtype']} on {row[f'{side}_device']}"


def device_summary(report: Report, model: nn.Module) -> str:
    """Where the checkpoint's tensors were saved, where the model holds them, and what a load moves."""
    lines = []
    for r in report.device_moves().itertuples(index=False):
        verb = "stay on" if r.ckpt_device == r.model_device else "will be copied to"
        lines.append(f"{r.tensors} tensors saved on <b>{r.ckpt_device}</b> {verb} <b>{r.model_device}</b>")
    held = Counter(str(t.device) for t in model_tensors(model).values())
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
