"""The inspector's conversion controls: suggested pairings (never loaded until accepted) accepted
per row, per group (select a folded line) or all at once; and, on a row whose shapes differ, the
adaptations that fit it with a preview of what they would write."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable

import ipywidgets as w
from torch import nn

from ..adapt import applicable, plan, preview
from ..compare import STATUS_COLOURS, Report, model_tensors
from ..errors import AdaptError
from ..plots import figure_to_png, histogram_figure, shorten_key
from ..stats import histogram


class SuggestionPanel(w.VBox):
    """How many pairings are only suggested or ambiguous, with *Accept selected* and *Accept all*.
    Hidden when the report has neither. The inspector gives the callbacks (``on_accept(keys)``, with
    None for all)."""

    def __init__(self, on_accept: Callable[[list[str] | None], None], on_combine: Callable[[], None] = lambda: None):
        self.info = w.HTML()
        self.info.add_class("ckptviz-suggestion-info")
        self.accept_selected_button = w.Button(description="Accept selected", icon="check",
                                               tooltip="pair the selected suggested rows (a row, or a folded group)",
                                               layout=w.Layout(width="auto"))
        self.accept_selected_button.add_class("ckptviz-accept-selected")
        self.accept_all_button = w.Button(description="Accept all suggestions", icon="check-double",
                                          layout=w.Layout(width="auto"))
        self.accept_all_button.add_class("ckptviz-accept-all")
        self.accept_selected_button.on_click(lambda _: on_accept([]))  # []: the inspector reads the selection
        self.accept_all_button.on_click(lambda _: on_accept(None))
        self.buttons = w.HBox([self.accept_selected_button, self.accept_all_button])
        self.combine_button = w.Button(description="Combine suggested stacks", icon="layer-group",
                                       layout=w.Layout(width="auto", display="none"),
                                       tooltip="stack per-expert checkpoint tensors into the model's stacked ones")
        self.combine_button.add_class("ckptviz-combine-stacks")
        self.combine_button.on_click(lambda _: on_combine())
        self.stacks = None  # the report's stack suggestions (a DataFrame), when shown
        super().__init__([self.info, self.buttons, self.combine_button], layout=w.Layout(display="none"))
        self.add_class("ckptviz-suggestions")

    def show(self, report: Report | None) -> None:
        n = len(report.suggestions) if report is not None else 0
        amb = len(report.ambiguous) if report is not None else 0
        self.stacks = stacks = _stacks(report)
        self.layout.display = "" if (n or amb or len(stacks)) else "none"
        self.buttons.layout.display = "" if n else "none"
        self.combine_button.layout.display = "" if len(stacks) else "none"
        parts = []
        if len(stacks):
            first = stacks.iloc[0]
            parts.append(f"{len(stacks)} missing tensor(s) are exactly a stack of unexpected ones (e.g. "
                         f"<code>{html.escape(first['key'])}</code>: {html.escape(first['reason'])}).")
        if n:
            parts.append(f"<span style='background:{STATUS_COLOURS['suggested']};padding:1px 5px;border-radius:3px'>"
                         f"{n} suggested pairing(s)</span> (same shape, a likely rename): never loaded until you "
                         "accept them; the <code>rule</code> column says why.")
        if amb:
            keys = ", ".join(html.escape(k) for k in report.ambiguous["key"].head(3))
            parts.append(f"{amb} key(s) fit several tensors equally and stay unpaired ({keys}"
                         f"{', …' if amb > 3 else ''}): pair them with a rename rule if you know which.")
        self.info.value = "<div style='font-size:90%'>" + "<br>".join(parts) + "</div>"


def _stacks(report: Report | None):
    """The report's stack suggestions, looked for only where they can be: missing and unexpected rows
    both present, and not more missing rows than a quick look allows."""
    import pandas as pd

    from ..layouts import STACK_COLUMNS

    status = report.frame["status"] if report is not None else None
    if status is None or not (0 < int((status == "missing").sum()) <= MAX_STACK_LOOK) or (
            int((status == "unexpected").sum()) < 2):
        return pd.DataFrame(columns=STACK_COLUMNS)
    return report.stack_suggestions()


MAX_STACK_LOOK = 10_000  # missing rows beyond which the panel does not look for stacks (rep.stack_suggestions() does)


class AdaptPanel(w.VBox):
    """For a row whose shapes differ: the adaptations that fit, a preview (shapes, and the histogram
    of what would be written beside the model tensor now) and *Adapt*. ``on_adapt(method)`` applies
    it to the selected rows (a row, or a folded group selected as a whole)."""

    def __init__(self, on_adapt: Callable[..., None]):
        self.method = w.Dropdown(description="adapt", options=[], layout=w.Layout(width="auto"))
        self.method.add_class("ckptviz-adapt-method")
        self.apply_button = w.Button(description="Adapt", icon="magic", layout=w.Layout(width="auto"),
                                     tooltip="load this row through the adaptation (it stays opt-in: undo works)")
        self.apply_button.add_class("ckptviz-adapt-apply")
        # resample's options, blank = inferred (a square grid, 0 to 8 prefix tokens)
        self.prefix_tokens = w.Text(description="prefix tokens", placeholder="auto", layout=w.Layout(width="180px"),
                                    style={"description_width": "auto"})
        self.grid = w.Text(description="grid", placeholder="auto, e.g. 16x20", layout=w.Layout(width="190px"),
                           style={"description_width": "auto"})
        self.old_grid = w.Text(description="saved grid", placeholder="auto", layout=w.Layout(width="190px"),
                               style={"description_width": "auto"})
        self.options_box = w.HBox([self.prefix_tokens, self.grid, self.old_grid], layout=w.Layout(display="none"))
        self.options_box.add_class("ckptviz-adapt-options")
        self.preview = w.HTML()
        self.preview.add_class("ckptviz-adapt-preview")
        self.plot = w.HTML()
        self.plot.add_class("ckptviz-adapt-plot")
        self._row: tuple | None = None  # (report, frame row, model)
        self.method.observe(lambda _: self._draw(), names="value")
        for box in (self.prefix_tokens, self.grid, self.old_grid):
            box.observe(lambda _: self._draw(), names="value")

        def apply(_) -> None:
            if not self.method.value:
                return
            try:
                options = self.options()
            except AdaptError:
                return  # the preview already says what is wrong
            on_adapt(self.method.value, **options)

        self.apply_button.on_click(apply)
        super().__init__([w.HBox([self.method, self.apply_button]), self.options_box, self.preview, self.plot],
                         layout=w.Layout(display="none"))
        self.add_class("ckptviz-adapt")

    def options(self) -> dict:
        """The chosen method's options from the fields (only ``resample`` has any); AdaptError if unreadable."""
        if self.method.value != "resample":
            return {}
        out: dict = {}
        text = self.prefix_tokens.value.strip()
        if text:
            if not text.isdigit():
                raise AdaptError(f"prefix tokens must be a whole number (or blank for auto), not {text!r}")
            out["prefix_tokens"] = int(text)
        for name, box in (("grid", self.grid), ("old_grid", self.old_grid)):
            text = box.value.strip()
            if text:
                parts = [p for p in re.split(r"[x×, ]+", text) if p]
                if len(parts) != 2 or not all(p.isdigit() for p in parts):
                    raise AdaptError(f"{box.description} must be two numbers like 16x20 (or blank for auto), "
                                     f"not {text!r}")
                out[name] = (int(parts[0]), int(parts[1]))
        return out

    def show(self, report: Report | None, model: nn.Module | None, label: int | None) -> None:
        """Offer the adaptations for the frame row ``label`` (hidden unless its shapes differ)."""
        self._row = None
        row = report.frame.loc[label] if report is not None and label is not None else None
        if row is None or model is None or row["status"] not in ("shape_mismatch", "adapted"):
            self.layout.display = "none"
            return
        live = model_tensors(model).get(row["key"])
        if live is None:
            self.layout.display = "none"
            return
        self._row = (report, row, model)
        methods = applicable(row["ckpt_shape"], row["model_shape"], row["key"])
        self.method.options = methods
        self.method.value = methods[0]
        self.layout.display = ""
        self._draw()

    def _draw(self) -> None:
        if self._row is None or not self.method.value:
            return
        report, row, model = self._row
        self.options_box.layout.display = "" if self.method.value == "resample" else "none"
        try:
            a = plan(self.method.value, row["ckpt_shape"], row["model_shape"], **self.options())
        except AdaptError as e:
            self.preview.value = f"<span style='color:#b00020'>{html.escape(str(e))}</span>"
            self.plot.value = ""
            return
        self.preview.value = (f"<div style='font-size:90%'><b>{html.escape(a.text)}</b><br>checkpoint "
                              f"{tuple(row['ckpt_shape'])} → model {tuple(row['model_shape'])}</div>")
        self.plot.value = ""
        if not a.loads or model_tensors(model)[row["key"]].is_meta:
            return
        try:
            got = preview(report, model, row["key"], a)
        except AdaptError as e:
            self.preview.value += f"<span style='color:#b00020'>{html.escape(str(e))}</span>"
            return
        now, written = got["model now"].float(), got["will be written"]
        if not now.numel() or not written.numel():
            return
        lo, hi = (float(min(now.min(), written.float().min())), float(max(now.max(), written.float().max())))
        hists = {"model now": histogram(now, range=(lo, hi)), "will be written": histogram(written, range=(lo, hi))}
        png = figure_to_png(histogram_figure(hists, title=shorten_key(row["key"], 40)))
        self.plot.value = f"<img style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
