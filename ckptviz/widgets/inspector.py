"""CheckpointInspector: the notebook widget that replaces the hand-written torch.load / strict=False
loop. It only arranges core objects (Checkpoint, Report, LoadResult) and calls the core verbs."""

from __future__ import annotations

import html
import os
import time
from collections.abc import Mapping
from typing import Any

import ipywidgets as w
from torch import nn

from ..checkpoint import Checkpoint, open_checkpoint
from ..compare import Report, compare, model_tensors
from ..errors import UnsafeCheckpointError
from ..load import LoadResult, load_partial
from .conversions import AdaptPanel, SuggestionPanel
from .files import FilePicker, human_size
from .model_picker import ModelPicker, describe_model
from .panels import DevicePanel, ResultPanel, ScanPanel, SizePanel, TensorPanel, card
from .table import ReportTable
from .working import Working


def _user_namespace() -> Mapping[str, Any]:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython ships with ipywidgets
        shell = None
    return shell.user_ns if shell is not None else {}



class CheckpointInspector(Working, w.VBox):
    """Open a checkpoint, compare it with a live model, look at tensors, load what fits, undo.

    ``model`` is used as is (loads go into that very object); otherwise pick one in the widget.
    Everything shown is available in code: ``.checkpoint``, ``.report``, ``.last_result``, ``.model``.
    """

    def __init__(self, model: nn.Module | None = None, path: str | os.PathLike | None = None, *,
                 start_dir: str | os.PathLike | None = None, namespace: Mapping[str, Any] | None = None):
        self.checkpoint: Checkpoint | None = None
        self.report: Report | None = None
        self.last_result: LoadResult | None = None
        self.error: str | None = None
        self.path: str | None = None
        self.timings: dict[str, float] = {}
        self.opens = 0  # files opened (or tried)
        if start_dir is None and path is not None:
            start_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
        self.files = FilePicker(start_dir)
        self.message = w.HTML()
        self.message.add_class("ckptviz-message")
        self.progress = w.Output()
        self.progress.add_class("ckptviz-progress")
        self.trust = w.Checkbox(value=False, indent=False, layout=w.Layout(display="none"),
                                description="Trust this file: I know where it comes from")
        self.trust.add_class("ckptviz-trust")
        self.section = w.Dropdown(description="section", options=[], layout=w.Layout(width="auto"))
        self.section.add_class("ckptviz-section")
        self.meta = w.HTML()
        self.meta.add_class("ckptviz-metadata")
        self.sizes = SizePanel()
        self.model_picker = ModelPicker(namespace if namespace is not None else _user_namespace())
        self.devices = DevicePanel()
        self.table = ReportTable()
        self.tensor_panel = TensorPanel()
        self.scan_panel = ScanPanel(lambda: (self.checkpoint, self.section.value))
        self.load_all_button = w.Button(description="Load all matching", button_style="success", icon="download",
                                        layout=w.Layout(width="auto"))
        self.load_selected_button = w.Button(description="Load selected rows", icon="check-square",
                                             layout=w.Layout(width="auto"))
        self.undo_button = w.Button(description="Undo last load", icon="undo", button_style="warning",
                                    layout=w.Layout(width="auto"))
        for button, css in ((self.load_all_button, "ckptviz-load-all"),
                            (self.load_selected_button, "ckptviz-load-selected"), (self.undo_button, "ckptviz-undo")):
            button.add_class(css)
        self.result_panel = ResultPanel()
        self.suggestion_panel = SuggestionPanel(lambda keys: self.accept(keys), lambda: self.combine_suggested())
        self.combined: list[tuple] = []  # (model key, ckpt keys, how, dim, inner options), kept across re-compares
        self.accepted: set[str] = set()  # model keys whose suggestion was accepted (kept across re-compares)
        self.adapt_panel = AdaptPanel(lambda method, **options: self.adapt(None, method, **options))
        self.adapted: dict[str, tuple[str, dict]] = {}  # model key -> (method, options), kept across re-compares

        self.files.register_callback(lambda picker: self.open_file(picker.selected))
        self.trust.observe(self._on_trust, names="value")
        self.section.observe(self._on_section, names="value")
        self.model_picker.register_callback(lambda picker: self._on_model(picker.model))
        self.table.register_callback(lambda _: self._on_select())
        self.scan_panel.register_callback(lambda panel: self.table.mark_nonfinite(panel.nonfinite))
        self.load_all_button.on_click(lambda _: self.load_all())
        self.load_selected_button.on_click(lambda _: self.load_selected())
        self.undo_button.on_click(lambda _: self.undo())
        self._quiet = False

        top = w.HBox([
            card("Checkpoint", self.files, self.trust, w.HBox([self.section]), self.meta, self.sizes,
                  css="ckptviz-file-card"),
            card("Model", self.model_picker, self.devices, css="ckptviz-model-card"),
        ], layout=w.Layout(width="100%"))
        actions = w.HBox([self.load_all_button, self.load_selected_button, self.undo_button])
        bottom = w.HBox([
            card("Tensor", self.tensor_panel, self.adapt_panel),
            card("Load", actions, self.suggestion_panel, self.result_panel, css="ckptviz-load-card"),
        ], layout=w.Layout(width="100%"))
        super().__init__([top, self.message, self.progress, card("Keys", self.table, self.scan_panel), bottom])
        self.add_class("ckptviz-inspector")
        self._update_buttons()
        if model is not None:
            self.model_picker.set_model(model)
        if path is not None:
            self.open_file(path)

    # ---- public verbs --------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        return self.model_picker.model

    def open_file(self, path: str | os.PathLike, *, trust: bool = False) -> Checkpoint | None:
        """Open ``path`` (errors are shown in the widget and kept in ``.error``)."""
        path = os.fspath(path)
        self.path = path
        self.opens += 1
        self.model_picker.set_checkpoint_path(path)  # offers the config.json beside or inside it
        self._quiet = True
        self.trust.value = trust
        self._quiet = False
        self.checkpoint, self.report, self.last_result = None, None, None
        self.suggestion_panel.show(None)
        self._show_sections()  # nothing of the previous file stays on screen under this file's name
        self.table.show(None)
        self.tensor_panel.clear()
        self.devices.show(None, self.model)
        self.result_panel.show(None)
        started = time.perf_counter()
        with self._work(f"opening <code>{html.escape(path)}</code>…", opening=path):
            try:
                self.checkpoint = open_checkpoint(path, trust=trust)
            except UnsafeCheckpointError as e:
                self._show_untrusted(e)
                raise
            self.trust.layout.display = "" if self.checkpoint.unsafe_globals else "none"
            self._show_sections()
            self._recompare()
            self.sizes.show(self.checkpoint, self.section.value)
        self.timings["open_to_table"] = time.perf_counter() - started
        return self.checkpoint

    def set_model(self, model: nn.Module | None) -> None:
        """Use ``model`` (the very object) for comparisons and loads; None shows the checkpoint alone."""
        self.model_picker.set_model(model)

    def load_all(self) -> LoadResult | None:
        """Load every match and dtype_mismatch row into the model."""
        return self._load(None, "Loaded all matching")

    def load_selected(self) -> LoadResult | None:
        """Load the rows selected in the table."""
        if self.report is None:
            return None
        keys = [self.report.frame.loc[label, "key"] for label in self.table.selected]
        keys = [k for k in keys if isinstance(k, str)]
        if not keys:
            self._say("Select one or more rows with a model key first.", error=True)
            return None
        return self._load(keys, f"Loaded {len(keys)} selected row(s)")

    def accept(self, keys: list[str] | None = None) -> Report | None:
        """Accept suggested pairings: ``keys`` (model keys), None for all, ``[]`` for the suggested
        rows selected in the table. The report becomes ``report.accept(keys)``."""
        rep = self.report
        if rep is None or not len(rep.suggestions):
            self._say("There are no suggestions to accept.", error=True)
            return None
        if keys is not None and not keys:
            picked = [rep.frame.loc[label, "key"] for label in self.table.selected]
            keys = [k for k in picked if k in set(rep.suggestions["key"])]
            if not keys:
                self._say("Select one or more suggested rows (or a folded group) first.", error=True)
                return None
        with self._work("accepting…"):
            self.report = rep.accept(keys)
            self.accepted |= set(rep.suggestions["key"] if keys is None else keys)
            self.table.show(self.report, loaded=self.table.loaded)
            self.suggestion_panel.show(self.report)
            n = len(rep.suggestions) - len(self.report.suggestions)
            self._say(f"✓ {n} suggested pairing(s) accepted: <i>Load</i> now loads them.")
            return self.report
        return None

    def adapt(self, keys: list[str] | None, method: str, **options) -> Report | None:
        """Load ``keys`` (model keys; None: the selected rows whose shapes differ) through an
        adaptation (``report.adapt``): ``"slice"``, ``"channels"``, ``"resample"`` or ``"reinit"``."""
        rep = self.report
        if rep is None:
            self._say("Open a checkpoint and pick a model first.", error=True)
            return None
        if keys is None:
            rows = rep.frame.loc[self.table.selected]
            keys = rows.loc[rows["status"].isin(["shape_mismatch", "adapted"]), "key"].tolist()
            if not keys:
                self._say("Select one or more rows whose shapes differ (or a folded group) first.", error=True)
                return None
        with self._work(f"adapting {len(keys)} row(s)…"):
            self.report = rep.adapt(keys, method, **options)
            self.adapted.update({k: (method, options) for k in keys})
            self.table.show(self.report, loaded=self.table.loaded)
            self._on_select()  # the preview of the row as it now is
            text = self.report.adaptations[keys[0]].text
            more = f" (and {len(keys) - 1} more row(s))" if len(keys) > 1 else ""
            self._say(f"✓ {html.escape(keys[0])}: {html.escape(text)}{more}. <i>Load</i> now writes it.")
            return self.report
        return None

    def combine_suggested(self) -> Report | None:
        """Stack every group the report suggests (``report.stack_suggestions()``) into its model tensor."""
        stacks = self.suggestion_panel.stacks
        if self.report is None or stacks is None or not len(stacks):
            self._say("There are no stacks to combine.", error=True)
            return None
        with self._work("combining…"):
            rep = self.report
            for r in stacks.itertuples(index=False):
                inner = {"inner": r.inner, "inner_dim": int(r.inner_dim)} if isinstance(r.inner, str) else {}
                rep = rep.combine(r.key, r.ckpt_keys, r.how, r.dim, **inner)
                self.combined.append((r.key, list(r.ckpt_keys), r.how, r.dim, inner))
            self.report = rep
            self.table.show(self.report, loaded=self.table.loaded)
            self.suggestion_panel.show(self.report)
            self._say(f"✓ {len(stacks)} stacked tensor(s) combined: <i>Load</i> now writes them.")
            return self.report
        return None

    def undo(self) -> None:
        """Undo the last load."""
        if self.last_result is None or self.last_result.undone:
            self._say("Nothing to undo.", error=True)
            return
        with self._work("undoing the last load…"):
            self.last_result.undo()
            if self.last_result.assign and self.checkpoint is not None and self.model is not None:
                self.report = self._compare_again(self.report.section)
                self.devices.show(self.report, self.model)
                self.model_picker.status.value = describe_model(self.model)
            self.result_panel.show(self.last_result, "Undone")
            self.table.show(self.report, loaded=set())
            self._say("The model's tensors are back to what they were before the last load.")
        self._update_buttons()

    # ---- internals -----------------------------------------------------------------------
    def _busy_buttons(self) -> list[w.Button]:
        return [self.load_all_button, self.load_selected_button, self.undo_button,
                self.suggestion_panel.accept_selected_button, self.suggestion_panel.accept_all_button,
                self.adapt_panel.apply_button, self.suggestion_panel.combine_button]

    def _done_working(self) -> None:
        super()._done_working()  # every busy button enabled again, then the load buttons as the state allows
        self._update_buttons()
        self.scan_panel.sync()  # a scan describes one checkpoint section: forget it when that changed

    def _error_message(self, error: Exception, text: str) -> str | None:
        if isinstance(error, UnsafeCheckpointError):
            return None  # _show_untrusted explains it, with the trust box
        return super()._error_message(error, text)

    def _show_untrusted(self, e: UnsafeCheckpointError) -> None:
        items = "".join(f"<li><code>{html.escape(g)}</code></li>" for g in e.globals)
        self.message.value = (
            "<div class='ckptviz-error ckptviz-untrusted' style='color:#8a4b00'>"
            f"<b>{html.escape(e.path)}</b> refers to {len(e.globals)} class(es) or function(s) beyond torch's "
            f"safe allowlist:<ul>{items}</ul>Nothing from the file was imported or run. Tick <i>Trust this "
            "file</i> only if you know where it comes from; ckptviz will then read its tensors (still "
            "without running any of the above).</div>"
        )
        self.trust.layout.display = ""
        self._show_sections()
        self.table.show(None)

    def _on_trust(self, change) -> None:
        if not self._quiet and change["new"] and self.path:
            self.open_file(self.path, trust=True)

    def _show_sections(self) -> None:
        ck = self.checkpoint
        self._quiet = True
        if ck is None:
            self.section.options, self.meta.value = [], ""
            self.sizes.show(None)
        else:
            self.section.options = [(f"{s or '(top level)'} — {len(ck._section(s))} tensors", s)
                                    for s in ck.sections]
            self.meta.value = self._metadata_html(ck)
        self._quiet = False

    @staticmethod
    def _metadata_html(ck: Checkpoint) -> str:
        items = [f"<b>format</b>: {ck.format}", f"<b>size</b>: {human_size(ck.nbytes)}"
                 + (f" in {len(ck.files)} files" if len(ck.files) > 1 else "")]
        items += [f"<span style='color:#8a4b00'><b>note</b>: {html.escape(w)}</span>" for w in ck.warnings[:5]]
        for k, v in list(ck.metadata.items())[:12]:
            text = repr(v)
            items.append(f"<b>{html.escape(str(k))}</b>: {html.escape(text[:120] + ('…' if len(text) > 120 else ''))}")
        if ck.optimizer_sections:
            items.append(f"<b>optimizer state</b>: {html.escape(', '.join(ck.optimizer_sections))}")
        return "<div style='font-size:90%'>" + "<br>".join(items) + "</div>"

    def _on_section(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self.sizes.show(self.checkpoint, change["new"])
            with self._work("comparing…"):
                self._recompare(section=change["new"])

    def _on_model(self, model: nn.Module | None) -> None:
        self.last_result = None
        with self._work("comparing…"):
            self._recompare()

    def _recompare(self, section: str | None = None) -> None:
        self.tensor_panel.clear()
        self.adapt_panel.show(None, None, None)
        if self.checkpoint is None or self.model is None:
            self.report = None
            self.suggestion_panel.show(None)
            self.devices.show(None, self.model)
            if self.checkpoint is None or not self.checkpoint.sections:
                self.table.show(None)
                return
            self.table.show_checkpoint(self.checkpoint, section)
            self._quiet = True
            self.section.value = self.table.checkpoint_source.section
            self._quiet = False
            self._say("Showing the checkpoint alone; pick a model (right) to compare it with.")
            return
        self.accepted, self.adapted, self.combined = set(), {}, []  # a new model, file or section: none yet
        self.report = self._compare_again(section)
        self._quiet = True
        self.section.value = self.report.section
        self._quiet = False
        self.table.show(self.report)
        self.suggestion_panel.show(self.report)
        self.devices.show(self.report, self.model)
        self.result_panel.show(None)

    def _compare_again(self, section: str | None) -> Report:
        """``compare`` of the model and checkpoint, with the suggestions accepted so far accepted again."""
        rep = compare(self.model, self.checkpoint, section=section)
        again = [k for k in rep.suggestions["key"] if k in self.accepted]
        rep = rep.accept(again) if again else rep
        for key, ckpt_keys, how, dim, inner in self.combined:
            rep = rep.combine(key, ckpt_keys, how, dim, **inner)
        mismatched = set(rep.frame.loc[rep.frame["status"] == "shape_mismatch", "key"])
        for k, (method, options) in self.adapted.items():
            if k in mismatched:
                rep = rep.adapt(k, method, **options)
        return rep

    def _on_select(self) -> None:
        labels = self.table.selected
        focus = self.table.focus if self.table.focus is not None else (labels[-1] if labels else None)
        if focus is None:
            self.tensor_panel.clear()
            self.adapt_panel.show(None, None, None)
            return
        with self._work("reading the tensor…"):
            self.adapt_panel.show(self.report, self.model, focus)
            if self.report is not None and self.model is not None:
                self.tensor_panel.show(self.report, self.model, focus)
            elif self.table.checkpoint_source is not None:
                src = self.table.checkpoint_source
                self.tensor_panel.show_checkpoint(src.checkpoint, src.section, src.frame.loc[focus, "key"])

    def _load(self, keys, message: str) -> LoadResult | None:
        if self.report is None or self.model is None:
            self._say("Open a checkpoint and pick a model first.", error=True)
            return None
        assign = any(t.is_meta for t in model_tensors(self.model).values())  # meta tensors are materialized
        with self._work("loading into the model…"):
            with self.progress:  # tqdm.auto draws its bar here for big loads
                result = load_partial(self.model, self.report, keys=keys, assign=assign)
            self.progress.clear_output()
            self.last_result = result
            if assign:  # the model's devices changed: compare again, so the table and devices say so
                self.report = self._compare_again(self.report.section)
            self.result_panel.show(result, message)
            self.table.show(self.report, loaded=set(result.loaded))
            self.devices.show(self.report, self.model)
            self.model_picker.status.value = describe_model(self.model)
            hint = " The model is in train mode: switch to eval for inference." if self.model.training else ""
            how = f" (materialized from the checkpoint on {result.device}, assign=True)" if assign else ""
            meta = f" {len(result.still_meta)} tensor(s) are still on the meta device." if result.still_meta else ""
            self._say(f"✓ {len(result.loaded)} tensors loaded into the live model{how}.{meta}{hint}")
            return result
        return None

    def _update_buttons(self) -> None:
        ready = self.report is not None and self.model is not None
        self.load_all_button.disabled = not ready
        self.load_selected_button.disabled = not ready
        self.undo_button.disabled = self.last_result is None or self.last_result.undone

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # static exports (nbconvert) show the styled report instead
            shown = self.report if self.report is not None else self.checkpoint
            bundle["text/html"] = shown._repr_html_() if shown is not None else (
                "<p class='ckptviz-inspector'>CheckpointInspector: nothing opened yet; "
                "run the notebook in Jupyter to use the widget.</p>")
        return bundle
