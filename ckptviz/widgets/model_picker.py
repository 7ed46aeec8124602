"""ModelPicker: choose the live model, from the notebook's namespace, torchvision's registry, or a
``package.module:Class`` typed in, with constructor arguments; builds it once and keeps it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w
from torch import nn

from ..errors import CheckpointError
from ..models import build_model, find_models, torchvision_models


def describe_model(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    devices = sorted({str(t.device) for t in model.state_dict().values()}) or ["(no tensors)"]
    mode = "train" if model.training else "eval"
    return f"<b>{type(model).__name__}</b>: {params:,} parameters on {', '.join(devices)}, {mode} mode"


class ModelPicker(w.VBox):
    """Pick or build the model that checkpoints are compared with and loaded into."""

    def __init__(self, namespace: Mapping[str, Any] | None = None, model: nn.Module | None = None):
        self.namespace = namespace if namespace is not None else {}
        self.model: nn.Module | None = None
        self._callbacks: list[Callable[[ModelPicker], None]] = []
        self.spec = w.Combobox(placeholder="model: a notebook name, resnet18, or package.module:Class",
                               ensure_option=False, layout=w.Layout(flex="1"))
        self.spec.add_class("ckptviz-model-spec")
        self.kwargs = w.Text(placeholder="arguments: num_classes=10, ...", layout=w.Layout(width="34%"))
        self.kwargs.add_class("ckptviz-model-kwargs")
        self.build_button = w.Button(description="Use model", icon="cubes", layout=w.Layout(width="120px"))
        self.build_button.add_class("ckptviz-build-model")
        self.status = w.HTML()
        self.status.add_class("ckptviz-model-status")
        self.build_button.on_click(lambda _: self.build())
        super().__init__([w.HBox([self.spec, self.kwargs, self.build_button]), self.status])
        self.add_class("ckptviz-model-picker")
        self.refresh_options()
        if model is not None:
            self.set_model(model)

    def register_callback(self, callback: Callable[[ModelPicker], None]) -> None:
        self._callbacks.append(callback)

    def refresh_options(self) -> None:
        """Offer the notebook's models first, then torchvision's registry."""
        local = list(find_models(self.namespace))
        self.spec.options = tuple(local + [f"torchvision:{n}" for n in torchvision_models()])

    def build(self) -> nn.Module | None:
        """Build (or look up) the model named in the box; errors are shown, not raised."""
        spec = self.spec.value.strip()
        if not spec:
            self.status.value = "<span class='ckptviz-error'>Type or pick a model first.</span>"
            return None
        self.status.value = f"building <code>{spec}</code>…"
        try:
            model = build_model(spec, self.kwargs.value, namespace=self.namespace)
        except CheckpointError as e:
            self.status.value = f"<span class='ckptviz-error' style='color:#b00020'>{_escape(str(e))}</span>"
            return None
        self.set_model(model)
        return model

    def set_model(self, model: nn.Module) -> None:
        self.model = model
        self.status.value = describe_model(model)
        for cb in self._callbacks:
            cb(self)


def _escape(text: str) -> str:
    import html

    return html.escape(text).replace("\n", "<br>")
