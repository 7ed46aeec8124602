"""ckptviz: look inside PyTorch checkpoints and load them into live models, safely and lazily.

The public names are imported on first use (PEP 562), so ``import ckptviz`` and the command line start
without importing torch, pandas or ipywidgets until a verb needs them."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = (
    "AdaptError", "AlignmentError", "CheckpointError", "CheckpointLimitError", "CheckpointNotFoundError",
    "CheckpointWarning", "CorruptCheckpointError", "LoadError", "ModelError", "NoTensorsError",
    "OptimizerMismatchError", "SectionError", "UnknownFormatError", "UnsafeCheckpointError",
)
# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "preview_adaptation": ("adapt", "preview"),
    "Rule": ("align", "Rule"),
    "Checkpoint": ("checkpoint", "Checkpoint"), "open_checkpoint": ("checkpoint", "open_checkpoint"),
    "STATUSES": ("compare", "STATUSES"), "Report": ("compare", "Report"), "compare": ("compare", "compare"),
    "DiffReport": ("diff", "DiffReport"), "diff": ("diff", "diff"), "diff_tensors": ("diff", "diff_tensors"),
    **{name: ("errors", name) for name in _ERRORS},
    "LoadResult": ("load", "LoadResult"), "load_partial": ("load", "load_partial"),
    **{name: ("models", name) for name in
       ("build_model", "find_models", "model_from_config", "parse_kwargs", "torchvision_models")},
    "load_optimizer": ("optim_load", "load_optimizer"),
    "SeriesReport": ("series", "SeriesReport"), "diff_series": ("series", "diff_series"),
    "torch_code": ("snippet", "torch_code"),
    **{name: ("stats", name) for name in
       ("Histogram", "StatsCache", "histogram", "stats_frame", "summarize", "tensor_stats")},
    # the widgets import ipywidgets: loaded only when asked for, so the core stays headless
    "CheckpointInspector": ("widgets", "CheckpointInspector"), "CheckpointDiff": ("widgets", "CheckpointDiff"),
    "CheckpointSeries": ("widgets", "CheckpointSeries"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'ckptviz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{target[0]}", __name__), target[1])
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package (``import ckptviz.compare`` sets ``ckptviz.compare``),
    which would hide the function of that name: such a binding is ignored, the exported name wins."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .adapt import preview as preview_adaptation  # noqa: F401
    from .align import Rule  # noqa: F401
    from .checkpoint import Checkpoint, open_checkpoint  # noqa: F401
    from .compare import STATUSES, Report, compare  # noqa: F401
    from .diff import DiffReport, diff, diff_tensors  # noqa: F401
    from .errors import *  # noqa: F401,F403
    from .load import LoadResult, load_partial  # noqa: F401
    from .models import build_model, find_models, model_from_config, parse_kwargs, torchvision_models  # noqa: F401
    from .optim_load import load_optimizer  # noqa: F401
    from .series import SeriesReport, diff_series  # noqa: F401
    from .snippet import torch_code  # noqa: F401
    from .stats import Histogram, StatsCache, histogram, stats_frame, summarize, tensor_stats  # noqa: F401
    from .widgets import CheckpointDiff, CheckpointInspector, CheckpointSeries  # noqa: F401
