"""ModelPicker: choose the live model, from the notebook's namespace, torchvision's registry, a
``package.module:Class`` typed in, or the ``config.json`` beside (or inside) the open checkpoint, built
on the meta device; with constructor arguments; builds it once and keeps it."""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w
from torch import nn

from ..checkpoint import human_size
from ..compare import model_tensors
from ..errors import CheckpointError
from ..load import meta_tensors
from ..models import (
    CONFIG_PREFIX,
    build_model,
    config_architecture,
    find_config,
    find_models,
    has_transformers,
    timm_models,
    torchvision_models,
)


def describe_model(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    devices = sorted({str(t.device) for t in model.state_dict().values()}) or ["(no tensors)"]
    mode = "train" if model.training else "eval"
    text = f"<b>{type(model).__name__}</b>: {params:,} parameters on {', '.join(devices)}, {mode} mode"
    return text + meta_note(model)


def meta_note(model: nn.Module) -> str:
    """What being on the meta device means for ``model`` ("" when nothing is on meta)."""
    names = meta_tensors(model)
    if not names:
        return ""
    live = model_tensors(model)
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in live.values() if t.is_meta}.values())
    return (f"<div class='ckptviz-meta-note' style='color:#8a4b00'>{len(names):,} tensor(s) on the <b>meta</b> "
            f"device: no memory is used ({human_size(size)} once materialized). Loading materializes them on "
            "the CPU from the checkpoint (assign=True): without copying where the dtypes agree.</div>")


class ModelPicker(w.VBox):
    """Pick or build the model that checkpoints are compared with and loaded into."""

    def __init__(self, namespace: Mapping[str, Any] | None = None, model: nn.Module | None = None):
        self.namespace = namespace if namespace is not None else {}
        self.model: nn.Module | None = None
        self.checkpoint_path: str | None = None
        self.config_options: dict[str, str] = {}  # combobox label -> build_model spec
        self._callbacks: list[Callable[[ModelPicker], None]] = []
        self.spec = w.Combobox(placeholder="model: a notebook name, resnet18, or package.module:Class",
                               ensure_option=False, layout=w.Layout(flex="1 1 auto", min_width="8em"))
        self.spec.add_class("ckptviz-model-spec")
        self.kwargs = w.Text(placeholder="arguments: num_classes=10, ...",
                             layout=w.Layout(flex="1 1 auto", min_width="6em"))
        self.kwargs.add_class("ckptviz-model-kwargs")
        self.build_button = w.Button(description="Use model", icon="cubes",
                                     layout=w.Layout(flex="0 0 auto", width="auto", min_width="110px"))
        self.build_button.add_class("ckptviz-build-model")
        self.status = w.HTML()
        self.status.add_class("ckptviz-model-status")
        self.remove_button = w.Button(description="No model", icon="times",
                                      layout=w.Layout(flex="0 0 auto", width="auto", min_width="100px",
                                                      display="none"),
                                      tooltip="forget the model: show the checkpoint alone")
        self.remove_button.add_class("ckptviz-remove-model")
        self.build_button.on_click(lambda _: self.build())
        self.remove_button.on_click(lambda _: self.set_model(None))
        super().__init__([w.HBox([self.spec, self.kwargs, self.build_button, self.remove_button]), self.status])
        self.add_class("ckptviz-model-picker")
        self.refresh_options()
        if model is not None:
            self.set_model(model)

    def register_callback(self, callback: Callable[[ModelPicker], None]) -> None:
        self._callbacks.append(callback)

    def set_checkpoint_path(self, path: str | os.PathLike | None) -> None:
        """The checkpoint (file or folder) open beside the picker: its config.json, if any, is offered."""
        self.checkpoint_path = os.fspath(path) if path is not None else None
        self.refresh_options()

    def refresh_options(self) -> None:
        """Offer the checkpoint's config.json first, then the notebook's models, then torchvision's registry."""
        stale = self.spec.value in self.config_options
        self.config_options = {}
        config = find_config(self.checkpoint_path) if self.checkpoint_path else None
        if config is not None and has_transformers():
            arch = config_architecture(config) or "base model (no architectures)"
            self.config_options[f"config.json: {arch} (on meta)"] = f"{CONFIG_PREFIX}{config}"
        local = list(find_models(self.namespace))
        self.spec.options = tuple([*self.config_options, *local, *(f"torchvision:{n}" for n in torchvision_models()),
                                   *(f"timm:{n}" for n in timm_models())])
        if self.config_options and self.model is None and (stale or not self.spec.value):
            self.spec.value = next(iter(self.config_options))  # one click on "Use model" builds it
        elif stale:
            self.spec.value = ""

    def build(self) -> nn.Module | None:
        """Build (or look up) the model named in the box; errors are shown, not raised."""
        label = self.spec.value.strip()
        if not label:
            self.status.value = "<span class='ckptviz-error'>Type or pick a model first.</span>"
            return None
        spec = self.config_options.get(label, label)
        self.status.value = f"building <code>{html.escape(label)}</code>…"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = build_model(spec, self.kwargs.value, namespace=self.namespace)
        except CheckpointError as e:
            self.status.value = f"<span class='ckptviz-error' style='color:#b00020'>{_escape(str(e))}</span>"
            return None
        self.set_model(model)
        notes = list(dict.fromkeys(str(c.message) for c in caught if issubclass(c.category, UserWarning)))
        if notes:
            self.status.value += "".join(f"<div class='ckptviz-model-note'>⚠ {_escape(n)}</div>" for n in notes)
        return model

    def set_model(self, model: nn.Module | None) -> None:
        """Use ``model`` (None: no model, the checkpoint is shown alone)."""
        self.model = model
        self.status.value = describe_model(model) if model is not None else ""
        self.remove_button.layout.display = "" if model is not None else "none"
        for cb in self._callbacks:
            cb(self)


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")
